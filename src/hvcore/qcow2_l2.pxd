# The L1 table, the L2 table cache, guest-offset classification and the crash-safe flush
# (and write-back).
from libc.stdint cimport int32_t, uint64_t

from hvcore.qcow2_io cimport Q2


cdef int l2_init(Q2 *q, uint64_t l2_cache) noexcept nogil
cdef void l2_release(Q2 *q) noexcept nogil
cdef int32_t l2_get(Q2 *q, uint64_t l1i, bint write) noexcept nogil
cdef uint64_t l2_entry(Q2 *q, int32_t s, uint64_t l2i) noexcept nogil
cdef uint64_t l2_bitmap(Q2 *q, int32_t s, uint64_t l2i) noexcept nogil
cdef int set_entry(Q2 *q, uint64_t gc, uint64_t e, uint64_t bm) noexcept nogil
cdef int classify(Q2 *q, uint64_t goff, uint64_t maxlen, uint64_t *plen,
                  uint64_t *phost) noexcept nogil
cdef int l1_grow(Q2 *q, uint64_t new_size) noexcept nogil
cdef int do_flush(Q2 *q) noexcept nogil
cdef int do_write_back(Q2 *q) noexcept nogil
