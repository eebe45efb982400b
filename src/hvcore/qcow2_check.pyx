# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""qcow2 consistency check: count the references to every host cluster from the header,
refcount structures, every L1 table (active and snapshots), L2 tables and compressed
descriptors, compare with the stored refcounts and OFLAG_COPIED flags, and repair leaks
(`-r leaks`) or everything (`-r all`), rebuilding the refcount table and blocks from the
counted references when the refcount structure itself is broken (a refcount block
misaligned, outside the file or shared with other data, a used cluster with refcount 0) as
`qemu-img check -r all` does; messages follow qemu-img check."""

from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc

from hvcore.includes.endian cimport be64toh, htobe64
from hvcore.qcow2_io cimport (ALL_ALLOC, COMPRESSED, COPIED, OFF_MASK, Q2, RT_MASK, ZEROF,
                              pread_exact, q2_raise)
from hvcore.qcow2_l2 cimport do_flush, l2_get
from hvcore.qcow2_refcount cimport rc_set, rebuild_refcounts, stored_rc

cdef void ref(Q2 *q, uint32_t *refs, uint64_t off, uint64_t length, list recs):
    cdef uint64_t c
    if length == 0:
        return
    # as qemu-img: the last cluster may lie partly past the end of the file, by less than
    # a cluster (so `refs` holds one entry more than the file has clusters)
    if off + length > q.file_end and off + length - q.file_end >= q.cluster_size:
        recs.append(("outside", off, length, 0))
        return
    cdef uint64_t top = min(q.rc_max, 0xffffffffU)
    for c in range(off >> q.cluster_bits, ((off + length - 1) >> q.cluster_bits) + 1):
        if refs[c] < top:
            refs[c] += 1
        else:                   # as qemu-img: a count the refcount width cannot hold
            recs.append(("overflow", c << q.cluster_bits, 0, 0))


cdef int32_t _l2_slot(Q2 *q, uint64_t l1i) except -1:
    cdef int32_t s = l2_get(q, l1i, False)
    if s < 0:
        q2_raise(q, -1)
    return s


cdef uint64_t _l2_entry(Q2 *q, uint64_t l1i, uint64_t l2i) except? 0:
    cdef int32_t s = _l2_slot(q, l1i)
    return be64toh((<uint64_t*>q.l2.buf[s])[l2i * q.ewords])


cdef int _set_l2_entry(Q2 *q, uint64_t l1i, uint64_t l2i, uint64_t entry) except -1:
    """Change one entry through the L2 cache (written back by the check's flush)."""
    cdef int32_t s = _l2_slot(q, l1i)
    (<uint64_t*>q.l2.buf[s])[l2i * q.ewords] = htobe64(entry)
    q.l2.dirty[s] = 1
    return 0


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
    cdef uint64_t allocated = 0, fragmented = 0, compressed = 0
    recs = []
    copied_fix = []
    zero_fix = []
    if not q.readonly:
        rc = do_flush(q, )
        q2_raise(q, rc)
    refs = <uint32_t*>calloc(nb + 1, 4)
    l2t = <uint64_t*>malloc(q.cluster_size)
    if refs == NULL or l2t == NULL:
        free(refs)
        free(l2t)
        raise MemoryError()
    try:
        for off, length in fixed:
            ref(q, refs, off, length, recs)
        ref(q, refs, q.rt_offset, q.rt_n * 8, recs)
        for i in range(q.rt_n):
            off = q.rt[i] & RT_MASK
            if off == 0:
                continue
            if off & q.cmask:
                recs.append(("rb_align", i, off, 0))
            elif off + q.cluster_size > q.file_end:
                recs.append(("rb_outside", i, off, 0))
            else:
                ref(q, refs, off, q.cluster_size, recs)
        for l1off, l1n, active in l1_tables:
            ref(q, refs, l1off, l1n * 8, recs)
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
                    ref(q, refs, off, q.cluster_size, recs)
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
                                ref(q, refs, coff,
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
                            # as qemu-img: an entry without data is made a zero cluster
                            # (with -r all); one with data cannot be repaired, and its
                            # (unaligned) range still counts as referenced
                            has_data = (bm & ALL_ALLOC) if q.extended else not (e & ZEROF)
                            if not has_data and fix == 2 and active:
                                recs.append(("prealloc_fixed", off, 0, 0))
                                zero_fix.append((i, j))
                                continue
                            recs.append(("data_align" if has_data else "prealloc_align",
                                         off, 0, 0))
                        ref(q, refs, off, q.cluster_size, recs)
                        if active:     # (zero clusters that keep their host count too)
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
        rebuild = False
        msgs = []
        copied_msgs = []
        label = "Repairing" if fix == 2 else "ERROR"
        for kind, a, b, d in recs:
            if kind in ("rb_align", "rb_outside"):
                rebuild = True
            text = {
                "outside": lambda: "ERROR: counting reference for region exceeding the end "
                                   f"of the file by one cluster or more: offset {a:#x} "
                                   f"size {b:#x}",
                "rb_align": lambda: f"ERROR refcount block {a} is not cluster aligned; "
                                    "refcount table entry corrupted",
                "rb_outside": lambda: f"ERROR refcount block {a} is outside image",
                "l2_align": lambda: f"ERROR l2_offset={b:x}: Table is not cluster aligned; "
                                    "L1 entry corrupted",
                "data_align": lambda: f"ERROR offset={a:x}: Data cluster is not properly "
                                      "aligned; L2 entry corrupted.",
                "prealloc_align": lambda: f"ERROR offset={a:x}: Preallocated cluster is not "
                                          "properly aligned; L2 entry corrupted.",
                "prealloc_fixed": lambda: f"Repairing offset={a:x}: Preallocated cluster is "
                                          "not properly aligned; L2 entry corrupted.",
                "overflow": lambda: f"ERROR: overflow cluster offset={a:#x}\nUse qemu-img "
                                    "amend to increase the refcount entry width or qemu-img "
                                    "convert to create a clean copy if the image cannot be "
                                    "opened for writing",
                "copied_l2": lambda: f"{label} OFLAG_COPIED L2 cluster: l1_index={a} "
                                     f"l1_entry={b:x} refcount={d}",
                "copied_data": lambda: f"{label} OFLAG_COPIED data cluster: l2_entry={a:x} "
                                       f"refcount={b}",
                "bitmap": lambda: f"ERROR invalid subcluster bitmap {b:#x} for L2 entry "
                                  f"{a:#x}",
            }[kind]()
            if kind.startswith("copied"):
                copied_msgs.append(text)
            elif kind == "prealloc_fixed":
                msgs.append(text)
            else:
                corruptions += 1
                msgs.append(text)
        if refs[nb]:
            nb += 1                     # a reference into the file's partial last cluster
        for l1i, l2i in zero_fix:       # (an extended entry keeps its zero bits)
            _set_l2_entry(q, l1i, l2i, 0 if q.extended else ZEROF)
        for i in range(q.rt_n):          # a refcount block shared with anything else
            off = q.rt[i] & RT_MASK
            if off and not off & q.cmask and off + q.cluster_size <= q.file_end and \
                    refs[off >> q.cluster_bits] != 1:
                msgs.append(f"ERROR refcount block {i} refcount="
                            f"{refs[off >> q.cluster_bits]}")
                corruptions += 1
                rebuild = True
        q.chk_refs = refs
        q.chk_n = nb
        # as qemu-img: first report every mismatch, then (when allowed and the refcount
        # structure itself is sound) repair them one by one, reporting each again
        mism = []
        for c in range(nb):
            if refs[c]:
                top = c
            stored = stored_rc(q, c)
            if stored < 0:
                q2_raise(q, -1)
            if <uint64_t>stored == refs[c]:
                continue
            if stored == 0:
                rebuild = True          # a used cluster the refcounts call free
            mism.append((c, stored, refs[c]))
            msgs.append(f"{'Leaked' if <uint64_t>stored > refs[c] else 'ERROR'} cluster {c} "
                        f"refcount={stored} reference={refs[c]}")
        for i in range(q.rt_n):          # refcounts past the end of the file
            off = q.rt[i] & RT_MASK
            if off == 0 or off & q.cmask or off + q.cluster_size > q.file_end:
                continue
            for c in range(max(nb, i << q.rb_bits), (i + 1) << q.rb_bits):
                stored = stored_rc(q, c)
                if stored > 0 and not (rebuild and fix == 2):
                    mism.append((c, stored, 0))
                    msgs.append(f"Leaked cluster {c} refcount={stored} reference=0")
        if rebuild and fix == 2:
            # (refcounts past the end of the file go with the old blocks, unreported)
            msgs.append("Rebuilding refcount structure")
            for c, stored, want in mism:
                if <uint64_t>stored > want:
                    leaks += 1
                else:
                    corruptions += 1
            with nogil:
                rc = rebuild_refcounts(q, refs, nb)
            q2_raise(q, rc)
            q.chk_refs = NULL
            # the old refcount structure is leaked now: recount and repair leaks only
            again = run_check(q, l1_tables, fixed, 1)
            if again["rebuild"]:
                msgs.append("ERROR rebuilt refcount structure is still broken")
            # (qemu-img repairs these straight away: only the repairs are reported)
            msgs += [m for m in again["messages"] if not m.startswith("Leaked cluster")]
            fixed_errors = max(0, corruptions - again["corruptions"])
            fixed_leaks = leaks
            corruptions, leaks = again["corruptions"], again["leaks"]
            copied_msgs = []
        elif fix == 0 or (rebuild and fix == 1):
            for c, stored, want in mism:
                if <uint64_t>stored > want:
                    leaks += 1
                else:
                    corruptions += 1
        else:
            for c, stored, want in mism:
                leak = <uint64_t>stored > want
                if leak or fix == 2:
                    msgs.append(f"Repairing cluster {c} refcount={stored} reference={want}")
                    rc = rc_set(q, c, want)
                    q2_raise(q, rc)
                    if leak:
                        fixed_leaks += 1
                    else:
                        fixed_errors += 1
                elif leak:
                    leaks += 1
                else:
                    corruptions += 1
        fixed_errors += len(zero_fix)
        if fix and (fixed_leaks or fixed_errors):
            copied_fix = []             # judged again once the refcounts are right
        else:
            msgs += copied_msgs
            corruptions += len(copied_msgs)
        if fix == 2 and copied_fix:
            # flags follow refcounts: fixed on a pass that found the refcounts right
            # (Python integers: an L1 entry's fix has the L2 index -1)
            for l1i, l2i, want in copied_fix:
                if l2i < 0:
                    q.l1[l1i] = (q.l1[l1i] | COPIED) if want else (q.l1[l1i] & ~COPIED)
                    q.l1_dirty = True
                else:
                    e = _l2_entry(q, l1i, l2i)
                    _set_l2_entry(q, l1i, l2i, (e | COPIED) if want else (e & ~COPIED))
                corruptions -= 1
                fixed_errors += 1
        if fix and (fixed_leaks or fixed_errors):
            rc = do_flush(q, )
            q2_raise(q, rc)
    finally:
        q.chk_refs = NULL
        free(refs)
        free(l2t)
    return {"corruptions": corruptions, "leaks": leaks, "messages": msgs, "rebuild": rebuild,
            "fixed_leaks": fixed_leaks, "fixed_corruptions": fixed_errors,
            "allocated_clusters": allocated, "fragmented_clusters": fragmented,
            "compressed_clusters": compressed,
            "image_end_offset": (top + 1) << q.cluster_bits if nb else 0}
