# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Internal snapshots' refcount work (QEMU's qcow2_update_snapshot_refcount): a snapshot
shares L2 tables and data clusters with the active table, so taking one adds a reference
to every cluster an L1 table names, dropping one takes them away, and the active L1 and L2
entries carry the COPIED flag exactly where a cluster's refcount is 1 (the write path then
copies the shared ones). Callers flush first: tables are read from and written to the file,
and the L2 cache is dropped afterwards."""

from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport free, malloc

from hvcore.includes.endian cimport be64toh, htobe64
from hvcore.qcow2_cache cimport bc_drop
from hvcore.qcow2_io cimport (COMPRESSED, COPIED, E_NOMEM, E_RC_OVERFLOW, E_RC_UNDERFLOW,
                              OFF_MASK, Q2, pread_exact, pwrite_all, q2_fail)
from hvcore.qcow2_refcount cimport meta_set, rc_get, rc_set, write_refcounts


cdef int rc_add(Q2 *q, uint64_t c, int delta) noexcept nogil:
    """Refcount of cluster `c` plus `delta`; a cluster dropping to 0 is free again."""
    cdef int64_t v = rc_get(q, c)
    if v < 0:
        return -1
    if delta > 0 and <uint64_t>v + <uint64_t>delta > q.rc_max:
        return q2_fail(q, E_RC_OVERFLOW, c << q.cluster_bits, 0)
    if delta < 0 and v < -delta:
        return q2_fail(q, E_RC_UNDERFLOW, c << q.cluster_bits, 0)
    if rc_set(q, c, <uint64_t>(v + delta)) < 0:
        return -1
    if v + delta == 0:
        meta_set(q, c, 1, False)
        if c < q.free_hint:
            q.free_hint = c
    return 0


cdef int entry_refs(Q2 *q, uint64_t e, int delta) noexcept nogil:
    """`delta` for the host clusters one L2 entry references (a compressed one may span
    two)."""
    cdef uint64_t coff, nsect, c, last
    if e & COMPRESSED:
        coff = e & ((1ULL << q.csize_shift) - 1)
        nsect = ((e >> q.csize_shift) & q.csize_mask) + 1
        last = ((coff & ~511ULL) + nsect * 512 - 1) >> q.cluster_bits
        for c in range(coff >> q.cluster_bits, last + 1):
            if rc_add(q, c, delta) < 0:
                return -1
        return 0
    if e & OFF_MASK:
        return rc_add(q, (e & OFF_MASK) >> q.cluster_bits, delta)
    return 0


cdef int add_refs(Q2 *q, const uint64_t *l1, uint64_t n, int delta) noexcept nogil:
    """`delta` (+1 or -1) for every L2 table the `n` L1 entries (big-endian, as in the
    file) name and every cluster those tables reference; the refcounts are written."""
    cdef uint64_t *l2t = <uint64_t*>malloc(q.cluster_size)
    cdef uint64_t i, j, off
    cdef int rc = 0
    if l2t == NULL:
        return q2_fail(q, E_NOMEM, 0, 0)
    for i in range(n):
        off = be64toh(l1[i]) & OFF_MASK
        if off == 0:
            continue
        rc = pread_exact(q, l2t, q.cluster_size, off)
        j = 0
        while rc == 0 and j < (1ULL << q.l2_bits):
            rc = entry_refs(q, be64toh(l2t[j * q.ewords]), delta)
            j += 1
        if rc == 0:
            rc = rc_add(q, off >> q.cluster_bits, delta)
        if rc < 0:
            break
    free(l2t)
    if rc == 0:
        rc = write_refcounts(q, True)
    return rc


cdef uint64_t copied(Q2 *q, uint64_t e, int64_t refcount) noexcept nogil:
    return (e | COPIED) if refcount == 1 else (e & ~COPIED)


cdef int fix_copied(Q2 *q) noexcept nogil:
    """COPIED on the active L1 and L2 entries whose cluster has refcount 1, cleared on
    the others (compressed entries never carry it); drops the L2 cache."""
    cdef uint64_t *l2t = <uint64_t*>malloc(q.cluster_size)
    cdef uint64_t i, j, off, e, ne
    cdef int64_t r
    cdef int32_t s
    cdef bint changed
    cdef int rc = 0
    if l2t == NULL:
        return q2_fail(q, E_NOMEM, 0, 0)
    for s in range(q.l2.slots):         # the caller flushed: nothing dirty is lost
        if q.l2.idx[s] >= 0 and bc_drop(&q.l2, s, q.cluster_size) < 0:
            free(l2t)
            return q2_fail(q, E_NOMEM, 0, 0)
    for i in range(q.l1_size):
        off = q.l1[i] & OFF_MASK
        if off == 0:
            continue
        rc = pread_exact(q, l2t, q.cluster_size, off)
        if rc < 0:
            break
        changed = False
        for j in range(1ULL << q.l2_bits):
            e = be64toh(l2t[j * q.ewords])
            if e & COMPRESSED:
                continue
            r = rc_get(q, (e & OFF_MASK) >> q.cluster_bits) if e & OFF_MASK else 0
            if r < 0:
                rc = -1
                break
            ne = copied(q, e, r)
            if ne != e:
                l2t[j * q.ewords] = htobe64(ne)
                changed = True
        if rc == 0 and changed:
            rc = pwrite_all(q, l2t, q.cluster_size, off)
        r = rc_get(q, off >> q.cluster_bits) if rc == 0 else -1
        if r < 0:
            rc = -1
            break
        ne = copied(q, q.l1[i], r)
        if ne != q.l1[i]:
            q.l1[i] = ne
            q.l1_dirty = True
    free(l2t)
    return rc
