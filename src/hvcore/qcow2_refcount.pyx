# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""qcow2 refcounts and allocation: the refcount table and a cache of refcount blocks (every
width from 1 to 64 bits), allocation that reuses freed clusters and grows the table, the
deferred decrements applied after the tables that dropped a reference are on disk, and the
metadata map that keeps data writes out of table clusters."""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memset

from hvcore.includes.endian cimport htobe32, htobe64
from hvcore.qcow2_cache cimport (bc_drop, bc_fill, bc_forget, bc_grow, bc_init, bc_release,
                                 bc_slot, bc_victim)
from hvcore.qcow2_io cimport (COMPRESSED, E_FULL, E_NOMEM, E_RB_ALIGN, E_RC_OVERFLOW,
                              E_RC_UNDERFLOW, MAX_HOST, OFF_MASK, RT_MASK, Q2, flush_pw,
                              pread_exact, pwrite_all, q2_fail, q2_sync, write_table)


cdef int rc_init(Q2 *q, uint64_t rt_clusters, uint64_t rb_cache) noexcept nogil:
    """Allocate the refcount table and block cache (the table is read by the caller)."""
    q.rt_n = (rt_clusters << q.cluster_bits) // 8
    if rb_cache == 0:
        rb_cache = 4 << 20
    q.rt = <uint64_t*>calloc(q.rt_n, 8)
    if q.rt == NULL:
        return -1
    return bc_init(&q.rb, <int32_t>max(4, rb_cache >> q.cluster_bits), q.rt_n)


cdef void rc_release(Q2 *q) noexcept nogil:
    bc_release(&q.rb)
    free(q.rt)
    free(q.meta)
    free(q.frees)
    q.rt = q.frees = NULL
    q.meta = NULL


# -- metadata map ---------------------------------------------------------------------------

cdef int meta_set(Q2 *q, uint64_t c, uint64_t n, bint on) noexcept nogil:
    """Mark clusters [c, c+n) as metadata (or not); returns how many were already set."""
    cdef uint64_t want, i, hits = 0
    cdef uint8_t *grown
    if c + n > q.meta_n:
        want = max(c + n, q.meta_n * 2, 4096)
        want = (want + 7) & ~7ULL
        grown = <uint8_t*>realloc(q.meta, want // 8)
        if grown == NULL:
            return q2_fail(q, E_NOMEM, 0, 0)
        memset(grown + q.meta_n // 8, 0, (want - q.meta_n) // 8)
        q.meta = grown
        q.meta_n = want
    for i in range(c, c + n):
        if (q.meta[i >> 3] >> (i & 7)) & 1:
            hits += 1
        if on:
            q.meta[i >> 3] |= <uint8_t>(1 << (i & 7))
        else:
            q.meta[i >> 3] &= <uint8_t>~(1 << (i & 7))
    return <int>min(hits, 0x7fffffff)


# -- refcount block cache -------------------------------------------------------------------

cdef int write_rb_slot(Q2 *q, int32_t s) noexcept nogil:
    if pwrite_all(q, q.rb.buf[s], q.cluster_size, q.rt[q.rb.idx[s]] & RT_MASK) < 0:
        return -1
    q.rb.dirty[s] = 0
    return 0


cdef int32_t rb_victim(Q2 *q) noexcept nogil:
    cdef int32_t best = bc_victim(&q.rb)
    if q.rb.idx[best] >= 0 and q.rb.dirty[best] and write_rb_slot(q, best) < 0:
        return -1
    if bc_drop(&q.rb, best, q.cluster_size) < 0:
        return q2_fail(q, E_NOMEM, 0, 0)
    return best


cdef int32_t rb_get(Q2 *q, uint64_t rti, bint create) noexcept nogil:
    """Cache slot of refcount block `rti`; -2 when it does not exist and `create` is
    false; -1 on error."""
    cdef int32_t s
    cdef uint64_t off
    if rti >= q.rt_n:
        if not create:
            return -2
        if grow_rt(q, rti) < 0:
            return -1
    s = bc_slot(&q.rb, rti)
    if s >= 0:
        return s
    off = q.rt[rti] & RT_MASK
    if off == 0:
        if not create:
            return -2
        return new_refblock(q, rti)
    if off & q.cmask:
        return q2_fail(q, E_RB_ALIGN, rti, off)
    s = rb_victim(q)
    if s < 0:
        return -1
    if pread_exact(q, q.rb.buf[s], q.cluster_size, off) < 0:
        return -1
    bc_fill(&q.rb, s, rti, False)
    return s


cdef int64_t rc_get(Q2 *q, uint64_t c) noexcept nogil:
    cdef int32_t s = rb_get(q, c >> q.rb_bits, False)
    if s == -2:
        return 0
    if s < 0:
        return -1
    return <int64_t>rc_read(q.rb.buf[s], q.refcount_order, c & ((1ULL << q.rb_bits) - 1))


cdef int rc_set(Q2 *q, uint64_t c, uint64_t v) noexcept nogil:
    cdef int32_t s = rb_get(q, c >> q.rb_bits, True)
    if s < 0:
        return -1
    rc_write(q.rb.buf[s], q.refcount_order, c & ((1ULL << q.rb_bits) - 1), v)
    q.rb.dirty[s] = 1
    return 0


cdef int rc_inc(Q2 *q, uint64_t c) noexcept nogil:
    cdef int64_t v = rc_get(q, c)
    if v < 0:
        return -1
    if <uint64_t>v >= q.rc_max:
        return q2_fail(q, E_RC_OVERFLOW, c << q.cluster_bits, 0)
    return rc_set(q, c, v + 1)


cdef int64_t stored_rc(Q2 *q, uint64_t c) noexcept nogil:
    """Refcount on disk, 0 where the refcount structure itself is broken (check)."""
    cdef uint64_t rti = c >> q.rb_bits, off
    if rti >= q.rt_n:
        return 0
    off = q.rt[rti] & RT_MASK
    if off == 0 or off & q.cmask or off + q.cluster_size > q.file_end:
        return 0
    return rc_get(q, c)


# -- allocation -----------------------------------------------------------------------------

cdef bint excluded(Q2 *q, uint64_t c) noexcept nogil:
    cdef int i
    for i in range(q.nex):
        if q.ex_lo[i] <= c < q.ex_hi[i]:
            return True
    return False


cdef int push_ex(Q2 *q, uint64_t lo, uint64_t hi) noexcept nogil:
    """Keep [lo, hi) out of allocations while their refcounts are being set."""
    if q.nex >= 8:
        return q2_fail(q, E_NOMEM, 0, 0)
    q.ex_lo[q.nex] = lo
    q.ex_hi[q.nex] = hi
    q.nex += 1
    return 0


cdef int64_t find_free(Q2 *q, uint64_t start, uint64_t n) noexcept nogil:
    """First cluster index of `n` free clusters at or after `start`."""
    cdef uint64_t c = start, run = 0
    cdef int64_t v
    while run < n:
        if (c + 1) << q.cluster_bits > MAX_HOST:
            return q2_fail(q, E_FULL, 0, 0)
        v = rc_get(q, c)
        if v < 0:
            return -1
        if v == 0 and not excluded(q, c) and not is_meta(q, c) and \
                (q.chk_refs == NULL or c >= q.chk_n or q.chk_refs[c] == 0):
            run += 1
        else:
            run = 0
        c += 1
    return <int64_t>(c - n)


cdef int64_t alloc(Q2 *q, uint64_t n) noexcept nogil:
    """Allocate `n` contiguous clusters (refcount 1); returns the host offset."""
    cdef int64_t start = find_free(q, q.free_hint, n)
    cdef uint64_t c
    if start < 0:
        return -1
    if push_ex(q, start, start + n) < 0:
        return -1
    for c in range(<uint64_t>start, <uint64_t>start + n):
        if rc_set(q, c, 1) < 0:
            q.nex -= 1
            return -1
    q.nex -= 1
    # nothing below the hint is free; for one cluster that holds up to `start` too (a
    # hint left on a cluster used by a refcount block or table would make every later
    # allocation rescan everything allocated since)
    if <uint64_t>start == q.free_hint or n == 1:
        q.free_hint = start + n
    return start << q.cluster_bits


cdef int32_t new_refblock(Q2 *q, uint64_t rti) noexcept nogil:
    """Create refcount block `rti`, placed inside the range it describes when it can."""
    cdef uint64_t lo = rti << q.rb_bits
    cdef uint64_t hi = lo + (1ULL << q.rb_bits)
    cdef uint64_t c = lo
    cdef int64_t f
    cdef int32_t s
    cdef bint inside = True
    while c < hi and (excluded(q, c) or is_meta(q, c)):
        c += 1
    if c >= hi:
        inside = False
        f = find_free(q, hi, 1)
        if f < 0:
            return -1
        c = f
    s = rb_victim(q)
    if s < 0:
        return -1
    memset(q.rb.buf[s], 0, q.cluster_size)
    q.rt[rti] = c << q.cluster_bits
    q.rt_dirty = True
    bc_fill(&q.rb, s, rti, True)
    if meta_set(q, c, 1, True) < 0:
        return -1
    if inside:
        rc_write(q.rb.buf[s], q.refcount_order, c - lo, 1)
    else:
        if push_ex(q, c, c + 1) < 0 or rc_set(q, c, 1) < 0:
            return -1
        q.nex -= 1
        s = q.rb.slot_of[rti]
    return s


cdef int grow_rt(Q2 *q, uint64_t need) noexcept nogil:
    """Move the refcount table to the end of the file, large enough for block `need`."""
    cdef uint64_t per = q.cluster_size // 8
    cdef uint64_t t, T, n, c, i, old_off = q.rt_offset, old_n = q.rt_n
    cdef uint64_t *nrt
    cdef int k
    t = max(q.rt_n << q.rb_bits, (q.file_end + q.cmask) >> q.cluster_bits)
    for k in range(q.nex):
        t = max(t, q.ex_hi[k])
    n = max(need + 1, q.rt_n * 2)
    while True:
        T = (n + per - 1) // per
        if ((t + T + 2) >> q.rb_bits) + 1 <= n:
            break
        n = ((t + T + 2) >> q.rb_bits) + 1
    n = T * per
    nrt = <uint64_t*>calloc(n, 8)
    if nrt == NULL or bc_grow(&q.rb, n) < 0:
        free(nrt)
        return q2_fail(q, E_NOMEM, 0, 0)
    memcpy(nrt, q.rt, q.rt_n * 8)
    free(q.rt)
    q.rt = nrt
    q.rt_n = n
    q.rt_offset = t << q.cluster_bits
    q.rt_dirty = q.rt_moved = True
    if meta_set(q, t, T, True) < 0 or push_ex(q, t, t + T) < 0:
        return -1
    for c in range(t, t + T):
        if rc_set(q, c, 1) < 0:
            return -1
    q.nex -= 1
    for c in range(old_off >> q.cluster_bits,
                   (old_off >> q.cluster_bits) + (old_n * 8 + q.cmask) // q.cluster_size):
        if add_free(q, c) < 0:
            return -1
    return 0


# -- deferred frees -------------------------------------------------------------------------

cdef int add_free(Q2 *q, uint64_t c) noexcept nogil:
    """Drop one reference to cluster `c` at the next flush, after the tables that no
    longer name it are on disk."""
    cdef uint64_t *grown
    if q.nfrees == q.cap_frees:
        q.cap_frees = max(64, q.cap_frees * 2)
        grown = <uint64_t*>realloc(q.frees, q.cap_frees * 8)
        if grown == NULL:
            return q2_fail(q, E_NOMEM, 0, 0)
        q.frees = grown
    q.frees[q.nfrees] = c
    q.nfrees += 1
    return 0


cdef int free_entry(Q2 *q, uint64_t e) noexcept nogil:
    """Schedule the host clusters an L2 entry references to lose that reference."""
    cdef uint64_t coff, nsect, first, last, c
    if e & COMPRESSED:
        coff = e & ((1ULL << q.csize_shift) - 1)
        nsect = ((e >> q.csize_shift) & q.csize_mask) + 1
        first = coff >> q.cluster_bits
        last = ((coff & ~511ULL) + nsect * 512 - 1) >> q.cluster_bits
        for c in range(first, last + 1):
            if add_free(q, c) < 0:
                return -1
        return 0
    if e & OFF_MASK:
        return add_free(q, (e & OFF_MASK) >> q.cluster_bits)
    return 0


cdef int apply_frees(Q2 *q) noexcept nogil:
    """Apply the decrements queued by add_free (the last step of a flush)."""
    cdef size_t i
    cdef int64_t v
    cdef uint64_t c
    if q.nfrees == 0:
        return 0
    for i in range(q.nfrees):
        c = q.frees[i]
        v = rc_get(q, c)
        if v < 0:
            return -1
        if v == 0:
            q.nfrees = 0
            return q2_fail(q, E_RC_UNDERFLOW, c << q.cluster_bits, 0)
        if rc_set(q, c, v - 1) < 0:
            return -1
        if v == 1:
            meta_set(q, c, 1, False)
            if c < q.free_hint:
                q.free_hint = c
    q.nfrees = 0
    q.cfree = 0
    q.dkey = 0
    if write_refcounts(q, False) < 0 or q2_sync(q) < 0:
        return -1
    return 0


cdef int write_refcounts(Q2 *q, bint barrier) noexcept nogil:
    """Write dirty refcount blocks and the table (moved: then the header fields too)."""
    cdef int32_t s
    cdef uint64_t i
    cdef uint32_t clusters
    if barrier:
        if flush_pw(q) < 0 or q2_sync(q) < 0:
            return -1
    for s in range(q.rb.slots):
        if q.rb.idx[s] >= 0 and q.rb.dirty[s] and write_rb_slot(q, s) < 0:
            return -1
    if q.rt_dirty:
        if write_table(q, q.rt, q.rt_n, q.rt_offset) < 0:
            return -1
        q.rt_dirty = False
        if q.rt_moved:
            if q2_sync(q) < 0:
                return -1
            i = htobe64(q.rt_offset)
            clusters = htobe32(<uint32_t>((q.rt_n * 8) >> q.cluster_bits))
            if pwrite_all(q, &i, 8, 48) < 0 or pwrite_all(q, &clusters, 4, 56) < 0:
                return -1
            q.rt_moved = False
    return 0


# -- rebuild --------------------------------------------------------------------------------

cdef int rebuild_refcounts(Q2 *q, const uint32_t *refs, uint64_t nb) noexcept nogil:
    """Replace the refcount table and blocks with new ones built from `refs` (the counted
    references of host clusters [0, nb)), placed at the end of the file as qemu-img's
    "Rebuilding refcount structure" places them when every earlier cluster is counted:
    blocks, then the table; written and synced before the header points at them. The old
    structure is left behind unreferenced (the caller repairs it as leaked clusters)."""
    cdef uint64_t per = 1ULL << q.rb_bits
    cdef uint64_t nblk = 0, ntc = 1, nb2, nt2, c, i, v, rt_n
    cdef uint8_t *blocks
    cdef uint64_t *table
    cdef uint64_t *rt_host
    cdef uint64_t be_off
    cdef uint32_t be_n
    while True:
        nb2 = (nb + nblk + ntc + per - 1) // per
        nt2 = max(1, (nb2 * 8 + q.cmask) >> q.cluster_bits)
        if nb2 == nblk and nt2 == ntc:
            break
        nblk, ntc = nb2, nt2
    if (nb + nblk + ntc) << q.cluster_bits > MAX_HOST:
        return q2_fail(q, E_FULL, 0, 0)
    rt_n = (ntc << q.cluster_bits) // 8
    blocks = <uint8_t*>calloc(nblk, q.cluster_size)
    table = <uint64_t*>calloc(rt_n, 8)
    rt_host = <uint64_t*>calloc(rt_n, 8)
    if blocks == NULL or table == NULL or rt_host == NULL or bc_grow(&q.rb, rt_n) < 0:
        free(blocks)
        free(table)
        free(rt_host)
        return q2_fail(q, E_NOMEM, 0, 0)
    for c in range(nb + nblk + ntc):
        v = 1 if c >= nb else min(<uint64_t>refs[c], q.rc_max)
        if v:
            rc_write(blocks + (c >> q.rb_bits) * q.cluster_size, q.refcount_order,
                     c & (per - 1), v)
    for i in range(rt_n):
        if i < nblk:
            rt_host[i] = (nb + i) << q.cluster_bits
            table[i] = htobe64(rt_host[i])
    be_off = htobe64((nb + nblk) << q.cluster_bits)
    be_n = htobe32(<uint32_t>ntc)
    if pwrite_all(q, blocks, nblk << q.cluster_bits, nb << q.cluster_bits) < 0 or \
            pwrite_all(q, table, ntc << q.cluster_bits, (nb + nblk) << q.cluster_bits) < 0 or \
            q2_sync(q) < 0 or pwrite_all(q, &be_off, 8, 48) < 0 or \
            pwrite_all(q, &be_n, 4, 56) < 0 or q2_sync(q) < 0:
        free(blocks)
        free(table)
        free(rt_host)
        return -1
    free(blocks)
    free(table)
    free(q.rt)
    q.rt = rt_host
    q.rt_n = rt_n
    q.rt_offset = (nb + nblk) << q.cluster_bits
    q.rt_dirty = q.rt_moved = False
    bc_forget(&q.rb)                    # cached blocks describe the old structure
    q.free_hint = 0
    return meta_set(q, nb, nblk + ntc, True)
