# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The batched loops behind `img convert` and `img bench` that are not qcow2 mapping: the
raw-source reader (SEEK_DATA / SEEK_HOLE walk and preads straight into a batch buffer, one
call per batch, the GIL released) and the raw bench request loop (O_DIRECT-capable, one
call per worker thread, the GIL released)."""

from libc.errno cimport EINTR, errno
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset
from posix.unistd cimport fdatasync, lseek, pread, pwrite

from hvcore.qcow2_codec cimport scan_runs

import os


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
