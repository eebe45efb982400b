# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""qcow2 compressed clusters and zero detection: reading a compressed cluster (bounded
descriptor decode, one cached decompressed cluster, the codec itself is a Python callable
from pyhv.disk.compress), packing written compressed clusters back to back in 512-byte
sectors as QEMU does, and the word-at-a-time zero scan behind sparse `convert`."""

from cpython.buffer cimport PyBUF_READ, PyBUF_WRITE
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from hvcore.qcow2_io cimport (COMPRESSED, E_COMP_RANGE, E_DECOMPRESS, E_META, MAX_HOST,
                              OFF_MASK, Q2, flush_pw, pread_exact, pwrite_all, q2_fail,
                              q2_store_exc)
from hvcore.qcow2_l2 cimport l2_entry, l2_get, set_entry
from hvcore.qcow2_refcount cimport alloc, rc_inc


cdef bint all_zero(const uint8_t *p, size_t n) noexcept nogil:
    cdef size_t i = 0
    while i + 8 <= n:
        if (<const uint64_t*>(p + i))[0] != 0:
            return False
        i += 8
    while i < n:
        if p[i]:
            return False
        i += 1
    return True


cdef size_t scan_runs(const uint8_t *p, size_t n, size_t granule,
                      size_t *out) noexcept nogil:
    """Fill `out` with merged (start, end) pairs of the granules holding a non-zero byte;
    returns how many pairs (at most n / granule / 2 + 1)."""
    cdef size_t pos = 0, end, start = 0, k = 0
    cdef bint inrun = False, z
    while pos < n:
        end = min(pos + granule, n)
        z = all_zero(p + pos, end - pos)
        if not z and not inrun:
            start = pos
            inrun = True
        elif z and inrun:
            out[2 * k] = start
            out[2 * k + 1] = pos
            k += 1
            inrun = False
        pos = end
    if inrun:
        out[2 * k] = start
        out[2 * k + 1] = n
        k += 1
    return k


def nonzero_runs(const uint8_t[::1] buf not None, size_t granule):
    """[(start, end), ...] of the granules of `buf` that hold a non-zero byte, merged: the
    zero detection behind sparse `convert` (the scan runs with the GIL released)."""
    cdef size_t n = buf.shape[0], k, i
    cdef size_t *runs
    if granule == 0:
        raise ValueError("granule must be positive")
    if n == 0:
        return []
    runs = <size_t*>malloc((n // granule // 2 + 2) * 2 * sizeof(size_t))
    if runs == NULL:
        raise MemoryError()
    try:
        with nogil:
            k = scan_runs(&buf[0], n, granule, runs)
        return [(runs[2 * i], runs[2 * i + 1]) for i in range(k)]
    finally:
        free(runs)


cdef int call_decompress(Q2 *q, uint64_t csz, Py_ssize_t *got) noexcept with gil:
    try:
        got[0] = (<object>q.decompress)(
            PyMemoryView_FromMemory(<char*>q.cbuf, csz, PyBUF_READ),
            PyMemoryView_FromMemory(<char*>q.dbuf, q.cluster_size, PyBUF_WRITE))
    except BaseException as ex:
        return q2_store_exc(q, ex)
    return 0


cdef int read_compressed(Q2 *q, uint64_t e, uint64_t in_c, uint8_t *buf,
                         uint64_t n) noexcept nogil:
    """Copy `n` bytes at `in_c` of the compressed cluster described by L2 entry `e`."""
    cdef uint64_t coff = e & ((1ULL << q.csize_shift) - 1) & (MAX_HOST - 1)
    cdef uint64_t nsect = ((e >> q.csize_shift) & q.csize_mask) + 1
    cdef uint64_t csz = nsect * 512 - (coff & 511)
    cdef Py_ssize_t got = 0
    if q.dkey != e or e == 0:
        if coff == 0 or coff >= q.file_end:
            return q2_fail(q, E_COMP_RANGE, 0, e)
        csz = min(csz, q.file_end - coff)       # the last sector may be cut short
        if pread_exact(q, q.cbuf, csz, coff) < 0:
            return -1
        if q.decompress == NULL:
            return q2_fail(q, E_DECOMPRESS, coff, 0)
        if call_decompress(q, csz, &got) < 0:
            return -1
        if <uint64_t>got != q.cluster_size:
            q.dkey = 0
            return q2_fail(q, E_DECOMPRESS, coff, got)
        q.dkey = e
    memcpy(buf, q.dbuf + in_c, n)
    return 0


cdef int put_compressed(Q2 *q, uint64_t offset, const uint8_t *data,
                        uint64_t n) noexcept nogil:
    """Store `n` compressed bytes as the cluster at guest `offset` (which must be
    unallocated), right after the previous compressed cluster when it fits."""
    cdef uint64_t gc = offset >> q.cluster_bits
    cdef uint64_t coff, nsect, e
    cdef int64_t new
    cdef int32_t s = l2_get(q, gc >> q.l2_bits, True)
    if s < 0:
        return -1
    e = l2_entry(q, s, gc & ((1ULL << q.l2_bits) - 1))
    if e & (OFF_MASK | COMPRESSED):
        return q2_fail(q, E_META, offset, 0)
    if flush_pw(q) < 0:
        return -1
    if q.cfree and (q.cfree & q.cmask) and (q.cfree & q.cmask) + n <= q.cluster_size:
        coff = q.cfree
        if rc_inc(q, coff >> q.cluster_bits) < 0:
            return -1
    else:
        new = alloc(q, 1)
        if new < 0:
            return -1
        coff = <uint64_t>new
    if pwrite_all(q, data, n, coff) < 0:
        return -1
    q.cfree = coff + n
    nsect = ((coff + n - 1) >> 9) - (coff >> 9)
    return set_entry(q, gc, coff | (nsect << q.csize_shift) | COMPRESSED, 0)
