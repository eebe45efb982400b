# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The batched loops behind `img convert` and `img bench` that are not qcow2 mapping: the
raw-source reader (SEEK_DATA / SEEK_HOLE walk and preads straight into a batch buffer, one
call per batch, the GIL released), the raw bench request loop (O_DIRECT-capable, one
call per worker thread, the GIL released) and the async bench loop (`-i io_uring|native`:
one thread keeps `depth` requests in flight on an hvcore.aio queue, raw or qcow2)."""

from libc.errno cimport EAGAIN, EINTR, EINVAL, EIO, ENOMEM, errno
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset
from posix.unistd cimport fdatasync, lseek, pread, pwrite

from hvcore.aio cimport AioQ, AioQueue, AqDone, aq_prep, aq_wait
from hvcore.includes.aio cimport RWF_DSYNC
from hvcore.qcow2_codec cimport scan_runs

import os

_stuck = []                    # buffers the kernel may still write (a failed queue)


cdef int read_full(int fd, uint8_t *buf, uint64_t n, uint64_t off) noexcept nogil:
    """pread all of `n` bytes; past the end of the file reads as zeroes (as RawDisk)."""
    cdef ssize_t r
    while n:
        r = pread(fd, buf, n, off)
        if r < 0:
            if errno == EINTR:
                continue
            return errno
        if r == 0:
            memset(buf, 0, n)
            return 0
        buf += r
        off += r
        n -= r
    return 0


def read_raw_extents(int fd, uint64_t pos, uint64_t end, unsigned char[::1] buf not None):
    """Fill `buf` with the data extents of the raw file `fd` from `pos` on (below `end`),
    found with SEEK_DATA / SEEK_HOLE. Returns (next position, [(offset, buf_offset,
    length), ...]); the next position is `end` when the file is done."""
    cdef uint64_t cap = buf.shape[0], used = 0, n
    cdef int64_t d, h
    cdef size_t k = 0, maxp = cap // 512 + 2, i
    cdef uint64_t *pieces
    cdef int err = 0
    if cap == 0:
        raise ValueError("empty buffer")
    pieces = <uint64_t*>malloc(maxp * 24)
    if pieces == NULL:
        raise MemoryError()
    try:
        with nogil:
            while pos < end and used < cap and k < maxp:
                d = lseek(fd, pos, SEEK_DATA)
                if d < 0 or <uint64_t>d >= end:
                    pos = end               # ENXIO: no data past pos (errors: as a hole)
                    break
                h = lseek(fd, d, SEEK_HOLE)
                if h < 0 or <uint64_t>h > end:
                    h = end
                n = min(<uint64_t>(h - d), cap - used)
                err = read_full(fd, &buf[0] + used, n, d)
                if err:
                    pos = d
                    break
                pieces[3 * k] = d
                pieces[3 * k + 1] = used
                pieces[3 * k + 2] = n
                k += 1
                used += n
                pos = d + n
        if err:
            raise OSError(err, f"read at offset {pos:#x}: {os.strerror(err)}")
        return pos, [(pieces[3 * i], pieces[3 * i + 1], pieces[3 * i + 2]) for i in range(k)]
    finally:
        free(pieces)


def raw_requests(int fd, unsigned char[::1] buf not None, bint write, uint64_t first,
                 uint64_t count, uint64_t stride, uint64_t step, uint64_t offset,
                 uint64_t size, uint64_t flush_interval):
    """Requests first, first+stride, ... (< count) of a bench run on a raw file, placed as
    `qemu-img bench` places them: the offset advances by `step` modulo the size, back to 0
    where the buffer would not fit. With flush_interval, fdatasync after each multiple."""
    cdef uint64_t i, n = buf.shape[0], off = offset
    cdef ssize_t r
    cdef int err = 0
    cdef uint8_t *p = &buf[0]
    if n == 0 or n > size:
        raise ValueError("the bench buffer must fit in the image")
    with nogil:
        for i in range(count):
            if off + n > size:
                off = 0
            if i % stride == first:
                while True:
                    r = pwrite(fd, p, n, off) if write else pread(fd, p, n, off)
                    if r >= 0 or errno != EINTR:
                        break
                if r < 0:
                    err = errno
                    break
                if flush_interval and (i + 1) % flush_interval == 0 and fdatasync(fd) < 0:
                    err = errno
                    break
            off = (off + step) % size
    if err:
        raise OSError(err, os.strerror(err))


cdef int write_full(int fd, const uint8_t *buf, uint64_t n, uint64_t off) noexcept nogil:
    cdef ssize_t r
    while n:
        r = pwrite(fd, buf, n, off)
        if r < 0:
            if errno == EINTR:
                continue
            return errno
        buf += r
        off += r
        n -= r
    return 0


def write_raw_pieces(int fd, const unsigned char[::1] buf not None, list pieces not None,
                     uint64_t limit, size_t granule=0):
    """Write pieces [(offset, buf_offset, length), ...] of `buf` to the raw file `fd`
    (offsets below `limit`), skipping `granule`-sized blocks of zeroes when `granule` is
    not 0: the raw-target writer of `convert`, one call per batch, the GIL released."""
    cdef size_t i, k, j, n = len(pieces)
    cdef uint64_t g, b, ln
    cdef uint64_t *arr
    cdef size_t *runs = NULL
    cdef int err = 0
    arr = <uint64_t*>malloc(n * 24 + 8)
    if arr == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            g, b, ln = pieces[i]
            if b > <uint64_t>buf.shape[0] or ln > buf.shape[0] - b or g > limit or \
                    ln > limit - g:
                raise ValueError(f"piece {g:#x}+{ln:#x} is outside the buffer or the disk")
            arr[3 * i], arr[3 * i + 1], arr[3 * i + 2] = g, b, ln
        if granule:
            runs = <size_t*>malloc((buf.shape[0] // granule // 2 + 2 + n) * 2 * sizeof(size_t))
            if runs == NULL:
                raise MemoryError()
        with nogil:
            for i in range(n):
                if granule == 0:
                    err = write_full(fd, &buf[0] + arr[3 * i + 1], arr[3 * i + 2], arr[3 * i])
                else:
                    k = scan_runs(&buf[0] + arr[3 * i + 1], arr[3 * i + 2], granule, runs)
                    for j in range(k):
                        err = write_full(fd, &buf[0] + arr[3 * i + 1] + runs[2 * j],
                                         runs[2 * j + 1] - runs[2 * j],
                                         arr[3 * i] + runs[2 * j])
                        if err:
                            break
                if err:
                    break
        if err:
            raise OSError(err, f"write: {os.strerror(err)}")
    finally:
        free(arr)
        free(runs)


# -- async bench loop -----------------------------------------------------------------------

ctypedef struct Slot:
    int fd, fallback_fd
    uint8_t *buf
    uint64_t host, left        # what is still to transfer (a short transfer resumes)


cdef int run_aio(AioQ *a, AioRun *r, uint8_t *buf) noexcept nogil:
    """Requests 0 .. count-1 placed as `qemu-img bench` places them, all on `buf` (as
    qemu-img does), at most a.depth in flight. A flush point (every flush_interval
    requests, or after a write the image did itself with flush_sync_writes) stops
    submitting until the queue is empty, then flushes: the data is on disk before the
    metadata the flush writes. After an error nothing new is submitted and what is in
    flight completes before the return (the buffer stays in use until then)."""
    cdef Slot *slots = <Slot*>malloc(a.depth * sizeof(Slot))
    cdef unsigned *free_tags = <unsigned*>malloc(a.depth * sizeof(unsigned))
    cdef AqDone *done = <AqDone*>malloc(a.depth * sizeof(AqDone))
    cdef unsigned nfree = a.depth, inflight = 0, tag, k
    cdef uint64_t i = 0, off = r.offset
    cdef int rc = 0, m, n
    cdef bint barrier = False
    cdef int64_t res
    cdef AioTarget t
    cdef Slot *s
    if slots == NULL or free_tags == NULL or done == NULL:
        free(slots)
        free(free_tags)
        free(done)
        r.err = ENOMEM
        return -1
    for tag in range(a.depth):
        free_tags[tag] = tag
    while True:
        while rc == 0 and not barrier and i < r.count and nfree:
            if off + r.bufsize > r.size:
                off = 0
            m = r.map(r.ctx, r.write, off, buf, r.bufsize, &t)
            if m < 0:
                rc = -1
                break
            if m == 1:
                nfree -= 1
                tag = free_tags[nfree]
                s = &slots[tag]
                s.fd, s.fallback_fd, s.buf, s.host, s.left = t.fd, t.fallback_fd, buf, \
                    t.host, r.bufsize
                aq_prep(a, tag, s.fd, r.write, s.buf, s.left, s.host, r.rw_flags)
                inflight += 1
            elif r.write and r.flush_sync_writes:
                barrier = True
            i += 1
            off = (off + r.step) % r.size
            if r.flush_interval and i % r.flush_interval == 0:
                barrier = True
        if inflight == 0:
            if rc == 0 and barrier:
                barrier = False
                if r.flush(r.ctx) < 0:
                    rc = -1
                continue
            break
        n = aq_wait(a, done, a.depth)
        if n < 0:
            # the queue itself failed: what is in flight cannot be collected, so keep
            # the buffers (leak them) rather than free memory the kernel may still write
            r.err, r.err_off, r.stuck = -n, 0, True
            return -1
        for k in range(<unsigned>n):
            tag = <unsigned>done[k].tag
            res = done[k].res
            s = &slots[tag]
            if rc == 0 and (res == -EINTR or res == -EAGAIN):
                pass                        # again, as it was
            elif rc == 0 and res == -EINVAL and s.fallback_fd >= 0 and \
                    s.fd != s.fallback_fd:
                s.fd = s.fallback_fd        # the device wants larger alignment
            elif rc == 0 and 0 < res < <int64_t>s.left:
                s.buf += res                # short transfer: the rest
                s.host += <uint64_t>res
                s.left -= <uint64_t>res
            else:
                if rc == 0 and (res < 0 or <uint64_t>res < s.left):
                    rc = -1
                    r.err, r.err_off = (<int>-res if res < 0 else EIO), s.host
                inflight -= 1
                free_tags[nfree] = tag
                nfree += 1
                continue
            aq_prep(a, tag, s.fd, r.write, s.buf, s.left, s.host, r.rw_flags)
    free(slots)
    free(free_tags)
    free(done)
    return rc


ctypedef struct RawCtx:
    int fd, fallback_fd, err


cdef int raw_map(void *ctx, bint write, uint64_t off, uint8_t *buf, uint64_t n,
                 AioTarget *t) noexcept nogil:
    cdef RawCtx *c = <RawCtx*>ctx
    t.fd = c.fd
    t.fallback_fd = c.fallback_fd
    t.host = off
    return 1


cdef int raw_flush(void *ctx) noexcept nogil:
    cdef RawCtx *c = <RawCtx*>ctx
    if fdatasync(c.fd) < 0:
        c.err = errno
        return -1
    return 0


def raw_aio_requests(AioQueue queue not None, int fd, int fallback_fd,
                     unsigned char[::1] buf not None, bint write, uint64_t count,
                     uint64_t step, uint64_t offset, uint64_t size, uint64_t flush_interval,
                     bint dsync):
    """A bench run on a raw file through `queue`: `count` requests of len(buf) bytes, at
    most queue.depth in flight, placed as raw_requests places them. `fallback_fd` takes
    requests the O_DIRECT `fd` refuses for alignment (-1: none); `dsync` makes every
    write durable when it completes (RWF_DSYNC: writethrough, directsync)."""
    cdef RawCtx c
    cdef AioRun r
    cdef int rc
    if buf.shape[0] == 0 or <uint64_t>buf.shape[0] > size:
        raise ValueError("the bench buffer must fit in the image")
    if queue.q.depth == 0:
        raise ValueError("the aio queue is closed")
    c.fd, c.fallback_fd, c.err = fd, fallback_fd, 0
    memset(&r, 0, sizeof(r))
    r.ctx, r.map, r.flush = &c, raw_map, raw_flush
    r.write, r.count, r.bufsize, r.step = write, count, buf.shape[0], step
    r.offset, r.size, r.flush_interval = offset, size, flush_interval
    r.rw_flags = RWF_DSYNC if dsync and write else 0
    with nogil:
        rc = run_aio(&queue.q, &r, &buf[0])
    if r.stuck:
        _stuck.append(buf)
    if rc < 0:
        err = r.err or c.err
        where = f" at offset {r.err_off:#x}" if r.err else ""
        raise OSError(err, f"{os.strerror(err)}{where}")
