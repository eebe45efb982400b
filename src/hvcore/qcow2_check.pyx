# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""qcow2 consistency check: count the references to every host cluster from the header,
refcount structures, every L1 table (active and snapshots), L2 tables and compressed
descriptors, compare with the stored refcounts and OFLAG_COPIED flags, and repair leaks
(`-r leaks`) or everything (`-r all`); messages follow qemu-img check."""

from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc

from hvcore.includes.endian cimport be64toh, htobe64
from hvcore.qcow2_io cimport (ALL_ALLOC, COMPRESSED, COPIED, OFF_MASK, Q2, RT_MASK, ZEROF,
                              pread_exact, q2_raise)
from hvcore.qcow2_l2 cimport do_flush, l2_get
from hvcore.qcow2_refcount cimport rc_set, stored_rc

cdef void ref(Q2 *q, uint32_t *refs, uint64_t nb, uint64_t off, uint64_t length,
                     list recs):
    cdef uint64_t c
    if length == 0:
        return
    if off + length > nb << q.cluster_bits:
        recs.append(("outside", off, length, 0))
        return
    for c in range(off >> q.cluster_bits, ((off + length - 1) >> q.cluster_bits) + 1):
        if refs[c] < 0xffffffffU:
            refs[c] += 1


cdef dict run_check(Q2 *q, list l1_tables, list fixed, int fix):
    """Count the references to every host cluster and compare with the refcounts.

    `l1_tables` is [(offset, entries, active)] (active first), `fixed` the other
    metadata ranges [(offset, length)] (header, snapshot table). `fix` 1 repairs leaks,
    2 everything. Returns a dict of counts and qemu-img style messages."""
    cdef uint64_t nb = (q.file_end + q.cmask) >> q.cluster_bits
    cdef uint32_t *refs
    cdef uint64_t *l1t
    cdef uint64_t *l2t
    cdef uint64_t i, j, e, off, bm, l1e, coff, nsect, csz, c, prev = 0, top = 0
    cdef int64_t stored
    cdef int rc
    cdef int32_t s
    cdef uint64_t allocated = 0, fragmented = 0, compressed = 0
    recs = []
    copied_fix = []
    if not q.readonly:
        rc = do_flush(q, )
        q2_raise(q, rc)
    refs = <uint32_t*>calloc(max(nb, 1), 4)
    l2t = <uint64_t*>malloc(q.cluster_size)
    if refs == NULL or l2t == NULL:
        free(refs)
        free(l2t)
        raise MemoryError()
    try:
        for off, length in fixed:
            ref(q, refs, nb, off, length, recs)
        ref(q, refs, nb, q.rt_offset, q.rt_n * 8, recs)
        for i in range(q.rt_n):
            off = q.rt[i] & RT_MASK
            if off == 0:
                continue
            if off & q.cmask:
                recs.append(("rb_align", i, off, 0))
            elif off + q.cluster_size > q.file_end:
                recs.append(("rb_outside", i, off, 0))
            else:
                ref(q, refs, nb, off, q.cluster_size, recs)
        for l1off, l1n, active in l1_tables:
            ref(q, refs, nb, l1off, l1n * 8, recs)
            l1t = <uint64_t*>malloc(max(l1n, 1) * 8)
            if l1t == NULL:
                raise MemoryError()
            try:
                rc = pread_exact(q, l1t, l1n * 8, l1off)
                q2_raise(q, rc)
                for i in range(l1n):
                    l1e = be64toh(l1t[i])
                    off = l1e & OFF_MASK
                    if off == 0:
                        continue
                    if off & q.cmask:
                        recs.append(("l2_align", i, off, 0))
                        continue
                    if off + q.cluster_size > q.file_end:
                        recs.append(("outside", off, q.cluster_size, 0))
                        continue
                    ref(q, refs, nb, off, q.cluster_size, recs)
                    if active:
                        stored = stored_rc(q, off >> q.cluster_bits)
                        if (stored == 1) != bool(l1e & COPIED):
                            recs.append(("copied_l2", i, l1e, stored))
                            copied_fix.append((i, -1, stored == 1))
                    rc = pread_exact(q, l2t, q.cluster_size, off)
                    q2_raise(q, rc)
                    for j in range(1ULL << q.l2_bits):
                        e = be64toh(l2t[j * q.ewords])
                        bm = be64toh(l2t[j * 2 + 1]) if q.extended else 0
                        if e & COMPRESSED:
                            coff = e & ((1ULL << q.csize_shift) - 1)
                            nsect = ((e >> q.csize_shift) & q.csize_mask) + 1
                            csz = nsect * 512 - (coff & 511)
                            if coff >= q.file_end:
                                recs.append(("outside", coff, csz, 0))
                            else:
                                ref(q, refs, nb, coff,
                                         min(csz, (nb << q.cluster_bits) - coff), recs)
                            if active:
                                allocated += 1
                                compressed += 1
                            continue
                        off = e & OFF_MASK
                        if q.extended and ((bm & (bm >> 32)) & ALL_ALLOC or
                                              (off == 0 and bm & ALL_ALLOC)):
                            recs.append(("bitmap", e, bm, 0))
                        if off == 0:
                            continue
                        if off & q.cmask:
                            recs.append(("data_align", off, 0, 0))
                            continue
                        ref(q, refs, nb, off, q.cluster_size, recs)
                        if active:
                            if not (e & ZEROF) or q.extended:
                                allocated += 1
                                if prev and off != prev + q.cluster_size:
                                    fragmented += 1
                                prev = off
                            stored = stored_rc(q, off >> q.cluster_bits)
                            if (stored == 1) != bool(e & COPIED):
                                recs.append(("copied_data", e, stored, 0))
                                copied_fix.append((i, j, stored == 1))
            finally:
                free(l1t)
        leaks = corruptions = fixed_leaks = fixed_errors = 0
        msgs = []
        for kind, a, b, d in recs:
            corruptions += 1
            msgs.append({
                "outside": lambda: "ERROR: counting reference for region exceeding the end "
                                   f"of the file by one cluster or more: offset {a:#x} "
                                   f"size {b:#x}",
                "rb_align": lambda: f"ERROR refcount block {a} is not cluster aligned; "
                                    "refcount table entry corrupted",
                "rb_outside": lambda: f"ERROR refcount block {a} is outside image",
                "l2_align": lambda: f"ERROR l2_offset={b:x}: Table is not cluster aligned; "
                                    "L1 entry corrupted",
                "data_align": lambda: f"ERROR offset={a:x}: Cluster is not properly "
                                      "aligned; L2 entry corrupted.",
                "copied_l2": lambda: f"ERROR OFLAG_COPIED L2 cluster: l1_index={a} "
                                     f"l1_entry={b:x} refcount={d}",
                "copied_data": lambda: f"ERROR OFLAG_COPIED data cluster: l2_entry={a:x} "
                                       f"refcount={b}",
                "bitmap": lambda: f"ERROR invalid subcluster bitmap {b:#x} for L2 entry "
                                  f"{a:#x}",
            }[kind]())
        q.chk_refs = refs
        q.chk_n = nb
        for c in range(nb):
            if refs[c]:
                top = c
            stored = stored_rc(q, c)
            if stored < 0:
                q2_raise(q, -1)
            if <uint64_t>stored == refs[c]:
                continue
            leak = <uint64_t>stored > refs[c]
            repair = fix == 2 or (fix == 1 and leak)
            label = ("Repairing" if repair else
                     "Leaked" if leak else "ERROR")
            msgs.append(f"{label} cluster {c} refcount={stored} reference={refs[c]}")
            if repair:
                rc = rc_set(q, c, refs[c])
                q2_raise(q, rc)
                if leak:
                    fixed_leaks += 1
                else:
                    fixed_errors += 1
            elif leak:
                leaks += 1
            else:
                corruptions += 1
        for i in range(q.rt_n):          # refcounts past the end of the file
            off = q.rt[i] & RT_MASK
            if off == 0 or off & q.cmask or off + q.cluster_size > q.file_end:
                continue
            for c in range(max(nb, i << q.rb_bits), (i + 1) << q.rb_bits):
                stored = stored_rc(q, c)
                if stored > 0:
                    if fix:
                        rc = rc_set(q, c, 0)
                        q2_raise(q, rc)
                        fixed_leaks += 1
                        msgs.append(f"Repairing cluster {c} refcount={stored} reference=0")
                    else:
                        leaks += 1
                        msgs.append(f"Leaked cluster {c} refcount={stored} reference=0")
        if fix == 2 and not (fixed_leaks or fixed_errors):
            # flags follow refcounts: fixed on a pass that found the refcounts right
            for i, j, want in copied_fix:
                if j < 0:
                    q.l1[i] = (q.l1[i] | COPIED) if want else (q.l1[i] & ~COPIED)
                    q.l1_dirty = True
                else:
                    s = l2_get(q, i, False)
                    if s < 0:
                        q2_raise(q, -1)
                    e = be64toh((<uint64_t*>q.l2_buf[s])[j * q.ewords])
                    e = (e | COPIED) if want else (e & ~COPIED)
                    (<uint64_t*>q.l2_buf[s])[j * q.ewords] = htobe64(e)
                    q.l2_dirty[s] = 1
                corruptions -= 1
                fixed_errors += 1
        if fix and (fixed_leaks or fixed_errors):
            rc = do_flush(q, )
            q2_raise(q, rc)
    finally:
        q.chk_refs = NULL
        free(refs)
        free(l2t)
    return {"corruptions": corruptions, "leaks": leaks, "messages": msgs,
            "fixed_leaks": fixed_leaks, "fixed_corruptions": fixed_errors,
            "allocated_clusters": allocated, "fragmented_clusters": fragmented,
            "compressed_clusters": compressed,
            "image_end_offset": (top + 1) << q.cluster_bits if nb else 0}
