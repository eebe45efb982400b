# The guest data path: reads through the mapping (backing file, compressed, zero), writes
# with allocation and copy-on-write, and metadata-only zeroing / unmapping.
from libc.stdint cimport uint8_t, uint64_t

from hvcore.qcow2_io cimport Q2
from hvcore.qcow2_pipe cimport AioTarget


# thread-safe (take the image lock themselves)
cdef int do_read(Q2 *q, uint64_t off, uint8_t *buf, uint64_t n) noexcept nogil
cdef int do_write(Q2 *q, uint64_t off, const uint8_t *buf, uint64_t n) noexcept nogil
# the caller holds the image lock
cdef int read_locked(Q2 *q, uint64_t off, uint8_t *buf, uint64_t n) noexcept nogil
cdef int write_pieces(Q2 *q, const uint8_t *buf, const uint64_t *pieces, size_t npieces,
                      uint64_t granule) noexcept nogil
cdef int do_zero(Q2 *q, uint64_t off, uint64_t n, bint unmap) noexcept nogil
# img bench -i io_uring|native: qcow2_pipe.run_aio's map and flush (ctx is the Q2)
cdef int aio_map(void *ctx, bint write, uint64_t off, uint8_t *buf, uint64_t n,
                 AioTarget *t) noexcept nogil
cdef int aio_flush(void *ctx) noexcept nogil
