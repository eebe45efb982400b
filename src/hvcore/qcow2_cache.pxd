# One cache of table blocks (L2 tables under the L1 table, refcount blocks under the
# refcount table): cluster-sized buffers in `slots`, least recently used out first, each
# slot holding the block named by one entry of its parent table.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t


ctypedef struct BlockCache:
    int32_t slots
    uint8_t **buf              # per slot, allocated on first use
    int64_t *idx               # per slot: the parent-table entry it holds, or -1
    uint64_t *tick             # per slot: when it was last used
    uint8_t *dirty             # per slot: changed since it was written
    int32_t *slot_of           # per parent-table entry: its slot, or -1
    uint64_t n                 # parent-table entries slot_of covers
    uint64_t clock


cdef int bc_init(BlockCache *c, int32_t slots, uint64_t n) noexcept nogil
cdef void bc_release(BlockCache *c) noexcept nogil
cdef int bc_grow(BlockCache *c, uint64_t n) noexcept nogil
cdef int32_t bc_victim(BlockCache *c) noexcept nogil
cdef int bc_drop(BlockCache *c, int32_t s, uint64_t size) noexcept nogil
cdef void bc_forget(BlockCache *c) noexcept nogil


cdef inline int32_t bc_slot(BlockCache *c, uint64_t i) noexcept nogil:
    """The slot holding the block of parent entry `i` (now most recently used), or -1."""
    cdef int32_t s = c.slot_of[i]
    if s >= 0:
        c.clock += 1
        c.tick[s] = c.clock
    return s


cdef inline void bc_fill(BlockCache *c, int32_t s, uint64_t i, bint dirty) noexcept nogil:
    """Slot `s` (emptied by bc_drop) now holds the block of parent entry `i`."""
    c.slot_of[i] = s
    c.idx[s] = <int64_t>i
    c.dirty[s] = dirty
    c.clock += 1
    c.tick[s] = c.clock
