# Compressed clusters (descriptor decode, read through the decompressor, packed placement
# of written ones) and the zero detection behind sparse output.
from libc.stdint cimport uint8_t, uint64_t

from hvcore.qcow2_io cimport Q2


cdef bint all_zero(const uint8_t *p, size_t n) noexcept nogil
cdef int read_compressed(Q2 *q, uint64_t e, uint64_t in_c, uint8_t *buf,
                         uint64_t n) noexcept nogil
cdef int put_compressed(Q2 *q, uint64_t offset, const uint8_t *data,
                        uint64_t n) noexcept nogil
cdef size_t scan_runs(const uint8_t *p, size_t n, size_t granule, size_t *out) noexcept nogil
