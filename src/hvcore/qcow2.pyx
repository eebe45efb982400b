# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""qcow2 image object: the Python face of the qcow2 engine.

The engine is split by concept, all sharing one C struct per image (`Q2`, qcow2_io.pxd)
and calling each other as cdef functions without the GIL:

  qcow2_io        bounded file I/O, the pending data write, error state -> Qcow2Error
  qcow2_refcount  refcount blocks of every width, allocation, deferred frees, metadata map
  qcow2_l2        L1 table, L2 cache, offset classification, crash-safe flush
  qcow2_codec     compressed clusters (read / packed write), zero detection
  qcow2_data      guest read / write (copy-on-write, subclusters) / zero / unmap
  qcow2_check     the reference walk behind `check` and its repairs
  qcow2_pipe      loops of convert and bench (extent reader, piece writer, requests, aio)

Policy (header parsing, backing chains, which operation to run) lives in pyhv.disk.

Crash safety: data is written at once; metadata is cached and written back on flush (or
eviction) in QEMU's order: data, barrier, refcount blocks and table, barrier, L2 tables,
barrier, L1, barrier, then the refcount decrements of clusters dropped since the last flush,
barrier. Freed clusters are reused only after that. A crash leaves at most leaked clusters.
"""

from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from posix.stdlib cimport posix_memalign
from libc.string cimport memset

from hvcore.includes.endian cimport be64toh, htobe64
from hvcore.qcow2_check cimport run_check
from hvcore.qcow2_codec cimport put_compressed
from hvcore.aio cimport AioQueue
from hvcore.includes.aio cimport RWF_DSYNC
from hvcore.qcow2_data cimport aio_flush, aio_map, do_read, do_write, do_zero, write_pieces
from hvcore.qcow2_io cimport (ALL_ALLOC, COMPRESSED, COPIED, E_IO, K_COMP, K_DATA, K_ZERO,
                              OFF_MASK, Q2, RT_MASK, pwrite_all, q2_fail, q2_lock,
                              q2_lock_destroy, q2_lock_init, q2_raise, q2_sync, q2_unlock,
                              q2_unlock_rc, read_table)
from hvcore.qcow2_pipe cimport AioRun, run_aio
from hvcore.qcow2_l2 cimport (classify, do_flush, do_write_back, l1_grow, l2_entry, l2_get,
                              l2_init, l2_release, set_entry)
from hvcore.qcow2_refcount cimport alloc, meta_set, rc_init, rc_release, write_refcounts
from hvcore.qcow2_snapshot cimport add_refs, fix_copied, rc_add

import os

from hvcore.qcow2_codec import nonzero_runs  # noqa: F401  (re-exported)
from hvcore.qcow2_io import Qcow2Error

KIND_NAMES = ("unallocated", "data", "zero", "compressed")


cdef inline void lock(Q2 *q) noexcept:
    """Take the image lock from code holding the GIL (released while waiting for it)."""
    with nogil:
        q2_lock(q)


cdef class Qcow2:
    """One open qcow2 file: tables, caches and the per-cluster read/write/zero loops.

    Built by pyhv.disk.qcow2 after it has parsed and validated the header. Its fields are
    declared in qcow2.pxd."""

    def __cinit__(self, int fd, *, int cluster_bits, uint64_t size, uint64_t l1_offset,
                  uint64_t l1_size, uint64_t rt_offset, uint64_t rt_clusters,
                  int refcount_order, bint extended, bint v3, bint readonly,
                  uint64_t file_end, uint64_t l2_cache=0, uint64_t rb_cache=0):
        cdef Q2 *q = &self.q
        q.fd = q.dfd = -1
        if q2_lock_init(q) < 0:
            raise MemoryError("cannot create the qcow2 image lock")
        self._locked = True
        if not 9 <= cluster_bits <= 21:
            raise Qcow2Error(f"cluster_bits {cluster_bits} is outside 9..21")
        if not 0 <= refcount_order <= 6:
            raise Qcow2Error(f"refcount_order {refcount_order} is outside 0..6")
        if extended and cluster_bits < 14:
            raise Qcow2Error("extended L2 entries need clusters of at least 16 KiB")
        q.cluster_bits = cluster_bits
        q.cluster_size = 1ULL << cluster_bits
        q.cmask = q.cluster_size - 1
        q.extended = extended
        q.v3 = v3
        q.ewords = 2 if extended else 1
        q.l2_bits = cluster_bits - 3 - (1 if extended else 0)
        q.sc_bits = cluster_bits - 5
        q.csize_shift = 62 - (cluster_bits - 8)
        q.csize_mask = (1ULL << (cluster_bits - 8)) - 1
        q.refcount_order = refcount_order
        q.rc_max = 0xffffffffffffffffULL if refcount_order == 6 else \
            (1ULL << (1 << refcount_order)) - 1
        q.rb_bits = cluster_bits + 3 - refcount_order
        q.size = size
        q.readonly = readonly
        q.file_end = file_end
        if l1_size > (32 << 20) // 8 or rt_clusters > (8 << 20) // (1 << cluster_bits) + 64:
            raise Qcow2Error(f"table too large (L1 {l1_size} entries, refcount table "
                             f"{rt_clusters} clusters)")
        if l1_offset & q.cmask or rt_offset & q.cmask:
            raise Qcow2Error("L1 or refcount table offset is not cluster aligned")
        if l1_size and (l1_offset == 0 or l1_offset + l1_size * 8 > file_end):
            raise Qcow2Error(f"L1 table at {l1_offset:#x} ({l1_size} entries) lies outside "
                             "the file")
        if rt_clusters == 0 or rt_offset == 0 or \
                rt_offset + (rt_clusters << cluster_bits) > file_end:
            raise Qcow2Error(f"refcount table at {rt_offset:#x} ({rt_clusters} clusters) "
                             "lies outside the file")
        q.l1_size = l1_size
        q.l1_offset = l1_offset
        q.rt_offset = rt_offset
        q.scratch = <uint8_t*>malloc(q.cluster_size)
        q.cbuf = <uint8_t*>malloc(q.cluster_size * 2 + 1024)
        q.dbuf = <uint8_t*>malloc(q.cluster_size)
        if l2_init(q, l2_cache) < 0 or rc_init(q, rt_clusters, rb_cache) < 0 or \
                not (q.scratch and q.cbuf and q.dbuf):
            raise MemoryError("cannot allocate the qcow2 tables")
        q.fd = os.dup(fd)
        cdef int rc
        with nogil:
            rc = read_table(q, q.l1, q.l1_size, q.l1_offset)
            if rc == 0:
                rc = read_table(q, q.rt, q.rt_n, q.rt_offset)
        q2_raise(q, rc)
        q.free_hint = 0

    def __dealloc__(self):
        l2_release(&self.q)
        rc_release(&self.q)
        free(self.q.scratch)
        free(self.q.cbuf)
        free(self.q.dbuf)
        if self._locked:
            q2_lock_destroy(&self.q)
        if self.q.fd >= 0:
            os.close(self.q.fd)
        if self.q.dfd >= 0:
            os.close(self.q.dfd)

    # -- attributes -----------------------------------------------------------------------

    @property
    def readonly(self):
        return self.q.readonly

    @property
    def extended(self):
        return self.q.extended

    @property
    def v3(self):
        return self.q.v3

    @property
    def cluster_bits(self):
        return self.q.cluster_bits

    @property
    def cluster_size(self):
        return self.q.cluster_size

    @property
    def size(self):
        return self.q.size

    @property
    def l1_size(self):
        return self.q.l1_size

    @property
    def l1_offset(self):
        return self.q.l1_offset

    @property
    def refcount_order(self):
        return self.q.refcount_order

    @property
    def rt_n(self):
        return self.q.rt_n

    @property
    def rt_offset(self):
        return self.q.rt_offset

    @property
    def file_end(self):
        return self.q.file_end

    @property
    def unsafe_cache(self):
        """qemu's cache=unsafe: writes keep their order, nothing is fdatasync'd."""
        return self.q.unsafe_cache

    @unsafe_cache.setter
    def unsafe_cache(self, bint value):
        self.q.unsafe_cache = value

    @property
    def backing_size(self):
        return self.q.backing_size

    @backing_size.setter
    def backing_size(self, uint64_t value):
        self.q.backing_size = value

    @property
    def decompress(self):
        """fn(src, dst) -> bytes written: the codec for compressed clusters."""
        return self._decompress

    @decompress.setter
    def decompress(self, value):
        self._decompress = value
        self.q.decompress = NULL if value is None else <PyObject*>value
        self.q.dkey = 0

    def use_direct_io(self):
        """cache=none: aligned guest data reads and writes bypass the page cache (O_DIRECT
        on a second descriptor of the same file); metadata keeps the first one."""
        if self.q.dfd < 0:
            self.q.dfd = os.open(f"/proc/self/fd/{self.q.fd}",
                                 (os.O_RDONLY if self.q.readonly else os.O_RDWR) |
                                 os.O_DIRECT | os.O_CLOEXEC)

    @property
    def zero_unit(self):
        """Granularity of metadata-only zeroing and discard."""
        return (1 << self.q.sc_bits) if self.q.extended else self.q.cluster_size

    # -- metadata map ---------------------------------------------------------------------

    def mark_metadata(self, uint64_t offset, uint64_t length):
        """Record [offset, offset+length) as metadata; returns clusters that already were."""
        cdef int hits
        cdef uint32_t cb = self.q.cluster_bits
        if length == 0:
            return 0
        with nogil:
            q2_lock(&self.q)
            hits = meta_set(&self.q, offset >> cb,
                            ((offset + length - 1) >> cb) - (offset >> cb) + 1, True)
            q2_unlock(&self.q)
        q2_raise(&self.q, hits)
        return hits

    def mark_tables(self):
        """Mark the header, L1, refcount table and blocks and active L2 tables as metadata.

        Returns a list of (what, offset) for tables that overlap metadata marked before."""
        cdef uint64_t i, off
        cdef Q2 *q = &self.q
        bad = []
        if self.mark_metadata(0, 1):
            bad.append(("header", 0))
        if self.mark_metadata(q.l1_offset, q.l1_size * 8):
            bad.append(("L1 table", q.l1_offset))
        if self.mark_metadata(q.rt_offset, q.rt_n * 8):
            bad.append(("refcount table", q.rt_offset))
        for i in range(q.rt_n):
            off = q.rt[i] & RT_MASK
            if off and (off & q.cmask) == 0 and self.mark_metadata(off, 1):
                bad.append(("refcount block", off))
        for i in range(q.l1_size):
            off = q.l1[i] & OFF_MASK
            if off and (off & q.cmask) == 0 and self.mark_metadata(off, 1):
                bad.append(("L2 table", off))
        return bad

    def mark_l1_tables(self, uint64_t l1_offset, uint64_t l1_size):
        """Mark a snapshot's L1 table and the L2 tables it names; returns overlaps found."""
        cdef uint64_t i, off
        cdef uint64_t *tbl
        cdef Q2 *q = &self.q
        bad = 0
        if l1_size == 0:
            return 0
        if l1_size > (32 << 20) // 8:
            raise Qcow2Error(f"qcow2: snapshot L1 table of {l1_size} entries is too large")
        tbl = <uint64_t*>malloc(l1_size * 8)
        if tbl == NULL:
            raise MemoryError()
        try:
            q2_raise(q, read_table(q, tbl, l1_size, l1_offset))
            bad += self.mark_metadata(l1_offset, l1_size * 8)
            lock(q)
            for i in range(l1_size):
                off = tbl[i] & OFF_MASK
                if off and (off & q.cmask) == 0:
                    # a snapshot's L2 table is usually shared with the active one
                    meta_set(q, off >> q.cluster_bits, 1, True)
            q2_unlock(q)
        finally:
            free(tbl)
        return bad

    # -- flush, map, read, write ----------------------------------------------------------

    def flush(self):
        """Write back cached metadata in crash-safe order and fdatasync."""
        cdef int rc
        with nogil:
            q2_lock(&self.q)
            rc = q2_unlock_rc(&self.q, do_flush(&self.q))
        q2_raise(&self.q, rc)

    def write_back(self):
        """Cached metadata into the file without waiting for the disk (qcow2_l2's
        do_write_back): a killed process then loses no acknowledged write."""
        cdef int rc
        with nogil:
            q2_lock(&self.q)
            rc = q2_unlock_rc(&self.q, do_write_back(&self.q))
        q2_raise(&self.q, rc)

    def map_range(self, uint64_t offset, uint64_t length):
        """[(start, length, kind, host_offset or None), ...] for the guest range, merged."""
        cdef uint64_t n, host = 0
        cdef int k
        out = []
        last = None
        if offset > self.q.size or length > self.q.size - offset:
            raise Qcow2Error(f"qcow2: map of {offset:#x}+{length:#x} is outside the disk")
        while length:
            with nogil:
                q2_lock(&self.q)
                k = classify(&self.q, offset, length, &n, &host)
                q2_unlock(&self.q)
            q2_raise(&self.q, k)
            if k != K_DATA and k != K_ZERO:
                host = 0        # (a zero cluster that keeps its allocation has a host)
            if last is not None and last[2] == KIND_NAMES[k] and k != K_COMP and (
                    last[3] is not None and last[3] + last[1] == host if host
                    else last[3] is None):
                last[1] += n
            else:
                last = [offset, n, KIND_NAMES[k], host if host else None]
                out.append(last)
            offset += n
            length -= n
        return [tuple(x) for x in out]

    def set_backing(self, read, uint64_t size):
        """Reads of unallocated clusters go to `read(offset, memoryview)` below `size`."""
        self._backing_read = read
        self.q.backing_read = NULL if read is None else <PyObject*>read
        self.q.has_backing = read is not None
        self.q.backing_size = size if read is not None else 0

    def read(self, uint64_t offset, unsigned char[::1] buf not None):
        """Fill `buf` with the guest bytes at `offset`."""
        cdef uint64_t n = buf.shape[0]
        cdef int rc
        if offset > self.q.size or n > self.q.size - offset:
            raise Qcow2Error(f"qcow2: read of {offset:#x}+{n:#x} is outside the disk")
        if n == 0:
            return
        with nogil:
            rc = do_read(&self.q, offset, &buf[0], n)
        q2_raise(&self.q, rc)

    cdef check_writable(self, str what, uint64_t offset, uint64_t length):
        if self.q.readonly:
            raise Qcow2Error("qcow2: the image is open read-only")
        if offset > self.q.size or length > self.q.size - offset:
            raise Qcow2Error(f"qcow2: {what} of {offset:#x}+{length:#x} is outside the disk")

    def write(self, uint64_t offset, const unsigned char[::1] buf not None):
        """Write `buf` at guest offset `offset`, allocating clusters as needed."""
        cdef uint64_t n = buf.shape[0]
        cdef int rc
        self.check_writable("write", offset, n)
        if n == 0:
            return
        with nogil:
            rc = do_write(&self.q, offset, &buf[0], n)
        q2_raise(&self.q, rc)

    def write_batch(self, const unsigned char[::1] buf not None, list pieces not None,
                    uint64_t granule=0):
        """Write `pieces` [(guest_offset, buf_offset, length), ...] of `buf` in one call
        with the GIL released, skipping `granule`-sized blocks of zeroes when `granule` is
        not 0; data for contiguous host clusters is gathered into one pwritev."""
        cdef size_t i, n = len(pieces)
        cdef uint64_t *arr
        cdef uint64_t g, b, ln
        cdef int rc
        if self.q.readonly:
            raise Qcow2Error("qcow2: the image is open read-only")
        if n == 0:
            return
        arr = <uint64_t*>malloc(n * 24)
        if arr == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                g, b, ln = pieces[i]
                if b > <uint64_t>buf.shape[0] or ln > buf.shape[0] - b:
                    raise ValueError(f"piece {b:#x}+{ln:#x} is outside the buffer")
                self.check_writable("write", g, ln)
                arr[3 * i], arr[3 * i + 1], arr[3 * i + 2] = g, b, ln
            with nogil:
                q2_lock(&self.q)
                rc = q2_unlock_rc(&self.q, write_pieces(&self.q, &buf[0], arr, n, granule))
            q2_raise(&self.q, rc)
        finally:
            free(arr)

    def zero(self, uint64_t offset, uint64_t length):
        """Zero a range aligned to the zero unit (cluster, or subcluster with extended L2)
        through metadata only. v2 images without a zero flag must have no backing file."""
        cdef int rc
        cdef uint64_t unit = self.zero_unit
        self.check_writable("zero", offset, length)
        if offset % unit or (length % unit and offset + length != self.q.size):
            raise ValueError("zero() needs a range aligned to the zero unit")
        with nogil:
            q2_lock(&self.q)
            rc = q2_unlock_rc(&self.q, do_zero(&self.q, offset, length, False))
        q2_raise(&self.q, rc)

    def unmap(self, uint64_t offset, uint64_t length):
        """Deallocate a unit-aligned range so it reads from the backing file again."""
        cdef int rc
        if self.q.readonly:
            raise Qcow2Error("qcow2: the image is open read-only")
        if offset > self.q.size or length > self.q.size - offset or offset % self.zero_unit:
            raise ValueError("unmap() needs an aligned range inside the disk")
        with nogil:
            q2_lock(&self.q)
            rc = q2_unlock_rc(&self.q, do_zero(&self.q, offset, length, True))
        q2_raise(&self.q, rc)

    def write_compressed(self, uint64_t offset, const unsigned char[::1] data not None):
        """Store one already-compressed cluster at the cluster-aligned guest `offset`."""
        cdef uint64_t n = data.shape[0]
        cdef int rc
        if self.q.readonly:
            raise Qcow2Error("qcow2: the image is open read-only")
        if offset & self.q.cmask or offset >= self.q.size or n == 0 or \
                n >= self.q.cluster_size:
            raise ValueError("write_compressed needs a cluster offset and less than a cluster")
        with nogil:
            q2_lock(&self.q)
            rc = q2_unlock_rc(&self.q, put_compressed(&self.q, offset, &data[0], n))
        q2_raise(&self.q, rc)

    def discard_pending(self):
        """Number of clusters waiting for the next flush to lose a reference (tests)."""
        return self.q.nfrees

    # -- internal snapshots (qcow2_snapshot) -----------------------------------------------

    def snapshot_refs(self, const unsigned char[::1] l1 not None, int delta):
        """`delta` (+1, -1 or 0) for every cluster the L1 table `l1` (big-endian, as in
        the file) references, then the active tables' COPIED flags; flushes before and
        after (the tables are read from the file)."""
        cdef Q2 *q = &self.q
        cdef uint64_t n = <uint64_t>l1.shape[0] // 8
        cdef const uint64_t *t = <const uint64_t*>&l1[0] if n else NULL
        cdef int rc
        with nogil:
            q2_lock(q)
            rc = do_flush(q)
            if rc == 0 and delta:
                rc = add_refs(q, t, n, delta)
            if rc == 0:
                rc = fix_copied(q)
            if rc == 0:
                rc = do_flush(q)
            q2_unlock_rc(q, rc)
        q2_raise(q, rc)

    def alloc_meta(self, uint64_t length):
        """Host offset of fresh clusters (refcount 1) for `length` bytes of metadata."""
        cdef uint64_t n = (length + self.q.cmask) >> self.q.cluster_bits
        cdef int64_t off
        cdef int rc = 0
        if n == 0:
            n = 1
        with nogil:
            q2_lock(&self.q)
            off = alloc(&self.q, n)
            if off < 0:
                rc = -1
            else:
                rc = meta_set(&self.q, <uint64_t>off >> self.q.cluster_bits, n, True)
            q2_unlock_rc(&self.q, min(rc, 0))
        q2_raise(&self.q, min(rc, 0))
        return off

    def free_meta(self, uint64_t offset, uint64_t length):
        """Drop the reference to the clusters of the metadata at `offset` (written now)."""
        cdef uint64_t c, last = (offset + (length if length else 1) - 1) >> \
            self.q.cluster_bits
        cdef int rc = 0
        with nogil:
            q2_lock(&self.q)
            c = offset >> self.q.cluster_bits
            while rc == 0 and c <= last:
                rc = rc_add(&self.q, c, -1)
                c += 1
            if rc == 0:
                rc = write_refcounts(&self.q, True)
            q2_unlock_rc(&self.q, rc)
        q2_raise(&self.q, rc)

    def load_l1(self, const unsigned char[::1] l1 not None):
        """Make the big-endian entries `l1` the active L1 table (the rest zero), written
        at the next flush; the L2 cache is dropped by the next snapshot_refs."""
        cdef uint64_t i, n = <uint64_t>l1.shape[0] // 8
        if n > self.q.l1_size:
            raise Qcow2Error("qcow2: that L1 table is larger than the active one")
        with nogil:
            q2_lock(&self.q)
            for i in range(self.q.l1_size):
                self.q.l1[i] = be64toh((<const uint64_t*>&l1[0])[i]) if i < n else 0
            self.q.l1_dirty = True
            q2_unlock(&self.q)

    # -- resize and preallocation ---------------------------------------------------------

    def grow_l1(self, uint64_t new_size):
        """Move the L1 table to a larger one with `new_size` entries (flush to commit)."""
        if new_size <= self.q.l1_size:
            return
        if new_size > (32 << 20) // 8:
            raise Qcow2Error(f"qcow2: an L1 table of {new_size} entries is too large")
        cdef int rc
        with nogil:
            q2_lock(&self.q)
            rc = q2_unlock_rc(&self.q, l1_grow(&self.q, new_size))
        q2_raise(&self.q, rc)

    def set_size(self, uint64_t size):
        """Record a new virtual size (the L1 table must already cover it) and sync."""
        cdef uint64_t be = htobe64(size)
        cdef Q2 *q = &self.q
        cdef uint64_t need = (size + (q.cluster_size << q.l2_bits) - 1) >> \
            (q.cluster_bits + q.l2_bits)
        cdef int rc
        if need > q.l1_size:
            raise Qcow2Error("qcow2: the L1 table is too small for that size")
        with nogil:
            q2_lock(q)
            rc = do_flush(q)
            if rc == 0:
                rc = pwrite_all(q, &be, 8, 24)
            if rc == 0:
                rc = q2_sync(q)
            if rc == 0:
                q.size = size
            q2_unlock_rc(q, rc)
        q2_raise(q, rc)

    def preallocate(self):
        """Point every unallocated cluster at a fresh host cluster (preallocation=metadata);
        returns the end of the allocated host area in bytes."""
        cdef Q2 *q = &self.q
        cdef uint64_t gc, ncl = (q.size + q.cmask) >> q.cluster_bits, top = 0
        cdef uint64_t e
        cdef int64_t new
        cdef int32_t s
        cdef int rc = 0
        with nogil:
            q2_lock(q)
            for gc in range(ncl):
                s = l2_get(q, gc >> q.l2_bits, True)
                if s < 0:
                    rc = -1
                    break
                e = l2_entry(q, s, gc & ((1ULL << q.l2_bits) - 1))
                if e & (OFF_MASK | COMPRESSED):
                    continue
                new = alloc(q, 1)
                if new < 0:
                    rc = -1
                    break
                top = max(top, <uint64_t>new + q.cluster_size)
                rc = set_entry(q, gc, <uint64_t>new | COPIED, ALL_ALLOC)
                if rc < 0:
                    break
            if rc == 0:
                rc = do_flush(q)
            q2_unlock_rc(q, rc)
        q2_raise(q, rc)
        return top

    # -- bench and check ------------------------------------------------------------------

    def bench(self, bint write, uint64_t count, uint64_t bufsize, uint64_t step,
              uint64_t offset, int pattern, uint64_t flush_interval, uint64_t first=0,
              uint64_t stride=1):
        """The `img bench` request loop, run here so Python costs nothing per request:
        requests first, first+stride, ... (< count) placed as `qemu-img bench` places them
        (the offset advances by `step` modulo the size, back to 0 where the buffer would
        not fit). Several threads may run it at once with different `first` (the GIL is
        released throughout), so `stride` requests are in flight; the one whose number is
        a multiple of `flush_interval` flushes."""
        cdef uint8_t *buf
        cdef uint64_t i, off = offset
        cdef int rc = 0
        cdef Q2 *q = &self.q
        if bufsize > q.size or bufsize == 0:
            raise Qcow2Error("qcow2: the bench buffer must fit in the image")
        if write and q.readonly:
            raise Qcow2Error("qcow2: the image is open read-only")
        if stride == 0 or first >= stride:
            raise ValueError("bench needs first < stride")
        if posix_memalign(<void**>&buf, 4096, bufsize) != 0:
            raise MemoryError()
        memset(buf, pattern, bufsize)
        with nogil:
            for i in range(count):
                if off + bufsize > q.size:
                    off = 0
                if i % stride == first:
                    rc = do_write(q, off, buf, bufsize) if write else \
                        do_read(q, off, buf, bufsize)
                    if rc < 0:
                        break
                    if flush_interval and (i + 1) % flush_interval == 0:
                        q2_lock(q)
                        rc = q2_unlock_rc(q, do_flush(q))
                        if rc < 0:
                            break
                off = (off + step) % q.size
        free(buf)
        q2_raise(q, rc)

    def bench_aio(self, AioQueue queue not None, bint write, uint64_t count,
                  uint64_t bufsize, uint64_t step, uint64_t offset, int pattern,
                  uint64_t flush_interval, bint dsync=False):
        """`img bench -i io_uring|native`: one thread keeps queue.depth requests in flight
        (qcow2_pipe.run_aio, the GIL released): data of mapped clusters through the queue,
        the rest through the engine. `dsync` (writethrough, directsync): queued writes are
        durable when complete (RWF_DSYNC) and the engine's writes are followed by a flush."""
        cdef uint8_t *buf
        cdef AioRun r
        cdef int rc
        cdef Q2 *q = &self.q
        if bufsize > q.size or bufsize == 0:
            raise Qcow2Error("qcow2: the bench buffer must fit in the image")
        if write and q.readonly:
            raise Qcow2Error("qcow2: the image is open read-only")
        if queue.q.depth == 0:
            raise ValueError("the aio queue is closed")
        if posix_memalign(<void**>&buf, 4096, bufsize) != 0:
            raise MemoryError()
        memset(buf, pattern, bufsize)
        memset(&r, 0, sizeof(r))
        r.ctx, r.map, r.flush = q, aio_map, aio_flush
        r.write, r.count, r.bufsize, r.step = write, count, bufsize, step
        r.offset, r.size, r.flush_interval = offset, q.size, flush_interval
        r.rw_flags = RWF_DSYNC if dsync and write else 0
        r.flush_sync_writes = dsync and write
        with nogil:
            rc = run_aio(&queue.q, &r, buf)
        if not r.stuck:             # else the kernel may still write it: keep it
            free(buf)
        if rc < 0 and r.err:
            q2_fail(q, E_IO, r.err, r.err_off)
        q2_raise(q, rc)

    def check(self, list l1_tables not None, list fixed not None, int fix=0):
        """Count the references to every host cluster and compare with the refcounts.

        `l1_tables` is [(offset, entries, active)] (active first), `fixed` the other
        metadata ranges [(offset, length)] (header, snapshot table). `fix` 1 repairs leaks,
        2 everything. Returns a dict of counts and qemu-img style messages."""
        lock(&self.q)
        try:
            return run_check(&self.q, l1_tables, fixed, fix)
        finally:
            q2_unlock_rc(&self.q, -1)
