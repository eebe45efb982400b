# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""An async I/O queue on the kernel ABI directly (no liburing / libaio, so the wheel needs
nothing at run time): io_uring (`-i io_uring`) or Linux native AIO (`-i native`).

The caller owns `depth` tags; aq_prep queues a read or write for one tag and aq_wait hands
everything prepared to the kernel and collects at least one completion, in one syscall
where the backend allows it (io_uring_enter submits and waits at once). Both run without
the GIL; the request loops that drive them live with their users (qcow2_pipe).

io_uring ring indexes are shared with the kernel: the SQ tail and CQ head we publish with
release stores, the CQ tail we read with an acquire load (includes/aio.pxd)."""

from libc.errno cimport EAGAIN, EBUSY, EINTR, EINVAL, ENOMEM, ENOSYS, EPERM, errno
from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memmove, memset
from posix.mman cimport MAP_FAILED, MAP_POPULATE, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.unistd cimport close

from hvcore.includes.aio cimport (IOCB_CMD_PREAD, IOCB_CMD_PWRITE, IORING_ENTER_GETEVENTS,
                                  IORING_FEAT_RW_CUR_POS, IORING_FEAT_SINGLE_MMAP,
                                  IORING_OFF_CQ_RING, IORING_OFF_SQ_RING, IORING_OFF_SQES,
                                  IORING_OP_READ, IORING_OP_READV, IORING_OP_WRITE,
                                  IORING_OP_WRITEV, IORING_SETUP_COOP_TASKRUN,
                                  IORING_SETUP_SINGLE_ISSUER, IORING_SETUP_SQE128,
                                  SYS_io_destroy,
                                  SYS_io_getevents, SYS_io_setup, SYS_io_submit,
                                  SYS_io_uring_enter, SYS_io_uring_setup, aq_load_acquire,
                                  aq_store_release, io_event, io_uring_cqe, io_uring_params,
                                  io_uring_sqe, iocb, syscall)

import os

KINDS = {"io_uring": AQ_URING, "native": AQ_NATIVE}


# -- io_uring -------------------------------------------------------------------------------

cdef int uring_setup(AioQ *a, unsigned entries, unsigned flags) noexcept nogil:
    """Create the ring and map it; -errno (the ring is closed again) on failure."""
    cdef io_uring_params p
    cdef int fd, err
    cdef void *m
    memset(&p, 0, sizeof(p))
    p.flags = flags
    fd = <int>syscall(SYS_io_uring_setup, entries, &p)
    if fd < 0:
        return -errno
    a.ring_fd = fd
    a.sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned)
    a.cq_len = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe)
    if p.features & IORING_FEAT_SINGLE_MMAP:
        a.sq_len = a.cq_len = max(a.sq_len, a.cq_len)
    m = mmap(NULL, a.sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
             IORING_OFF_SQ_RING)
    if m == MAP_FAILED:
        return uring_undo(a, errno)
    a.sq_map = m
    if p.features & IORING_FEAT_SINGLE_MMAP:
        a.cq_map = NULL
        m = a.sq_map
    else:
        m = mmap(NULL, a.cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                 IORING_OFF_CQ_RING)
        if m == MAP_FAILED:
            return uring_undo(a, errno)
        a.cq_map = m
    a.sqes_len = p.sq_entries * sizeof(io_uring_sqe) * (2 if flags & IORING_SETUP_SQE128 else 1)
    a.sqes = <io_uring_sqe*>mmap(NULL, a.sqes_len, PROT_READ | PROT_WRITE,
                                 MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES)
    if <void*>a.sqes == MAP_FAILED:
        a.sqes = NULL
        return uring_undo(a, errno)
    a.sq_tail = <unsigned*>(<char*>a.sq_map + p.sq_off.tail)
    a.sq_array = <unsigned*>(<char*>a.sq_map + p.sq_off.array)
    a.sq_mask = (<unsigned*>(<char*>a.sq_map + p.sq_off.ring_mask))[0]
    a.cq_head = <unsigned*>(<char*>m + p.cq_off.head)
    a.cq_tail = <unsigned*>(<char*>m + p.cq_off.tail)
    a.cq_mask = (<unsigned*>(<char*>m + p.cq_off.ring_mask))[0]
    a.cqes = <io_uring_cqe*>(<char*>m + p.cq_off.cqes)
    a.tail = a.sq_tail[0]
    a.rw_plain = (p.features & IORING_FEAT_RW_CUR_POS) != 0     # both came in Linux 5.6
    return 0


cdef int uring_undo(AioQ *a, int err) noexcept nogil:
    uring_close(a)
    return -err


cdef void uring_close(AioQ *a) noexcept nogil:
    if a.sqes != NULL:
        munmap(a.sqes, a.sqes_len)
    if a.cq_map != NULL:
        munmap(a.cq_map, a.cq_len)
    if a.sq_map != NULL:
        munmap(a.sq_map, a.sq_len)
    if a.ring_fd >= 0:
        close(a.ring_fd)
    a.sqes = NULL
    a.cq_map = a.sq_map = NULL
    a.ring_fd = -1


cdef void uring_prep(AioQ *a, unsigned tag, int fd, bint write, void *buf, uint64_t n,
                     uint64_t off, int rw_flags) noexcept nogil:
    cdef unsigned i = a.tail & a.sq_mask
    cdef io_uring_sqe *sqe = &a.sqes[i]
    memset(sqe, 0, sizeof(io_uring_sqe))
    sqe.fd = fd
    sqe.off = off
    sqe.rw_flags = rw_flags
    sqe.user_data = tag
    if a.rw_plain:
        sqe.opcode = IORING_OP_WRITE if write else IORING_OP_READ
        sqe.addr = <uint64_t>buf
        sqe.len = <unsigned>n
    else:
        a.iov[tag].iov_base = buf
        a.iov[tag].iov_len = n
        sqe.opcode = IORING_OP_WRITEV if write else IORING_OP_READV
        sqe.addr = <uint64_t>&a.iov[tag]
        sqe.len = 1
    a.sq_array[i] = i
    a.tail += 1
    a.unsubmitted += 1


cdef unsigned uring_reap(AioQ *a, AqDone *out, unsigned max_out) noexcept nogil:
    cdef unsigned head = a.cq_head[0], tail = aq_load_acquire(a.cq_tail), n = 0
    cdef io_uring_cqe *cqe
    while head != tail and n < max_out:
        cqe = &a.cqes[head & a.cq_mask]
        out[n].tag = cqe.user_data
        out[n].res = cqe.res
        n += 1
        head += 1
    aq_store_release(a.cq_head, head)
    return n


cdef int uring_wait(AioQ *a, AqDone *out, unsigned max_out) noexcept nogil:
    """Publish the prepared entries, then one io_uring_enter submits them and (when no
    completion is waiting already) sleeps until one arrives."""
    cdef unsigned n
    cdef long r
    if a.unsubmitted:
        aq_store_release(a.sq_tail, a.tail)
    n = uring_reap(a, out, max_out)
    while True:
        if n and not a.unsubmitted:
            return n
        r = syscall(SYS_io_uring_enter, a.ring_fd, a.unsubmitted, 0 if n else 1,
                    0 if n else IORING_ENTER_GETEVENTS, NULL, 0)
        if r < 0:
            if errno == EINTR:
                continue
            if n and (errno == EAGAIN or errno == EBUSY):
                return n            # the rest goes with the next call
            return -errno
        a.unsubmitted -= <unsigned>r
        if n:
            return n
        n = uring_reap(a, out, max_out)


# -- native AIO -----------------------------------------------------------------------------

cdef void native_prep(AioQ *a, unsigned tag, int fd, bint write, void *buf, uint64_t n,
                      uint64_t off, int rw_flags) noexcept nogil:
    cdef iocb *cb = &a.iocbs[tag]
    memset(cb, 0, sizeof(iocb))
    cb.aio_data = tag
    cb.aio_lio_opcode = IOCB_CMD_PWRITE if write else IOCB_CMD_PREAD
    cb.aio_fildes = fd
    cb.aio_buf = <uint64_t>buf
    cb.aio_nbytes = n
    cb.aio_offset = off
    cb.aio_rw_flags = rw_flags
    a.pending[a.npending] = cb
    a.npending += 1


cdef int native_wait(AioQ *a, AqDone *out, unsigned max_out) noexcept nogil:
    """io_submit the prepared iocbs (one the kernel refuses outright completes with its
    error), then io_getevents for at least one completion."""
    cdef unsigned n = 0, i
    cdef long r
    while a.npending and n < max_out:
        r = syscall(SYS_io_submit, a.ctx, a.npending, a.pending)
        if r < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                break               # the context is full: completions first
            out[n].tag = a.pending[0].aio_data
            out[n].res = -errno
            n += 1
            r = 1
        a.npending -= <unsigned>r
        memmove(a.pending, a.pending + r, a.npending * sizeof(iocb*))
    while True:
        r = syscall(SYS_io_getevents, a.ctx, 0 if n else 1, max_out - n, a.events, NULL)
        if r >= 0:
            break
        if errno != EINTR:
            return n if n else -errno
    for i in range(<unsigned>r):
        out[n].tag = a.events[i].data
        out[n].res = a.events[i].res
        n += 1
    return n


# -- the queue ------------------------------------------------------------------------------

cdef void aq_prep(AioQ *a, unsigned tag, int fd, bint write, void *buf, uint64_t n,
                  uint64_t off, int rw_flags) noexcept nogil:
    """Queue one read or write of `n` bytes at `off` for `tag` (< depth, not in flight);
    `rw_flags` are RWF_* (RWF_DSYNC: durable when complete)."""
    if a.kind == AQ_URING:
        uring_prep(a, tag, fd, write, buf, n, off, rw_flags)
    else:
        native_prep(a, tag, fd, write, buf, n, off, rw_flags)


cdef int aq_wait(AioQ *a, AqDone *out, unsigned max_out) noexcept nogil:
    """Submit what is prepared and return the completions (at least one; at most
    `max_out`), or -errno. Something must be in flight or prepared."""
    if a.kind == AQ_URING:
        return uring_wait(a, out, max_out)
    return native_wait(a, out, max_out)


def _cause(str kind, int err) -> str:
    """Why the kernel refused the queue, in words (the sysctl or limit to look at)."""
    if kind == "native":
        hint = {ENOSYS: " (the kernel has no native AIO)",
                EAGAIN: " (fs.aio-max-nr is reached)"}.get(err, "")
        return f"io_setup: {os.strerror(err)}{hint}"
    hint = ""
    if err == ENOSYS:
        hint = " (the kernel has no io_uring)"
    elif err == EPERM:
        try:
            with open("/proc/sys/kernel/io_uring_disabled") as f:
                disabled = f.read().strip()
        except OSError:
            disabled = "0"
        hint = f" (kernel.io_uring_disabled = {disabled})" if disabled != "0" else \
            " (refused by a seccomp or container policy)"
    elif err == ENOMEM:
        hint = " (locked memory limit, ulimit -l)"
    return f"io_uring_setup: {os.strerror(err)}{hint}"


cdef class AioQueue:
    """A queue of `depth` requests on `kind` ("io_uring" or "native"). Creating it fails
    with OSError whose message names the cause (ENOSYS, EPERM with the sysctl, ...).
    io_uring rings are single-issuer: use the queue on the thread that created it."""

    def __cinit__(self, str kind, unsigned depth):
        cdef AioQ *a = &self.q
        cdef int rc
        a.ring_fd = -1
        if kind not in KINDS or depth == 0:
            raise ValueError(f"bad aio queue {kind!r} of depth {depth}")
        a.kind = KINDS[kind]
        a.depth = depth
        if a.kind == AQ_URING:
            a.iov = <iovec*>calloc(depth, sizeof(iovec))
            if a.iov == NULL:
                raise MemoryError()
            # newest flags first; an older kernel refuses them with EINVAL
            rc = uring_setup(a, depth, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN)
            if rc == -EINVAL:
                rc = uring_setup(a, depth, IORING_SETUP_COOP_TASKRUN)
            if rc == -EINVAL:
                rc = uring_setup(a, depth, 0)
        else:
            a.iocbs = <iocb*>calloc(depth, sizeof(iocb))
            a.pending = <iocb**>calloc(depth, sizeof(iocb*))
            a.events = <io_event*>calloc(depth, sizeof(io_event))
            if a.iocbs == NULL or a.pending == NULL or a.events == NULL:
                raise MemoryError()
            rc = <int>syscall(SYS_io_setup, depth, &a.ctx)
            if rc < 0:
                rc = -errno
                a.ctx = 0
        if rc < 0:
            raise OSError(-rc, _cause(kind, -rc))

    def __dealloc__(self):
        self.close()

    def close(self):
        """Release the ring / context (nothing may be in flight)."""
        cdef AioQ *a = &self.q
        if a.kind == AQ_URING:
            uring_close(a)
        elif a.ctx:
            syscall(SYS_io_destroy, a.ctx)
            a.ctx = 0
        free(a.iov)
        free(a.iocbs)
        free(a.pending)
        free(a.events)
        a.depth = 0
        a.iov = NULL
        a.iocbs = NULL
        a.pending = NULL
        a.events = NULL

    @property
    def kind(self) -> str:
        return "io_uring" if self.q.kind == AQ_URING else "native"

    @property
    def depth(self) -> int:
        return self.q.depth
