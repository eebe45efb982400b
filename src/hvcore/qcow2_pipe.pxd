# <unistd.h> lseek whence values Cython's posix.unistd does not declare (Linux, _GNU_SOURCE).
cdef extern from "<unistd.h>" nogil:
    enum: SEEK_DATA
    enum: SEEK_HOLE


# The async bench loop (run_aio): the image says where a request goes (map) and how to flush.
from libc.stdint cimport uint8_t, uint64_t

from hvcore.aio cimport AioQ


ctypedef struct AioTarget:
    int fd                     # where the request goes (the O_DIRECT descriptor or not)
    int fallback_fd            # retried there when `fd` refuses the alignment (EINVAL), or -1
    uint64_t host              # file offset


# 1: the request maps to one file extent (filled in `t`) for the queue; 0: the image did it
# itself (allocation, copy-on-write, zeroes, ...); -1: failed (the image recorded why)
ctypedef int (*aio_map_fn)(void *ctx, bint write, uint64_t off, uint8_t *buf, uint64_t n,
                           AioTarget *t) noexcept nogil
ctypedef int (*aio_flush_fn)(void *ctx) noexcept nogil


ctypedef struct AioRun:
    void *ctx
    aio_map_fn map
    aio_flush_fn flush
    bint write
    uint64_t count, bufsize, step, offset, size, flush_interval
    int rw_flags               # RWF_DSYNC for writethrough / directsync
    bint flush_sync_writes     # writethrough: flush after a write the image did itself
    int err                    # out: errno of a failed queued request (0: see the image)
    uint64_t err_off           # out: its file offset
    bint stuck                 # out: the queue failed with requests in flight: keep `buf`


cdef int run_aio(AioQ *a, AioRun *r, uint8_t *buf) noexcept nogil
