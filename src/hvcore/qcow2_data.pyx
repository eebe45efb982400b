# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""qcow2 guest data path, per cluster with the GIL released: reads merged into as few
preads as the mapping allows (unallocated ranges from the backing file, compressed clusters
through qcow2_codec, zero clusters as zeroes); writes that allocate clusters, copy the rest
of a partial cluster (backing file, zeroes, compressed or shared data) or only the touched
subclusters with extended L2 entries; and zeroing / unmapping through metadata only.

Every data write is checked against the metadata map first, so a corrupt L2 entry that
points into a table raises instead of overwriting it.

Concurrency: do_read and do_write are safe to call from several threads at once. They look
the mapping up under the image lock and do the preads / pwrites of clusters that are
already mapped (and backing-file reads) outside it; everything that changes metadata
(allocation, copy-on-write of partial clusters, the subcluster bitmap) runs under the lock,
data included, so allocating writes to one cluster are serialised and the second one finds
the cluster mapped. The other functions here expect the caller to hold the lock."""

from cpython.buffer cimport PyBUF_WRITE
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.errno cimport errno
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.string cimport memcpy, memset
from posix.unistd cimport ftruncate

from hvcore.qcow2_codec cimport all_zero, read_compressed
from hvcore.qcow2_io cimport (ALL_ALLOC, ALL_ZERO, COMPRESSED, COPIED, DIRECT_ALIGN,
                              E_DATA_ALIGN, E_IO, E_L1_RANGE, E_META, K_COMP, K_DATA,
                              K_UNALLOC, OFF_MASK, Q2, ZEROF, flush_pw, io_begin, io_end,
                              pread_data, pwrite_all, pwrite_data, q2_clear_err, q2_fail,
                              q2_lock, q2_store_exc, q2_unlock, q2_unlock_rc, queue_pw)
from hvcore.qcow2_l2 cimport classify, do_flush, l2_bitmap, l2_entry, l2_get, set_entry
from hvcore.qcow2_pipe cimport AioTarget
from hvcore.qcow2_refcount cimport alloc, free_entry, is_meta


# -- read -----------------------------------------------------------------------------------

cdef int call_backing(Q2 *q, uint64_t goff, uint8_t *buf, uint64_t m) noexcept with gil:
    try:
        (<object>q.backing_read)(goff, PyMemoryView_FromMemory(<char*>buf, m, PyBUF_WRITE))
    except BaseException as e:
        return q2_store_exc(q, e)
    return 0


cdef int read_backing(Q2 *q, uint64_t goff, uint8_t *buf, uint64_t n) noexcept nogil:
    cdef uint64_t m = 0
    if q.has_backing and goff < q.backing_size:
        m = min(n, q.backing_size - goff)
        if call_backing(q, goff, buf, m) < 0:
            return -1
    if m < n:
        memset(buf + m, 0, n - m)
    return 0


cdef int read_pending(Q2 *q, int k, uint64_t host, uint64_t goff, uint8_t *buf,
                      uint64_t n) noexcept nogil:
    if k == K_DATA:
        return pread_data(q, buf, n, host)
    if k == K_UNALLOC:
        return read_backing(q, goff, buf, n)
    return 0


cdef int read_locked(Q2 *q, uint64_t off, uint8_t *buf, uint64_t n) noexcept nogil:
    """Fill `buf` with `n` guest bytes at `off`, all under the lock the caller holds."""
    cdef int k, pk = -1
    cdef uint64_t len_, host = 0, p_host = 0, p_goff = 0, p_len = 0
    cdef uint8_t *p_buf = NULL
    while n:
        k = classify(q, off, n, &len_, &host)
        if k < 0:
            return -1
        if k == K_DATA or (k == K_UNALLOC and q.has_backing):
            if pk == k and p_buf + p_len == buf and (k == K_UNALLOC or p_host + p_len == host):
                p_len += len_
            else:
                if read_pending(q, pk, p_host, p_goff, p_buf, p_len) < 0:
                    return -1
                pk, p_host, p_goff, p_buf, p_len = k, host, off, buf, len_
        elif k == K_COMP:
            if read_compressed(q, host, off & q.cmask, buf, len_) < 0:
                return -1
        else:
            memset(buf, 0, len_)
        buf += len_
        off += len_
        n -= len_
    return read_pending(q, pk, p_host, p_goff, p_buf, p_len)


cdef enum:
    XN = 32                    # extents looked up per lock hold


ctypedef struct Ext:
    uint64_t at                # K_DATA: host offset; K_UNALLOC: guest offset (backing)
    uint8_t *buf
    uint64_t n
    int kind


cdef int do_read(Q2 *q, uint64_t off, uint8_t *buf, uint64_t n) noexcept nogil:
    """Fill `buf` with `n` guest bytes at `off` (the caller checked the range), safe
    against concurrent requests: up to XN extents are mapped under the lock (compressed
    ones decompressed there, zeroes filled), then read outside it."""
    cdef Ext ex[XN]
    cdef int k, nx, i, rc = 0
    cdef uint64_t len_, host = 0, at
    while n and rc == 0:
        nx = 0
        q2_lock(q)
        io_begin(q)
        while n and nx < XN:
            k = classify(q, off, n, &len_, &host)
            if k < 0:
                rc = -1
                break
            if k == K_DATA or (k == K_UNALLOC and q.has_backing):
                at = host if k == K_DATA else off
                if nx and ex[nx - 1].kind == k and ex[nx - 1].buf + ex[nx - 1].n == buf and \
                        ex[nx - 1].at + ex[nx - 1].n == at:
                    ex[nx - 1].n += len_
                else:
                    ex[nx].at, ex[nx].buf, ex[nx].n, ex[nx].kind = at, buf, len_, k
                    nx += 1
            elif k == K_COMP:
                if read_compressed(q, host, off & q.cmask, buf, len_) < 0:
                    rc = -1
                    break
            else:
                memset(buf, 0, len_)
            buf += len_
            off += len_
            n -= len_
        q2_unlock(q)
        i = 0
        while rc == 0 and i < nx:
            if ex[i].kind == K_DATA:
                rc = pread_data(q, ex[i].buf, ex[i].n, ex[i].at)
            else:
                rc = read_backing(q, ex[i].at, ex[i].buf, ex[i].n)
            i += 1
        io_end(q)
    return rc


# -- write ----------------------------------------------------------------------------------

cdef int cow_write(Q2 *q, uint64_t gbase, uint64_t lo, uint64_t hi, uint64_t host,
                   uint64_t in_c, const uint8_t *buf, uint64_t n) noexcept nogil:
    """Write guest bytes [gbase+lo, gbase+hi) to host+lo: `buf` over the current
    contents (backing, zeroes, compressed or old data), read only where not covered."""
    if in_c == lo and in_c + n == hi:
        return queue_pw(q, host + lo, buf, n)
    if flush_pw(q) < 0 or read_locked(q, gbase + lo, q.scratch, hi - lo) < 0:
        return -1
    memcpy(q.scratch + (in_c - lo), buf, n)
    return pwrite_all(q, q.scratch, hi - lo, host + lo)


cdef inline int64_t own_cluster(Q2 *q, uint64_t off) noexcept nogil:
    """The host cluster a write goes to: `off` when the entry's cluster is already ours to
    write in place, else a newly allocated one (-1 when allocation failed)."""
    return <int64_t>off if off else alloc(q, 1)


cdef int write_cluster(Q2 *q, uint64_t gc, uint64_t in_c, const uint8_t *buf,
                       uint64_t n) noexcept nogil:
    cdef int32_t s = l2_get(q, gc >> q.l2_bits, True)
    cdef uint64_t l2i = gc & ((1ULL << q.l2_bits) - 1)
    cdef uint64_t e, off, bm = 0, mask, host, gbase = gc << q.cluster_bits
    cdef uint64_t s0, s1, lo, hi
    cdef int64_t new
    cdef bint reuse
    if s < 0:
        return -1
    e = l2_entry(q, s, l2i)
    off = e & OFF_MASK
    bm = l2_bitmap(q, s, l2i)
    if off and not (e & COMPRESSED):
        if off & q.cmask:
            return q2_fail(q, E_DATA_ALIGN, gbase, off)
        if is_meta(q, off >> q.cluster_bits):
            return q2_fail(q, E_META, off, 0)
    if not q.extended:
        if (e & COPIED) and off and not (e & (COMPRESSED | ZEROF)):
            return queue_pw(q, off + in_c, buf, n)
        reuse = off and (e & COPIED) and not (e & COMPRESSED)    # preallocated zero
        new = own_cluster(q, off if reuse else 0)
        if new < 0:
            return -1
        host = <uint64_t>new
        if n < q.cluster_size and not reuse and host >= q.file_end and \
                (off == 0 or (e & ZEROF)) and \
                not (e & COMPRESSED) and (not q.has_backing or gbase >= q.backing_size):
            # a fresh cluster past the end of the file already reads as zeroes: write
            # only the new bytes and extend the file over the rest (no zero COW)
            if queue_pw(q, host + in_c, buf, n) < 0:
                return -1
            if ftruncate(q.fd, host + q.cluster_size) < 0:
                return q2_fail(q, E_IO, errno, host)
            q.file_end = host + q.cluster_size
        elif cow_write(q, gbase, 0, q.cluster_size, host, in_c, buf, n) < 0:
            return -1
        if not reuse and free_entry(q, e) < 0:
            return -1
        return set_entry(q, gc, host | COPIED, 0)
    if (e & COMPRESSED) or (off and not (e & COPIED)):
        new = alloc(q, 1)
        if new < 0:
            return -1
        if cow_write(q, gbase, 0, q.cluster_size, new, in_c, buf, n) < 0 or \
                free_entry(q, e) < 0:
            return -1
        return set_entry(q, gc, <uint64_t>new | COPIED, ALL_ALLOC)
    s0 = in_c >> q.sc_bits
    s1 = (in_c + n - 1) >> q.sc_bits
    mask = ((1ULL << (s1 - s0 + 1)) - 1) << s0
    new = own_cluster(q, off)
    if new < 0:
        return -1
    host = <uint64_t>new
    if off and (bm & mask) == mask:
        return queue_pw(q, host + in_c, buf, n)
    lo = s0 << q.sc_bits
    hi = (s1 + 1) << q.sc_bits
    if cow_write(q, gbase, lo, hi, host, in_c, buf, n) < 0:
        return -1
    return set_entry(q, gc, host | COPIED, (bm | mask) & ~(mask << 32))


cdef int write_range(Q2 *q, uint64_t off, const uint8_t *buf, uint64_t n) noexcept nogil:
    """Write `n` guest bytes at `off`; the last data write may stay pending (flush_pw)."""
    cdef uint64_t in_c, len_
    while n:
        in_c = off & q.cmask
        len_ = min(n, q.cluster_size - in_c)
        if write_cluster(q, off >> q.cluster_bits, in_c, buf, len_) < 0:
            return -1
        off += len_
        buf += len_
        n -= len_
    return 0


cdef bint in_place(Q2 *q, uint64_t gc, uint64_t in_c, uint64_t n,
                   uint64_t *phost) noexcept nogil:
    """Under the lock: whether [in_c, in_c+n) of guest cluster `gc` may be written straight
    into its host cluster (mapped, not shared, no copy-on-write, no metadata change); any
    doubt (including errors) answers no and leaves the case to write_cluster."""
    cdef uint64_t l1i = gc >> q.l2_bits
    cdef uint64_t l2i = gc & ((1ULL << q.l2_bits) - 1)
    cdef uint64_t e, off, bm, mask
    cdef int32_t s
    if l1i >= q.l1_size or not (q.l1[l1i] & COPIED):
        return False
    s = l2_get(q, l1i, False)
    if s < 0:
        return False
    e = l2_entry(q, s, l2i)
    off = e & OFF_MASK
    if not (e & COPIED) or off == 0 or (e & COMPRESSED) or off & q.cmask or \
            is_meta(q, off >> q.cluster_bits) or off + q.cluster_size > q.file_end:
        return False
    if q.extended:
        bm = l2_bitmap(q, s, l2i)
        mask = ((1ULL << (((in_c + n - 1) >> q.sc_bits) - (in_c >> q.sc_bits) + 1)) - 1) \
            << (in_c >> q.sc_bits)
        if (bm & mask) != mask:
            return False
    elif e & ZEROF:
        return False
    phost[0] = off + in_c
    return True


cdef int do_write(Q2 *q, uint64_t off, const uint8_t *buf, uint64_t n) noexcept nogil:
    """Write `n` guest bytes at `off` (the caller checked the range and read-only), safe
    against concurrent requests: clusters already mapped get their data outside the lock,
    the others are allocated and written (with copy-on-write) under it."""
    cdef Ext ex[XN]
    cdef int nx, i, rc = 0
    cdef uint64_t in_c, len_, host = 0
    while n and rc == 0:
        nx = 0
        q2_lock(q)
        io_begin(q)
        while n and nx < XN:
            in_c = off & q.cmask
            len_ = min(n, q.cluster_size - in_c)
            if in_place(q, off >> q.cluster_bits, in_c, len_, &host):
                if nx and ex[nx - 1].at + ex[nx - 1].n == host and \
                        ex[nx - 1].buf + ex[nx - 1].n == buf:
                    ex[nx - 1].n += len_
                else:
                    ex[nx].at, ex[nx].buf, ex[nx].n, ex[nx].kind = host, <uint8_t*>buf, len_, K_DATA
                    nx += 1
            elif write_cluster(q, off >> q.cluster_bits, in_c, buf, len_) < 0:
                rc = -1
                break
            off += len_
            buf += len_
            n -= len_
        if rc == 0:
            rc = flush_pw(q)
        q2_unlock_rc(q, rc)
        i = 0
        while rc == 0 and i < nx:
            rc = pwrite_data(q, ex[i].buf, ex[i].n, ex[i].at)
            i += 1
        io_end(q)
    return rc


cdef int write_pieces(Q2 *q, const uint8_t *buf, const uint64_t *pieces, size_t npieces,
                      uint64_t granule) noexcept nogil:
    """Write pieces (guest offset, offset in `buf`, length) of one buffer, skipping the
    `granule`-sized blocks of zeroes when `granule` is not 0 (sparse convert). Data
    landing in contiguous host clusters goes out as one pwritev for the whole batch."""
    cdef size_t i
    cdef uint64_t g, n, pos, end, start
    cdef const uint8_t *p
    cdef bint inrun
    for i in range(npieces):
        g = pieces[3 * i]
        p = buf + pieces[3 * i + 1]
        n = pieces[3 * i + 2]
        if granule == 0:
            if write_range(q, g, p, n) < 0:
                return -1
            continue
        pos = start = 0
        inrun = False
        while pos < n:
            end = min(pos + granule, n)
            if all_zero(p + pos, end - pos):
                if inrun and write_range(q, g + start, p + start, pos - start) < 0:
                    return -1
                inrun = False
            elif not inrun:
                start = pos
                inrun = True
            pos = end
        if inrun and write_range(q, g + start, p + start, n - start) < 0:
            return -1
    return flush_pw(q)


# -- async requests (img bench -i io_uring|native) -------------------------------------------

cdef bint map_direct(Q2 *q, bint write, uint64_t off, uint64_t n,
                     uint64_t *phost) noexcept nogil:
    """Under the lock: whether guest [off, off+n) is one run of host data inside the file
    that may be read (mapped data) or written (in place, no metadata change) directly;
    anything else, errors included, answers no and is left to do_read / do_write."""
    cdef uint64_t len_, host = 0, start = 0, done = 0, in_c
    cdef int k
    while done < n:
        if write:
            in_c = (off + done) & q.cmask
            len_ = min(n - done, q.cluster_size - in_c)
            if not in_place(q, (off + done) >> q.cluster_bits, in_c, len_, &host):
                return False
        else:
            k = classify(q, off + done, n - done, &len_, &host)
            if k != K_DATA:
                return False
        if done == 0:
            start = host
        elif host != start + done:
            return False
        done += len_
    if start + n > q.file_end:
        return False
    phost[0] = start
    return True


cdef int aio_map(void *ctx, bint write, uint64_t off, uint8_t *buf, uint64_t n,
                 AioTarget *t) noexcept nogil:
    """qcow2_pipe.run_aio's map: mapped data goes to the queue, everything else (allocation,
    copy-on-write, compressed, zero, backing) through the engine at once, as QEMU
    serialises allocation under its lock. The bench loop is the image's only user and
    flushes only with its queue empty, so a mapping stays valid while its request runs."""
    cdef Q2 *q = <Q2*>ctx
    cdef uint64_t host = 0
    cdef bint direct
    q2_lock(q)
    direct = map_direct(q, write, off, n, &host)
    q2_unlock(q)
    if not direct:
        q2_clear_err(q)             # a lookup error recurs (and is kept) on the way below
        return do_write(q, off, buf, n) if write else do_read(q, off, buf, n)
    t.host = host
    t.fallback_fd = q.fd
    t.fd = q.fd
    if q.dfd >= 0 and host % DIRECT_ALIGN == 0 and n % DIRECT_ALIGN == 0 and \
            (<uint64_t>buf) % DIRECT_ALIGN == 0:
        t.fd = q.dfd
    return 1


cdef int aio_flush(void *ctx) noexcept nogil:
    """qcow2_pipe.run_aio's flush (the queue is empty): metadata in crash-safe order."""
    cdef Q2 *q = <Q2*>ctx
    q2_lock(q)
    return q2_unlock_rc(q, do_flush(q))


# -- zero / unmap ---------------------------------------------------------------------------

cdef int do_zero(Q2 *q, uint64_t off, uint64_t n, bint unmap) noexcept nogil:
    """Make unit-aligned guest range read as zeroes (or, with `unmap`, fall through to
    the backing file), dropping the clusters it frees."""
    cdef uint64_t gc, in_c, len_, e, bm, hostoff, mask, l2i
    cdef int32_t s
    cdef int rc
    while n:
        gc = off >> q.cluster_bits
        in_c = off & q.cmask
        len_ = min(n, q.cluster_size - in_c)
        if (gc >> q.l2_bits) >= q.l1_size:
            return q2_fail(q, E_L1_RANGE, off, 0)
        if (q.l1[gc >> q.l2_bits] & OFF_MASK) == 0 and (unmap or not q.has_backing):
            pass            # reads as zeroes already
        else:
            s = l2_get(q, gc >> q.l2_bits, True)
            if s < 0:
                return -1
            l2i = gc & ((1ULL << q.l2_bits) - 1)
            e = l2_entry(q, s, l2i)
            bm = l2_bitmap(q, s, l2i)
            hostoff = e & OFF_MASK
            # the image's last cluster counts as whole when the range reaches the end
            if len_ == q.cluster_size or (in_c == 0 and off + len_ >= q.size):
                if free_entry(q, e) < 0:
                    return -1
                if unmap:
                    rc = set_entry(q, gc, 0, 0)
                elif q.extended:
                    rc = set_entry(q, gc, 0, ALL_ZERO)
                else:
                    rc = set_entry(q, gc, ZEROF if q.v3 else 0, 0)
                if rc < 0:
                    return -1
            elif (e & COMPRESSED) or (hostoff and not (e & COPIED)):
                memset(q.dbuf, 0, len_)      # whole-cluster copy, then zeroes
                q.dkey = 0
                if write_cluster(q, gc, in_c, q.dbuf, len_) < 0 or flush_pw(q) < 0:
                    return -1
            else:
                mask = ((1ULL << (len_ >> q.sc_bits)) - 1) << (in_c >> q.sc_bits)
                if set_entry(q, gc, (hostoff | COPIED) if hostoff else 0,
                             (bm & ~mask & ~(mask << 32)) if unmap else
                             (bm & ~mask) | (mask << 32)) < 0:
                    return -1
        off += len_
        n -= len_
    return 0
