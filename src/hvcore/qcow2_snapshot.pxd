# Internal snapshots' refcount work: references of an L1 table, COPIED flags.
from libc.stdint cimport uint64_t

from hvcore.qcow2_io cimport Q2


cdef int rc_add(Q2 *q, uint64_t c, int delta) noexcept nogil
cdef int add_refs(Q2 *q, const uint64_t *l1, uint64_t n, int delta) noexcept nogil
cdef int fix_copied(Q2 *q) noexcept nogil
