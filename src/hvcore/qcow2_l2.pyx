# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""qcow2 cluster mapping: the L1 table, an L2 table cache (LRU, whole disk by default),
copy of L2 tables shared with snapshots before a change, classification of guest offsets
(data, zero, unallocated, compressed; extended L2 subcluster bitmaps), and the flush that
writes metadata back in QEMU's order: data, barrier, refcounts, barrier, L2 tables, barrier,
L1, barrier, then the deferred refcount decrements."""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

from hvcore.includes.endian cimport be64toh, htobe32, htobe64
from hvcore.qcow2_cache cimport (bc_drop, bc_fill, bc_grow, bc_init, bc_release, bc_slot,
                                 bc_victim)
from hvcore.qcow2_io cimport (ALL_ALLOC, COMPRESSED, COPIED, E_BITMAP, E_DATA_ALIGN,
                              E_L1_RANGE, E_L2_ALIGN, E_NOMEM, K_COMP, K_DATA, K_UNALLOC,
                              K_ZERO, OFF_MASK, Q2, ZEROF, flush_pw, pread_exact, pwrite_all,
                              q2_drain, q2_fail, q2_sync, write_table)
from hvcore.qcow2_refcount cimport (add_free, alloc, apply_frees, meta_set,
                                    write_refcounts)


cdef int l2_init(Q2 *q, uint64_t l2_cache) noexcept nogil:
    """Allocate the L1 table and the L2 cache (the table is read by the caller)."""
    cdef uint64_t n = max(q.l1_size, 1)
    if l2_cache == 0:
        l2_cache = n << q.cluster_bits      # the whole disk
    q.l1 = <uint64_t*>calloc(n, 8)
    if q.l1 == NULL:
        return -1
    return bc_init(&q.l2, <int32_t>max(4, min(l2_cache >> q.cluster_bits, n)), n)


cdef void l2_release(Q2 *q) noexcept nogil:
    bc_release(&q.l2)
    free(q.l1)
    q.l1 = NULL


# -- L2 cache -------------------------------------------------------------------------------

cdef int write_l2_slot(Q2 *q, int32_t s) noexcept nogil:
    cdef uint64_t off = q.l1[q.l2.idx[s]] & OFF_MASK
    if pwrite_all(q, q.l2.buf[s], q.cluster_size, off) < 0:
        return -1
    q.l2.dirty[s] = 0
    return 0


cdef int32_t l2_victim(Q2 *q) noexcept nogil:
    cdef int32_t best = bc_victim(&q.l2)
    if q.l2.idx[best] >= 0 and q.l2.dirty[best]:
        # what this table references must be on disk before the table
        if write_refcounts(q, True) < 0 or write_l2_slot(q, best) < 0:
            return -1
    if bc_drop(&q.l2, best, q.cluster_size) < 0:
        return q2_fail(q, E_NOMEM, 0, 0)
    return best


cdef int32_t l2_get(Q2 *q, uint64_t l1i, bint write) noexcept nogil:
    """Cache slot of the L2 table for L1 index `l1i`; -2 when there is none and `write`
    is false; -1 on error. With `write` the table is allocated or copied (when shared
    with a snapshot) so the caller may change it."""
    cdef uint64_t e = q.l1[l1i]
    cdef uint64_t off = e & OFF_MASK
    cdef int32_t s = bc_slot(&q.l2, l1i)
    cdef int64_t new
    if s >= 0:
        if not write or (e & COPIED):
            return s
    else:
        if off == 0 and not write:
            return -2
        if off & q.cmask:
            return q2_fail(q, E_L2_ALIGN, l1i, off)
        s = l2_victim(q)
        if s < 0:
            return -1
        if off:
            if pread_exact(q, q.l2.buf[s], q.cluster_size, off) < 0:
                return -1
        else:
            memset(q.l2.buf[s], 0, q.cluster_size)
        bc_fill(&q.l2, s, l1i, False)
        if not write or (off and (e & COPIED)):
            return s
    new = alloc(q, 1)
    if new < 0:
        return -1
    if meta_set(q, <uint64_t>new >> q.cluster_bits, 1, True) < 0:
        return -1
    if off:
        add_free(q, off >> q.cluster_bits)     # the snapshot keeps the old copy
    q.l1[l1i] = <uint64_t>new | COPIED
    q.l1_dirty = True
    q.l2.dirty[s] = 1
    return s


cdef uint64_t l2_entry(Q2 *q, int32_t s, uint64_t l2i) noexcept nogil:
    """L2 entry `l2i` of cache slot `s`, host order."""
    return be64toh((<uint64_t*>q.l2.buf[s])[l2i * q.ewords])


cdef uint64_t l2_bitmap(Q2 *q, int32_t s, uint64_t l2i) noexcept nogil:
    """Subcluster bitmap of entry `l2i` (0 without extended L2 entries)."""
    if not q.extended:
        return 0
    return be64toh((<uint64_t*>q.l2.buf[s])[l2i * 2 + 1])


cdef int set_entry(Q2 *q, uint64_t gc, uint64_t e, uint64_t bm) noexcept nogil:
    cdef int32_t s = l2_get(q, gc >> q.l2_bits, True)
    cdef uint64_t l2i = gc & ((1ULL << q.l2_bits) - 1)
    if s < 0:
        return -1
    (<uint64_t*>q.l2.buf[s])[l2i * q.ewords] = htobe64(e)
    if q.extended:
        (<uint64_t*>q.l2.buf[s])[l2i * 2 + 1] = htobe64(bm)
    q.l2.dirty[s] = 1
    return 0


# -- mapping --------------------------------------------------------------------------------

cdef int classify(Q2 *q, uint64_t goff, uint64_t maxlen, uint64_t *plen,
                  uint64_t *phost) noexcept nogil:
    """Kind of the bytes at guest offset `goff` and how many (<= maxlen) share it."""
    cdef uint64_t gc = goff >> q.cluster_bits
    cdef uint64_t in_c = goff & q.cmask
    cdef uint64_t n = min(maxlen, q.cluster_size - in_c)
    cdef uint64_t l1i = gc >> q.l2_bits
    cdef uint64_t l2i = gc & ((1ULL << q.l2_bits) - 1)
    cdef uint64_t e, off, bm, span
    cdef uint32_t sc, end_sc
    cdef int32_t s
    cdef int state
    if l1i >= q.l1_size:
        return q2_fail(q, E_L1_RANGE, goff, 0)
    s = l2_get(q, l1i, False)
    if s == -2:
        span = ((l1i + 1) << (q.l2_bits + q.cluster_bits)) - goff
        plen[0] = min(maxlen, span)
        return K_UNALLOC
    if s < 0:
        return -1
    e = l2_entry(q, s, l2i)
    plen[0] = n
    if e & COMPRESSED:
        phost[0] = e
        return K_COMP
    off = e & OFF_MASK
    phost[0] = 0                # a zero cluster's host: only when it keeps its allocation
    if not q.extended:
        if (e & ZEROF) and q.v3:
            if off and not (off & q.cmask):
                phost[0] = off + in_c
            return K_ZERO
        if off == 0:
            return K_UNALLOC
        if off & q.cmask:
            return q2_fail(q, E_DATA_ALIGN, goff, off)
        phost[0] = off + in_c
        return K_DATA
    bm = l2_bitmap(q, s, l2i)
    if (bm & (bm >> 32)) & ALL_ALLOC or (off == 0 and bm & ALL_ALLOC):
        return q2_fail(q, E_BITMAP, goff, bm)
    sc = <uint32_t>(in_c >> q.sc_bits)
    state = ((bm >> sc) & 1) | (((bm >> (32 + sc)) & 1) << 1)
    end_sc = sc + 1
    while end_sc < 32 and (((bm >> end_sc) & 1) | (((bm >> (32 + end_sc)) & 1) << 1)) == state:
        end_sc += 1
    plen[0] = min(n, (<uint64_t>end_sc << q.sc_bits) - in_c)
    if state == 1:
        if off & q.cmask:
            return q2_fail(q, E_DATA_ALIGN, goff, off)
        phost[0] = off + in_c
        return K_DATA
    if state == 2 and off and not (off & q.cmask):
        phost[0] = off + in_c
    return K_ZERO if state == 2 else K_UNALLOC


# -- L1 table -------------------------------------------------------------------------------

cdef int l1_grow(Q2 *q, uint64_t new_size) noexcept nogil:
    """Move the L1 table to a new one of `new_size` entries (written on the next flush)."""
    cdef uint64_t n, i, old_off = q.l1_offset, old_n = q.l1_size
    cdef int64_t new
    cdef uint64_t *nl1
    n = (new_size * 8 + q.cmask) >> q.cluster_bits
    nl1 = <uint64_t*>calloc(new_size, 8)
    if nl1 == NULL or bc_grow(&q.l2, new_size) < 0:
        free(nl1)
        return q2_fail(q, E_NOMEM, 0, 0)
    memcpy(nl1, q.l1, q.l1_size * 8)
    new = alloc(q, n)
    if new < 0:
        free(nl1)
        return -1
    meta_set(q, <uint64_t>new >> q.cluster_bits, n, True)
    free(q.l1)
    q.l1 = nl1
    q.l1_size = new_size
    q.l1_offset = <uint64_t>new
    q.l1_dirty = q.l1_moved = True
    if old_off and old_n:
        for i in range(old_off >> q.cluster_bits,
                       ((old_off + old_n * 8 - 1) >> q.cluster_bits) + 1):
            add_free(q, i)
    return 0


cdef int write_l1(Q2 *q) noexcept nogil:
    cdef uint64_t off
    cdef uint32_t n
    if write_table(q, q.l1, q.l1_size, q.l1_offset) < 0:
        return -1
    if q.l1_moved:
        if q2_sync(q) < 0:
            return -1
        n = htobe32(<uint32_t>q.l1_size)
        off = htobe64(q.l1_offset)
        if pwrite_all(q, &n, 4, 36) < 0 or pwrite_all(q, &off, 8, 40) < 0:
            return -1
        q.l1_moved = False
    q.l1_dirty = False
    return 0


# -- flush ----------------------------------------------------------------------------------

cdef int do_flush(Q2 *q) noexcept nogil:
    """Write back cached metadata in crash-safe order, then apply deferred frees (the
    caller holds the lock; reads and writes running outside it finish first, so no
    cluster they were mapped to is reused under them)."""
    cdef int32_t s
    cdef bint any_l2 = False
    if q.readonly:
        return 0
    if write_refcounts(q, True) < 0 or q2_sync(q) < 0:
        return -1
    for s in range(q.l2.slots):
        if q.l2.idx[s] >= 0 and q.l2.dirty[s]:
            if write_l2_slot(q, s) < 0:
                return -1
            any_l2 = True
    if any_l2 and q2_sync(q) < 0:
        return -1
    if q.l1_dirty:
        if write_l1(q) < 0 or q2_sync(q) < 0:
            return -1
    if q.nfrees:
        q2_drain(q)
    return apply_frees(q)


cdef int do_write_back(Q2 *q) noexcept nogil:
    """Cached metadata into the file, not to the disk: what a device does before it
    acknowledges a write, so a killed process loses no acknowledged write (the kernel
    keeps what was written). The order a host crash needs is kept with a barrier only
    where metadata was allocated: refcount blocks reach the disk before any L2 entry that
    uses their clusters is written, an L2 table before the L1 entry that points to it.
    (The caller holds the lock.)"""
    cdef int32_t s
    cdef bint refcounts = q.rt_dirty, l2 = False
    if q.readonly:
        return 0
    for s in range(q.rb.slots):
        refcounts = refcounts or (q.rb.idx[s] >= 0 and q.rb.dirty[s])
    for s in range(q.l2.slots):
        l2 = l2 or (q.l2.idx[s] >= 0 and q.l2.dirty[s])
    if not (refcounts or l2 or q.l1_dirty):
        return 0
    if flush_pw(q) < 0:
        return -1
    if refcounts and (write_refcounts(q, False) < 0 or q2_sync(q) < 0):
        return -1
    for s in range(q.l2.slots):
        if q.l2.idx[s] >= 0 and q.l2.dirty[s] and write_l2_slot(q, s) < 0:
            return -1
    if q.l1_dirty and (q2_sync(q) < 0 or write_l1(q) < 0):
        return -1
    return 0
