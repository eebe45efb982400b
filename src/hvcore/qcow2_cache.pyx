# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The block cache shared by the L2 table cache (qcow2_l2) and the refcount block cache
(qcow2_refcount): one structure, so both evict, grow and forget alike. Writing a dirty
block back is the owner's business (the order of metadata writes differs): bc_victim
names the slot, the owner writes it if dirty, bc_drop empties it."""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc


cdef int bc_init(BlockCache *c, int32_t slots, uint64_t n) noexcept nogil:
    """`slots` empty slots for a parent table of `n` entries; -1 when out of memory (what
    was allocated is freed by bc_release)."""
    cdef int32_t s
    c.slots = slots
    c.buf = <uint8_t**>calloc(slots, sizeof(uint8_t*))
    c.idx = <int64_t*>malloc(slots * sizeof(int64_t))
    c.tick = <uint64_t*>calloc(slots, sizeof(uint64_t))
    c.dirty = <uint8_t*>calloc(slots, 1)
    c.slot_of = NULL
    c.n = 0
    c.clock = 0
    if not (c.buf and c.idx and c.tick and c.dirty):
        return -1
    for s in range(slots):
        c.idx[s] = -1
    return bc_grow(c, n if n else 1)


cdef void bc_release(BlockCache *c) noexcept nogil:
    cdef int32_t s
    if c.buf:
        for s in range(c.slots):
            free(c.buf[s])
    free(c.buf)
    free(c.idx)
    free(c.tick)
    free(c.dirty)
    free(c.slot_of)
    c.buf = NULL
    c.idx = NULL
    c.tick = NULL
    c.dirty = NULL
    c.slot_of = NULL
    c.slots = 0
    c.n = 0


cdef int bc_grow(BlockCache *c, uint64_t n) noexcept nogil:
    """Cover a parent table of `n` entries (the new ones hold nothing); -1 when out of
    memory, the cache unchanged."""
    cdef int32_t *grown
    cdef uint64_t i
    if n <= c.n:
        return 0
    grown = <int32_t*>realloc(c.slot_of, n * sizeof(int32_t))
    if grown == NULL:
        return -1
    for i in range(c.n, n):
        grown[i] = -1
    c.slot_of = grown
    c.n = n
    return 0


cdef int32_t bc_victim(BlockCache *c) noexcept nogil:
    """The slot to load a block into: an empty one, else the least recently used (its
    block still there, for the owner to write back when dirty before bc_drop)."""
    cdef int32_t s, best = 0
    for s in range(c.slots):
        if c.idx[s] < 0:
            return s
        if c.tick[s] < c.tick[best]:
            best = s
    return best


cdef int bc_drop(BlockCache *c, int32_t s, uint64_t size) noexcept nogil:
    """Empty slot `s` (its block is forgotten, not written) and make sure it has a buffer
    of `size` bytes; -1 when out of memory."""
    if c.idx[s] >= 0:
        c.slot_of[c.idx[s]] = -1
        c.idx[s] = -1
    c.dirty[s] = 0
    if c.buf[s] == NULL:
        c.buf[s] = <uint8_t*>malloc(size)
        if c.buf[s] == NULL:
            return -1
    return 0


cdef void bc_forget(BlockCache *c) noexcept nogil:
    """Empty every slot without writing (the blocks describe a structure that was
    replaced); the buffers stay for reuse."""
    cdef int32_t s
    cdef uint64_t i
    for s in range(c.slots):
        c.idx[s] = -1
        c.dirty[s] = 0
    for i in range(c.n):
        c.slot_of[i] = -1
