# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""qcow2 cluster mapping: L1/L2 lookup through an L2 cache, refcounts of every width,
cluster allocation, copy-on-write, zero/discard, compressed clusters, extended L2 entries,
and the reference walk behind `check`.

Policy (header parsing, backing chains, which operation to run) lives in pyhv.disk; this
module does the per-cluster work with the GIL released. Every table read from the file goes
through `pread_exact` (nothing past the end of the file) plus an alignment check, and every
data write is checked against a map of metadata clusters, so a malformed image raises
Qcow2Error instead of crashing or writing into metadata.

Crash safety: data is written at once; metadata is cached and written back on flush (or
eviction) in QEMU's order: data, barrier, refcount blocks and table, barrier, L2 tables,
barrier, L1, barrier, then the refcount decrements of clusters dropped since the last flush,
barrier. Freed clusters are reused only after that. A crash leaves at most leaked clusters.
"""

from cpython.buffer cimport PyBUF_READ, PyBUF_WRITE
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.errno cimport EINTR, errno
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memset
from posix.unistd cimport fdatasync, ftruncate, pread, pwrite

from hvcore.includes.endian cimport (be16toh, be32toh, be64toh, htobe16, htobe32,
                                     htobe64)

import os

cdef uint64_t COPIED = 1ULL << 63
cdef uint64_t COMPRESSED = 1ULL << 62
cdef uint64_t ZEROF = 1
cdef uint64_t OFF_MASK = 0x00fffffffffffe00ULL
cdef uint64_t RT_MASK = 0xfffffffffffffe00ULL
cdef uint64_t ALL_ALLOC = 0xffffffffULL
cdef uint64_t ALL_ZERO = 0xffffffff00000000ULL
cdef uint64_t MAX_HOST = 1ULL << 56

cdef enum:
    K_UNALLOC = 0
    K_DATA = 1
    K_ZERO = 2
    K_COMP = 3

cdef enum:
    E_IO = 1
    E_EOF = 2
    E_L1_RANGE = 3
    E_L2_ALIGN = 4
    E_DATA_ALIGN = 5
    E_META = 6
    E_COMP_RANGE = 7
    E_RB_ALIGN = 8
    E_CALLBACK = 9
    E_DECOMPRESS = 10
    E_RC_OVERFLOW = 11
    E_RC_UNDERFLOW = 12
    E_BITMAP = 13
    E_FULL = 14
    E_NOMEM = 15
    E_RANGE = 16

KIND_NAMES = ("unallocated", "data", "zero", "compressed")


class Qcow2Error(OSError):
    """The image is malformed or an I/O call failed; the message names the cause."""

    def __init__(self, message, errno_=0):
        super().__init__(errno_, message)
        self.message = message

    def __str__(self):
        return self.message


cdef inline uint64_t rc_read(const uint8_t *blk, uint32_t order, uint64_t i) noexcept nogil:
    if order == 4:
        return be16toh((<const uint16_t*>blk)[i])
    if order == 3:
        return blk[i]
    if order == 5:
        return be32toh((<const uint32_t*>blk)[i])
    if order == 6:
        return be64toh((<const uint64_t*>blk)[i])
    # sub-byte widths: entry i sits in byte i*bits/8, lowest bits first
    cdef uint32_t bits = 1U << order
    cdef uint32_t per = 8 // bits
    return (blk[i // per] >> ((i % per) * bits)) & ((1U << bits) - 1)


cdef inline void rc_write(uint8_t *blk, uint32_t order, uint64_t i, uint64_t v) noexcept nogil:
    cdef uint32_t bits, per, shift
    if order == 4:
        (<uint16_t*>blk)[i] = htobe16(<uint16_t>v)
    elif order == 3:
        blk[i] = <uint8_t>v
    elif order == 5:
        (<uint32_t*>blk)[i] = htobe32(<uint32_t>v)
    elif order == 6:
        (<uint64_t*>blk)[i] = htobe64(v)
    else:
        bits = 1U << order
        per = 8 // bits
        shift = (i % per) * bits
        blk[i // per] = <uint8_t>((blk[i // per] & ~(((1U << bits) - 1) << shift)) | (v << shift))


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


def nonzero_runs(const uint8_t[::1] buf not None, size_t granule):
    """[(start, end), ...] of the granules of `buf` that hold a non-zero byte, merged: the
    zero detection behind sparse `convert`."""
    cdef size_t n = buf.shape[0], pos = 0, end, start = 0
    cdef bint inrun = False, z
    out = []
    if granule == 0:
        raise ValueError("granule must be positive")
    if n == 0:
        return out
    cdef const uint8_t *p = &buf[0]
    while pos < n:
        end = min(pos + granule, n)
        z = all_zero(p + pos, end - pos)
        if not z and not inrun:
            start = pos
            inrun = True
        elif z and inrun:
            out.append((start, pos))
            inrun = False
        pos = end
    if inrun:
        out.append((start, n))
    return out


cdef class Qcow2:
    """One open qcow2 file: tables, caches and the per-cluster read/write/zero loops.

    Built by pyhv.disk.qcow2 after it has parsed and validated the header."""

    cdef int fd
    cdef readonly bint readonly, extended, v3
    cdef readonly uint32_t cluster_bits
    cdef readonly uint64_t cluster_size, size
    cdef uint64_t cmask
    cdef uint32_t l2_bits, ewords, sc_bits
    cdef uint64_t csize_shift, csize_mask
    # L1 table (host byte order) and the L2 cache, indexed by L1 index
    cdef uint64_t *l1
    cdef readonly uint64_t l1_size, l1_offset
    cdef bint l1_dirty, l1_moved
    cdef int32_t *l1_slot
    cdef uint8_t **l2_buf
    cdef int64_t *l2_idx
    cdef uint64_t *l2_tick
    cdef uint8_t *l2_dirty
    cdef int32_t l2_slots
    cdef uint64_t tick
    # refcount table (host order) and the refcount block cache, indexed by table index
    cdef readonly uint32_t refcount_order
    cdef uint64_t rc_max
    cdef uint32_t rb_bits
    cdef uint64_t *rt
    cdef readonly uint64_t rt_n, rt_offset
    cdef bint rt_dirty, rt_moved
    cdef int32_t *rt_slot
    cdef uint8_t **rb_buf
    cdef int64_t *rb_idx
    cdef uint64_t *rb_tick
    cdef uint8_t *rb_dirty
    cdef int32_t rb_slots
    cdef uint64_t free_hint
    cdef uint64_t *frees
    cdef size_t nfrees, cap_frees
    cdef uint64_t ex_lo[8]
    cdef uint64_t ex_hi[8]
    cdef int nex
    cdef uint32_t *chk_refs
    cdef uint64_t chk_n
    # file and metadata map (one bit per host cluster)
    cdef readonly uint64_t file_end
    cdef uint8_t *meta
    cdef uint64_t meta_n
    # one pending data write, extended while requests stay contiguous
    cdef uint64_t pw_host, pw_len
    cdef const uint8_t *pw_buf
    cdef uint8_t *scratch
    cdef uint8_t *cbuf
    cdef uint8_t *dbuf
    cdef uint64_t dkey
    cdef uint64_t cfree
    # error state: nogil code sets these, the wrapper raises
    cdef int err
    cdef uint64_t ea, eb
    cdef object exc
    cdef bint has_backing
    cdef public bint unsafe_cache       # qemu's cache=unsafe: order writes, skip fdatasync
    cdef public uint64_t backing_size
    cdef object _backing_read
    cdef public object decompress

    def __cinit__(self, int fd, *, int cluster_bits, uint64_t size, uint64_t l1_offset,
                  uint64_t l1_size, uint64_t rt_offset, uint64_t rt_clusters,
                  int refcount_order, bint extended, bint v3, bint readonly,
                  uint64_t file_end, uint64_t l2_cache=0, uint64_t rb_cache=0):
        cdef uint64_t i
        self.fd = -1
        if not 9 <= cluster_bits <= 21:
            raise Qcow2Error(f"cluster_bits {cluster_bits} is outside 9..21")
        if not 0 <= refcount_order <= 6:
            raise Qcow2Error(f"refcount_order {refcount_order} is outside 0..6")
        if extended and cluster_bits < 14:
            raise Qcow2Error("extended L2 entries need clusters of at least 16 KiB")
        self.cluster_bits = cluster_bits
        self.cluster_size = 1ULL << cluster_bits
        self.cmask = self.cluster_size - 1
        self.extended = extended
        self.v3 = v3
        self.ewords = 2 if extended else 1
        self.l2_bits = cluster_bits - 3 - (1 if extended else 0)
        self.sc_bits = cluster_bits - 5
        self.csize_shift = 62 - (cluster_bits - 8)
        self.csize_mask = (1ULL << (cluster_bits - 8)) - 1
        self.refcount_order = refcount_order
        self.rc_max = 0xffffffffffffffffULL if refcount_order == 6 else \
            (1ULL << (1 << refcount_order)) - 1
        self.rb_bits = cluster_bits + 3 - refcount_order
        self.size = size
        self.readonly = readonly
        self.file_end = file_end
        if l1_size > (32 << 20) // 8 or rt_clusters > (8 << 20) // (1 << cluster_bits) + 64:
            raise Qcow2Error(f"table too large (L1 {l1_size} entries, refcount table "
                             f"{rt_clusters} clusters)")
        if l1_offset & self.cmask or rt_offset & self.cmask:
            raise Qcow2Error("L1 or refcount table offset is not cluster aligned")
        if l1_size and (l1_offset == 0 or l1_offset + l1_size * 8 > file_end):
            raise Qcow2Error(f"L1 table at {l1_offset:#x} ({l1_size} entries) lies outside "
                             "the file")
        if rt_clusters == 0 or rt_offset == 0 or \
                rt_offset + (rt_clusters << cluster_bits) > file_end:
            raise Qcow2Error(f"refcount table at {rt_offset:#x} ({rt_clusters} clusters) "
                             "lies outside the file")
        self.l1_size = l1_size
        self.l1_offset = l1_offset
        self.rt_offset = rt_offset
        self.rt_n = (rt_clusters << cluster_bits) // 8
        if l2_cache == 0:
            l2_cache = max(l1_size, 1) << cluster_bits      # the whole disk
        self.l2_slots = <int32_t>max(4, min(l2_cache >> cluster_bits, max(l1_size, 1)))
        if rb_cache == 0:
            rb_cache = 4 << 20
        self.rb_slots = <int32_t>max(4, rb_cache >> cluster_bits)
        self.l1 = <uint64_t*>calloc(max(l1_size, 1), 8)
        self.l1_slot = <int32_t*>malloc(max(l1_size, 1) * 4)
        self.l2_buf = <uint8_t**>calloc(self.l2_slots, sizeof(uint8_t*))
        self.l2_idx = <int64_t*>malloc(self.l2_slots * 8)
        self.l2_tick = <uint64_t*>calloc(self.l2_slots, 8)
        self.l2_dirty = <uint8_t*>calloc(self.l2_slots, 1)
        self.rt = <uint64_t*>calloc(self.rt_n, 8)
        self.rt_slot = <int32_t*>malloc(self.rt_n * 4)
        self.rb_buf = <uint8_t**>calloc(self.rb_slots, sizeof(uint8_t*))
        self.rb_idx = <int64_t*>malloc(self.rb_slots * 8)
        self.rb_tick = <uint64_t*>calloc(self.rb_slots, 8)
        self.rb_dirty = <uint8_t*>calloc(self.rb_slots, 1)
        self.scratch = <uint8_t*>malloc(self.cluster_size)
        self.cbuf = <uint8_t*>malloc(self.cluster_size * 2 + 1024)
        self.dbuf = <uint8_t*>malloc(self.cluster_size)
        if not (self.l1 and self.l1_slot and self.l2_buf and self.l2_idx and self.l2_tick and
                self.l2_dirty and self.rt and self.rt_slot and self.rb_buf and self.rb_idx and
                self.rb_tick and self.rb_dirty and self.scratch and self.cbuf and self.dbuf):
            raise MemoryError("cannot allocate the qcow2 tables")
        for i in range(max(l1_size, 1)):
            self.l1_slot[i] = -1
        for i in range(<uint64_t>self.l2_slots):
            self.l2_idx[i] = -1
        for i in range(self.rt_n):
            self.rt_slot[i] = -1
        for i in range(<uint64_t>self.rb_slots):
            self.rb_idx[i] = -1
        self.fd = os.dup(fd)
        self._load(rt_clusters)

    def __dealloc__(self):
        cdef int32_t i
        if self.l2_buf:
            for i in range(self.l2_slots):
                free(self.l2_buf[i])
        if self.rb_buf:
            for i in range(self.rb_slots):
                free(self.rb_buf[i])
        free(self.l1)
        free(self.l1_slot)
        free(self.l2_buf)
        free(self.l2_idx)
        free(self.l2_tick)
        free(self.l2_dirty)
        free(self.rt)
        free(self.rt_slot)
        free(self.rb_buf)
        free(self.rb_idx)
        free(self.rb_tick)
        free(self.rb_dirty)
        free(self.scratch)
        free(self.cbuf)
        free(self.dbuf)
        free(self.meta)
        free(self.frees)
        if self.fd >= 0:
            os.close(self.fd)

    cdef _load(self, uint64_t rt_clusters):
        cdef uint64_t i, n
        cdef int rc
        with nogil:
            rc = self.pread_exact(self.l1, self.l1_size * 8, self.l1_offset)
            if rc == 0:
                rc = self.pread_exact(self.rt, self.rt_n * 8, self.rt_offset)
        self.check_error(rc)
        for i in range(self.l1_size):
            self.l1[i] = be64toh(self.l1[i])
        for i in range(self.rt_n):
            self.rt[i] = be64toh(self.rt[i])
        n = (self.file_end + self.cmask) >> self.cluster_bits
        self.free_hint = 0

    # -- errors ---------------------------------------------------------------------------

    cdef int fail(self, int code, uint64_t a, uint64_t b) noexcept nogil:
        if self.err == 0:
            self.err = code
            self.ea = a
            self.eb = b
        return -1

    cdef check_error(self, int rc):
        if rc >= 0 and self.err == 0:
            return
        code, a, b, exc = self.err, self.ea, self.eb, self.exc
        self.err = 0
        self.exc = None
        self.pw_len = 0
        if code == E_CALLBACK and exc is not None:
            raise exc
        msg = {
            E_IO: lambda: f"I/O error at offset {b:#x}: {os.strerror(a)}",
            E_EOF: lambda: f"read of {b} bytes at {a:#x} goes past the end of the file",
            E_L1_RANGE: lambda: f"guest offset {a:#x} is beyond the L1 table",
            E_L2_ALIGN: lambda: f"L2 table offset {b:#x} (L1 index {a}) is not cluster aligned",
            E_DATA_ALIGN: lambda: f"data cluster offset {b:#x} for guest offset {a:#x} is not "
                                  "cluster aligned",
            E_META: lambda: f"refusing to write data into cluster at {a:#x}, which holds "
                            "metadata (corrupt L2 or refcount entry)",
            E_COMP_RANGE: lambda: f"compressed cluster descriptor {b:#x} points outside the "
                                  "file",
            E_RB_ALIGN: lambda: f"refcount block offset {b:#x} (table index {a}) is not "
                                "cluster aligned",
            E_DECOMPRESS: lambda: f"compressed cluster {a:#x} decompresses to {b} bytes, "
                                  "not one cluster",
            E_RC_OVERFLOW: lambda: f"refcount of cluster at {a:#x} would overflow",
            E_RC_UNDERFLOW: lambda: f"refcount of cluster at {a:#x} is already 0",
            E_BITMAP: lambda: f"invalid subcluster bitmap {b:#x} for guest offset {a:#x}",
            E_FULL: lambda: "the image would grow past the largest qcow2 offset (2^56)",
            E_NOMEM: lambda: "out of memory for qcow2 tables",
            E_RANGE: lambda: f"request at {a:#x}+{b:#x} is outside the disk",
        }.get(code, lambda: f"qcow2 internal error {code}")()
        raise Qcow2Error("qcow2: " + msg, a if code == E_IO else 0)

    # -- file I/O -------------------------------------------------------------------------

    cdef int pread_exact(self, void *buf, uint64_t n, uint64_t off) noexcept nogil:
        cdef ssize_t r
        cdef uint64_t done = 0
        if off > self.file_end or n > self.file_end - off:
            return self.fail(E_EOF, off, n)
        while done < n:
            r = pread(self.fd, <uint8_t*>buf + done, n - done, off + done)
            if r < 0:
                if errno == EINTR:
                    continue
                return self.fail(E_IO, errno, off)
            if r == 0:
                return self.fail(E_EOF, off, n)
            done += r
        return 0

    cdef int pwrite_all(self, const void *buf, uint64_t n, uint64_t off) noexcept nogil:
        cdef ssize_t r
        cdef uint64_t done = 0
        while done < n:
            r = pwrite(self.fd, <const uint8_t*>buf + done, n - done, off + done)
            if r < 0:
                if errno == EINTR:
                    continue
                return self.fail(E_IO, errno, off)
            done += r
        if off + n > self.file_end:
            self.file_end = off + n
        return 0

    cdef int sync(self) noexcept nogil:
        if self.unsafe_cache:
            return 0
        if fdatasync(self.fd) < 0:
            return self.fail(E_IO, errno, 0)
        return 0

    cdef int flush_pw(self) noexcept nogil:
        cdef int rc = 0
        if self.pw_len:
            rc = self.pwrite_all(self.pw_buf, self.pw_len, self.pw_host)
            self.pw_len = 0
        return rc

    cdef int queue_pw(self, uint64_t host, const uint8_t *buf, uint64_t n) noexcept nogil:
        if self.pw_len and self.pw_host + self.pw_len == host and self.pw_buf + self.pw_len == buf:
            self.pw_len += n
            return 0
        if self.flush_pw() < 0:
            return -1
        self.pw_host = host
        self.pw_buf = buf
        self.pw_len = n
        return 0

    # -- metadata map ---------------------------------------------------------------------

    cdef inline bint is_meta(self, uint64_t c) noexcept nogil:
        return c < self.meta_n and (self.meta[c >> 3] >> (c & 7)) & 1

    cdef int meta_set(self, uint64_t c, uint64_t n, bint on) noexcept nogil:
        """Mark clusters [c, c+n) as metadata (or not); returns how many were already set."""
        cdef uint64_t want, i, hits = 0
        cdef uint8_t *grown
        if c + n > self.meta_n:
            want = max(c + n, self.meta_n * 2, 4096)
            want = (want + 7) & ~7ULL
            grown = <uint8_t*>realloc(self.meta, want // 8)
            if grown == NULL:
                return self.fail(E_NOMEM, 0, 0)
            memset(grown + self.meta_n // 8, 0, (want - self.meta_n) // 8)
            self.meta = grown
            self.meta_n = want
        for i in range(c, c + n):
            if (self.meta[i >> 3] >> (i & 7)) & 1:
                hits += 1
            if on:
                self.meta[i >> 3] |= <uint8_t>(1 << (i & 7))
            else:
                self.meta[i >> 3] &= <uint8_t>~(1 << (i & 7))
        return <int>min(hits, 0x7fffffff)

    def mark_metadata(self, uint64_t offset, uint64_t length):
        """Record [offset, offset+length) as metadata; returns clusters that already were."""
        cdef int hits
        if length == 0:
            return 0
        hits = self.meta_set(offset >> self.cluster_bits,
                             ((offset + length - 1) >> self.cluster_bits)
                             - (offset >> self.cluster_bits) + 1, True)
        self.check_error(hits)
        return hits

    def mark_tables(self):
        """Mark the header, L1, refcount table and blocks and active L2 tables as metadata.

        Returns a list of (what, offset) for tables that overlap metadata marked before."""
        cdef uint64_t i, off
        bad = []
        if self.mark_metadata(0, 1):
            bad.append(("header", 0))
        if self.mark_metadata(self.l1_offset, self.l1_size * 8):
            bad.append(("L1 table", self.l1_offset))
        if self.mark_metadata(self.rt_offset, self.rt_n * 8):
            bad.append(("refcount table", self.rt_offset))
        for i in range(self.rt_n):
            off = self.rt[i] & RT_MASK
            if off and (off & self.cmask) == 0 and self.mark_metadata(off, 1):
                bad.append(("refcount block", off))
        for i in range(self.l1_size):
            off = self.l1[i] & OFF_MASK
            if off and (off & self.cmask) == 0 and self.mark_metadata(off, 1):
                bad.append(("L2 table", off))
        return bad

    def mark_l1_tables(self, uint64_t l1_offset, uint64_t l1_size):
        """Mark a snapshot's L1 table and the L2 tables it names; returns overlaps found."""
        cdef uint64_t i, off
        cdef uint64_t *tbl
        cdef int rc
        bad = 0
        if l1_size == 0:
            return 0
        if l1_size > (32 << 20) // 8:
            raise Qcow2Error(f"qcow2: snapshot L1 table of {l1_size} entries is too large")
        tbl = <uint64_t*>malloc(l1_size * 8)
        if tbl == NULL:
            raise MemoryError()
        try:
            rc = self.pread_exact(tbl, l1_size * 8, l1_offset)
            self.check_error(rc)
            bad += self.mark_metadata(l1_offset, l1_size * 8)
            for i in range(l1_size):
                off = be64toh(tbl[i]) & OFF_MASK
                if off and (off & self.cmask) == 0:
                    # a snapshot's L2 table is usually shared with the active one
                    self.meta_set(off >> self.cluster_bits, 1, True)
        finally:
            free(tbl)
        return bad

    # -- L2 cache -------------------------------------------------------------------------

    cdef int write_l2_slot(self, int32_t s) noexcept nogil:
        cdef uint64_t off = self.l1[self.l2_idx[s]] & OFF_MASK
        if self.pwrite_all(self.l2_buf[s], self.cluster_size, off) < 0:
            return -1
        self.l2_dirty[s] = 0
        return 0

    cdef int32_t l2_victim(self) noexcept nogil:
        cdef int32_t s, best = 0
        for s in range(self.l2_slots):
            if self.l2_idx[s] < 0:
                best = s
                break
            if self.l2_tick[s] < self.l2_tick[best]:
                best = s
        if self.l2_idx[best] >= 0:
            if self.l2_dirty[best]:
                # what this table references must be on disk before the table
                if self.write_refcounts(True) < 0 or self.write_l2_slot(best) < 0:
                    return -1
            self.l1_slot[self.l2_idx[best]] = -1
            self.l2_idx[best] = -1
        if self.l2_buf[best] == NULL:
            self.l2_buf[best] = <uint8_t*>malloc(self.cluster_size)
            if self.l2_buf[best] == NULL:
                return self.fail(E_NOMEM, 0, 0)
        return best

    cdef int32_t l2_get(self, uint64_t l1i, bint write) noexcept nogil:
        """Cache slot of the L2 table for L1 index `l1i`; -2 when there is none and `write`
        is false; -1 on error. With `write` the table is allocated or copied (when shared
        with a snapshot) so the caller may change it."""
        cdef uint64_t e = self.l1[l1i]
        cdef uint64_t off = e & OFF_MASK
        cdef int32_t s = self.l1_slot[l1i]
        cdef int64_t new
        if s >= 0:
            self.tick += 1
            self.l2_tick[s] = self.tick
            if not write or (e & COPIED):
                return s
        else:
            if off == 0 and not write:
                return -2
            if off & self.cmask:
                return self.fail(E_L2_ALIGN, l1i, off)
            s = self.l2_victim()
            if s < 0:
                return -1
            if off:
                if self.pread_exact(self.l2_buf[s], self.cluster_size, off) < 0:
                    return -1
            else:
                memset(self.l2_buf[s], 0, self.cluster_size)
            self.l1_slot[l1i] = s
            self.l2_idx[s] = l1i
            self.l2_dirty[s] = 0
            self.tick += 1
            self.l2_tick[s] = self.tick
            if not write or (off and (e & COPIED)):
                return s
        new = self.alloc(1)
        if new < 0:
            return -1
        if self.meta_set(<uint64_t>new >> self.cluster_bits, 1, True) < 0:
            return -1
        if off:
            self.add_free(off >> self.cluster_bits)     # the snapshot keeps the old copy
        self.l1[l1i] = <uint64_t>new | COPIED
        self.l1_dirty = True
        self.l2_dirty[s] = 1
        return s

    # -- refcounts ------------------------------------------------------------------------

    cdef int write_rb_slot(self, int32_t s) noexcept nogil:
        if self.pwrite_all(self.rb_buf[s], self.cluster_size,
                           self.rt[self.rb_idx[s]] & RT_MASK) < 0:
            return -1
        self.rb_dirty[s] = 0
        return 0

    cdef int32_t rb_victim(self) noexcept nogil:
        cdef int32_t s, best = 0
        for s in range(self.rb_slots):
            if self.rb_idx[s] < 0:
                best = s
                break
            if self.rb_tick[s] < self.rb_tick[best]:
                best = s
        if self.rb_idx[best] >= 0:
            if self.rb_dirty[best] and self.write_rb_slot(best) < 0:
                return -1
            self.rt_slot[self.rb_idx[best]] = -1
            self.rb_idx[best] = -1
        if self.rb_buf[best] == NULL:
            self.rb_buf[best] = <uint8_t*>malloc(self.cluster_size)
            if self.rb_buf[best] == NULL:
                return self.fail(E_NOMEM, 0, 0)
        return best

    cdef int32_t rb_get(self, uint64_t rti, bint create) noexcept nogil:
        """Cache slot of refcount block `rti`; -2 when it does not exist and `create` is
        false; -1 on error."""
        cdef int32_t s
        cdef uint64_t off
        if rti >= self.rt_n:
            if not create:
                return -2
            if self.grow_rt(rti) < 0:
                return -1
        s = self.rt_slot[rti]
        if s >= 0:
            self.tick += 1
            self.rb_tick[s] = self.tick
            return s
        off = self.rt[rti] & RT_MASK
        if off == 0:
            if not create:
                return -2
            return self.new_refblock(rti)
        if off & self.cmask:
            return self.fail(E_RB_ALIGN, rti, off)
        s = self.rb_victim()
        if s < 0:
            return -1
        if self.pread_exact(self.rb_buf[s], self.cluster_size, off) < 0:
            return -1
        self.rt_slot[rti] = s
        self.rb_idx[s] = rti
        self.tick += 1
        self.rb_tick[s] = self.tick
        return s

    cdef int64_t rc_get(self, uint64_t c) noexcept nogil:
        cdef int32_t s = self.rb_get(c >> self.rb_bits, False)
        if s == -2:
            return 0
        if s < 0:
            return -1
        return <int64_t>rc_read(self.rb_buf[s], self.refcount_order,
                                c & ((1ULL << self.rb_bits) - 1))

    cdef int rc_set(self, uint64_t c, uint64_t v) noexcept nogil:
        cdef int32_t s = self.rb_get(c >> self.rb_bits, True)
        if s < 0:
            return -1
        rc_write(self.rb_buf[s], self.refcount_order, c & ((1ULL << self.rb_bits) - 1), v)
        self.rb_dirty[s] = 1
        return 0

    cdef int rc_inc(self, uint64_t c) noexcept nogil:
        cdef int64_t v = self.rc_get(c)
        if v < 0:
            return -1
        if <uint64_t>v >= self.rc_max:
            return self.fail(E_RC_OVERFLOW, c << self.cluster_bits, 0)
        return self.rc_set(c, v + 1)

    cdef bint excluded(self, uint64_t c) noexcept nogil:
        cdef int i
        for i in range(self.nex):
            if self.ex_lo[i] <= c < self.ex_hi[i]:
                return True
        return False

    cdef int push_ex(self, uint64_t lo, uint64_t hi) noexcept nogil:
        if self.nex >= 8:
            return self.fail(E_NOMEM, 0, 0)
        self.ex_lo[self.nex] = lo
        self.ex_hi[self.nex] = hi
        self.nex += 1
        return 0

    cdef int64_t find_free(self, uint64_t start, uint64_t n) noexcept nogil:
        """First cluster index of `n` free clusters at or after `start`."""
        cdef uint64_t c = start, run = 0
        cdef int64_t v
        while run < n:
            if (c + 1) << self.cluster_bits > MAX_HOST:
                return self.fail(E_FULL, 0, 0)
            v = self.rc_get(c)
            if v < 0:
                return -1
            if v == 0 and not self.excluded(c) and not self.is_meta(c) and \
                    (self.chk_refs == NULL or c >= self.chk_n or self.chk_refs[c] == 0):
                run += 1
            else:
                run = 0
            c += 1
        return <int64_t>(c - n)

    cdef int64_t alloc(self, uint64_t n) noexcept nogil:
        """Allocate `n` contiguous clusters (refcount 1); returns the host offset."""
        cdef int64_t start = self.find_free(self.free_hint, n)
        cdef uint64_t c
        if start < 0:
            return -1
        if self.push_ex(start, start + n) < 0:
            return -1
        for c in range(<uint64_t>start, <uint64_t>start + n):
            if self.rc_set(c, 1) < 0:
                self.nex -= 1
                return -1
        self.nex -= 1
        if <uint64_t>start == self.free_hint:
            self.free_hint = start + n
        return start << self.cluster_bits

    cdef int32_t new_refblock(self, uint64_t rti) noexcept nogil:
        """Create refcount block `rti`, placed inside the range it describes when it can."""
        cdef uint64_t lo = rti << self.rb_bits
        cdef uint64_t hi = lo + (1ULL << self.rb_bits)
        cdef uint64_t c = lo
        cdef int64_t f
        cdef int32_t s
        cdef bint inside = True
        while c < hi and (self.excluded(c) or self.is_meta(c)):
            c += 1
        if c >= hi:
            inside = False
            f = self.find_free(hi, 1)
            if f < 0:
                return -1
            c = f
        s = self.rb_victim()
        if s < 0:
            return -1
        memset(self.rb_buf[s], 0, self.cluster_size)
        self.rt[rti] = c << self.cluster_bits
        self.rt_dirty = True
        self.rt_slot[rti] = s
        self.rb_idx[s] = rti
        self.rb_dirty[s] = 1
        if self.meta_set(c, 1, True) < 0:
            return -1
        if inside:
            rc_write(self.rb_buf[s], self.refcount_order, c - lo, 1)
        else:
            if self.push_ex(c, c + 1) < 0 or self.rc_set(c, 1) < 0:
                return -1
            self.nex -= 1
            s = self.rt_slot[rti]
        return s

    cdef int grow_rt(self, uint64_t need) noexcept nogil:
        """Move the refcount table to the end of the file, large enough for block `need`."""
        cdef uint64_t per = self.cluster_size // 8
        cdef uint64_t t, T, n, c, i, old_off = self.rt_offset, old_n = self.rt_n
        cdef uint64_t *nrt
        cdef int32_t *nslot
        cdef int k
        t = max(self.rt_n << self.rb_bits, (self.file_end + self.cmask) >> self.cluster_bits)
        for k in range(self.nex):
            t = max(t, self.ex_hi[k])
        n = max(need + 1, self.rt_n * 2)
        while True:
            T = (n + per - 1) // per
            if ((t + T + 2) >> self.rb_bits) + 1 <= n:
                break
            n = ((t + T + 2) >> self.rb_bits) + 1
        n = T * per
        nrt = <uint64_t*>calloc(n, 8)
        nslot = <int32_t*>malloc(n * 4)
        if nrt == NULL or nslot == NULL:
            free(nrt)
            free(nslot)
            return self.fail(E_NOMEM, 0, 0)
        memcpy(nrt, self.rt, self.rt_n * 8)
        memcpy(nslot, self.rt_slot, self.rt_n * 4)
        for i in range(self.rt_n, n):
            nslot[i] = -1
        free(self.rt)
        free(self.rt_slot)
        self.rt = nrt
        self.rt_slot = nslot
        self.rt_n = n
        self.rt_offset = t << self.cluster_bits
        self.rt_dirty = self.rt_moved = True
        if self.meta_set(t, T, True) < 0 or self.push_ex(t, t + T) < 0:
            return -1
        for c in range(t, t + T):
            if self.rc_set(c, 1) < 0:
                return -1
        self.nex -= 1
        for c in range(old_off >> self.cluster_bits,
                       (old_off >> self.cluster_bits) + (old_n * 8 + self.cmask) // self.cluster_size):
            if self.add_free(c) < 0:
                return -1
        return 0

    cdef int add_free(self, uint64_t c) noexcept nogil:
        """Drop one reference to cluster `c` at the next flush, after the tables that no
        longer name it are on disk."""
        cdef uint64_t *grown
        if self.nfrees == self.cap_frees:
            self.cap_frees = max(64, self.cap_frees * 2)
            grown = <uint64_t*>realloc(self.frees, self.cap_frees * 8)
            if grown == NULL:
                return self.fail(E_NOMEM, 0, 0)
            self.frees = grown
        self.frees[self.nfrees] = c
        self.nfrees += 1
        return 0

    cdef int free_entry(self, uint64_t e) noexcept nogil:
        """Schedule the host clusters an L2 entry references to lose that reference."""
        cdef uint64_t coff, nsect, first, last, c
        if e & COMPRESSED:
            coff = e & ((1ULL << self.csize_shift) - 1)
            nsect = ((e >> self.csize_shift) & self.csize_mask) + 1
            first = coff >> self.cluster_bits
            last = ((coff & ~511ULL) + nsect * 512 - 1) >> self.cluster_bits
            for c in range(first, last + 1):
                if self.add_free(c) < 0:
                    return -1
            return 0
        if e & OFF_MASK:
            return self.add_free((e & OFF_MASK) >> self.cluster_bits)
        return 0

    # -- flush ----------------------------------------------------------------------------

    cdef int write_refcounts(self, bint barrier) noexcept nogil:
        cdef int32_t s
        cdef uint64_t i
        cdef uint64_t *tmp
        cdef uint32_t clusters
        if barrier:
            if self.flush_pw() < 0 or self.sync() < 0:
                return -1
        for s in range(self.rb_slots):
            if self.rb_idx[s] >= 0 and self.rb_dirty[s] and self.write_rb_slot(s) < 0:
                return -1
        if self.rt_dirty:
            tmp = <uint64_t*>malloc(self.rt_n * 8)
            if tmp == NULL:
                return self.fail(E_NOMEM, 0, 0)
            for i in range(self.rt_n):
                tmp[i] = htobe64(self.rt[i])
            if self.pwrite_all(tmp, self.rt_n * 8, self.rt_offset) < 0:
                free(tmp)
                return -1
            free(tmp)
            self.rt_dirty = False
            if self.rt_moved:
                if self.sync() < 0:
                    return -1
                i = htobe64(self.rt_offset)
                clusters = htobe32(<uint32_t>((self.rt_n * 8) >> self.cluster_bits))
                if self.pwrite_all(&i, 8, 48) < 0 or self.pwrite_all(&clusters, 4, 56) < 0:
                    return -1
                self.rt_moved = False
        return 0

    cdef int write_l1(self) noexcept nogil:
        cdef uint64_t *tmp
        cdef uint64_t i, off
        cdef uint32_t n
        tmp = <uint64_t*>malloc(max(self.l1_size, 1) * 8)
        if tmp == NULL:
            return self.fail(E_NOMEM, 0, 0)
        for i in range(self.l1_size):
            tmp[i] = htobe64(self.l1[i])
        if self.pwrite_all(tmp, self.l1_size * 8, self.l1_offset) < 0:
            free(tmp)
            return -1
        free(tmp)
        if self.l1_moved:
            if self.sync() < 0:
                return -1
            n = htobe32(<uint32_t>self.l1_size)
            off = htobe64(self.l1_offset)
            if self.pwrite_all(&n, 4, 36) < 0 or self.pwrite_all(&off, 8, 40) < 0:
                return -1
            self.l1_moved = False
        self.l1_dirty = False
        return 0

    cdef int do_flush(self) noexcept nogil:
        cdef int32_t s
        cdef bint any_l2 = False
        cdef size_t i
        cdef int64_t v
        cdef uint64_t c
        if self.readonly:
            return 0
        if self.write_refcounts(True) < 0 or self.sync() < 0:
            return -1
        for s in range(self.l2_slots):
            if self.l2_idx[s] >= 0 and self.l2_dirty[s]:
                if self.write_l2_slot(s) < 0:
                    return -1
                any_l2 = True
        if any_l2 and self.sync() < 0:
            return -1
        if self.l1_dirty:
            if self.write_l1() < 0 or self.sync() < 0:
                return -1
        if self.nfrees:
            for i in range(self.nfrees):
                c = self.frees[i]
                v = self.rc_get(c)
                if v < 0:
                    return -1
                if v == 0:
                    self.nfrees = 0
                    return self.fail(E_RC_UNDERFLOW, c << self.cluster_bits, 0)
                if self.rc_set(c, v - 1) < 0:
                    return -1
                if v == 1:
                    self.meta_set(c, 1, False)
                    if c < self.free_hint:
                        self.free_hint = c
            self.nfrees = 0
            self.cfree = 0
            self.dkey = 0
            if self.write_refcounts(False) < 0 or self.sync() < 0:
                return -1
        return 0

    def flush(self):
        """Write back cached metadata in crash-safe order and fdatasync."""
        cdef int rc
        with nogil:
            rc = self.do_flush()
        self.check_error(rc)

    # -- mapping --------------------------------------------------------------------------

    cdef int classify(self, uint64_t goff, uint64_t maxlen, uint64_t *plen,
                      uint64_t *phost) noexcept nogil:
        """Kind of the bytes at guest offset `goff` and how many (<= maxlen) share it."""
        cdef uint64_t gc = goff >> self.cluster_bits
        cdef uint64_t in_c = goff & self.cmask
        cdef uint64_t n = min(maxlen, self.cluster_size - in_c)
        cdef uint64_t l1i = gc >> self.l2_bits
        cdef uint64_t l2i = gc & ((1ULL << self.l2_bits) - 1)
        cdef uint64_t e, off, bm, span
        cdef uint32_t sc, end_sc
        cdef int32_t s
        cdef int state
        if l1i >= self.l1_size:
            return self.fail(E_L1_RANGE, goff, 0)
        s = self.l2_get(l1i, False)
        if s == -2:
            span = ((l1i + 1) << (self.l2_bits + self.cluster_bits)) - goff
            plen[0] = min(maxlen, span)
            return K_UNALLOC
        if s < 0:
            return -1
        e = be64toh((<uint64_t*>self.l2_buf[s])[l2i * self.ewords])
        plen[0] = n
        if e & COMPRESSED:
            phost[0] = e
            return K_COMP
        off = e & OFF_MASK
        if not self.extended:
            if (e & ZEROF) and self.v3:
                return K_ZERO
            if off == 0:
                return K_UNALLOC
            if off & self.cmask:
                return self.fail(E_DATA_ALIGN, goff, off)
            phost[0] = off + in_c
            return K_DATA
        bm = be64toh((<uint64_t*>self.l2_buf[s])[l2i * 2 + 1])
        if (bm & (bm >> 32)) & ALL_ALLOC or (off == 0 and bm & ALL_ALLOC):
            return self.fail(E_BITMAP, goff, bm)
        sc = <uint32_t>(in_c >> self.sc_bits)
        state = ((bm >> sc) & 1) | (((bm >> (32 + sc)) & 1) << 1)
        end_sc = sc + 1
        while end_sc < 32 and (((bm >> end_sc) & 1) | (((bm >> (32 + end_sc)) & 1) << 1)) == state:
            end_sc += 1
        plen[0] = min(n, (<uint64_t>end_sc << self.sc_bits) - in_c)
        if state == 1:
            if off & self.cmask:
                return self.fail(E_DATA_ALIGN, goff, off)
            phost[0] = off + in_c
            return K_DATA
        return K_ZERO if state == 2 else K_UNALLOC

    def map_range(self, uint64_t offset, uint64_t length):
        """[(start, length, kind, host_offset or None), ...] for the guest range, merged."""
        cdef uint64_t n, host = 0, prev_host = 0
        cdef int k
        out = []
        last = None
        if offset > self.size or length > self.size - offset:
            raise Qcow2Error(f"qcow2: map of {offset:#x}+{length:#x} is outside the disk")
        while length:
            with nogil:
                k = self.classify(offset, length, &n, &host)
            self.check_error(k)
            if last is not None and last[2] == KIND_NAMES[k] and (
                    k != K_DATA or prev_host + last[1] == host) and k != K_COMP:
                last[1] += n
            else:
                last = [offset, n, KIND_NAMES[k], host if k == K_DATA else None]
                out.append(last)
                prev_host = host
            offset += n
            length -= n
        return [tuple(x) for x in out]

    # -- read -----------------------------------------------------------------------------

    cdef int read_backing(self, uint64_t goff, uint8_t *buf, uint64_t n) noexcept nogil:
        cdef uint64_t m = 0
        if self.has_backing and goff < self.backing_size:
            m = min(n, self.backing_size - goff)
            with gil:
                try:
                    self._backing_read(goff, PyMemoryView_FromMemory(<char*>buf, m, PyBUF_WRITE))
                except BaseException as e:
                    self.exc = e
                    return self.fail(E_CALLBACK, 0, 0)
        if m < n:
            memset(buf + m, 0, n - m)
        return 0

    cdef int read_compressed(self, uint64_t e, uint64_t in_c, uint8_t *buf,
                             uint64_t n) noexcept nogil:
        cdef uint64_t coff = e & ((1ULL << self.csize_shift) - 1) & (MAX_HOST - 1)
        cdef uint64_t nsect = ((e >> self.csize_shift) & self.csize_mask) + 1
        cdef uint64_t csz = nsect * 512 - (coff & 511)
        cdef Py_ssize_t got = 0
        if self.dkey != e or e == 0:
            if coff == 0 or coff >= self.file_end:
                return self.fail(E_COMP_RANGE, 0, e)
            csz = min(csz, self.file_end - coff)       # the last sector may be cut short
            if self.pread_exact(self.cbuf, csz, coff) < 0:
                return -1
            with gil:
                try:
                    got = self.decompress(
                        PyMemoryView_FromMemory(<char*>self.cbuf, csz, PyBUF_READ),
                        PyMemoryView_FromMemory(<char*>self.dbuf, self.cluster_size, PyBUF_WRITE))
                except BaseException as ex:
                    self.exc = ex
                    return self.fail(E_CALLBACK, 0, 0)
            if <uint64_t>got != self.cluster_size:
                self.dkey = 0
                return self.fail(E_DECOMPRESS, coff, got)
            self.dkey = e
        memcpy(buf, self.dbuf + in_c, n)
        return 0

    cdef int do_read(self, uint64_t off, uint8_t *buf, uint64_t n) noexcept nogil:
        cdef int k, pk = -1
        cdef uint64_t len_, host = 0, p_host = 0, p_goff = 0, p_len = 0
        cdef uint8_t *p_buf = NULL
        while n:
            k = self.classify(off, n, &len_, &host)
            if k < 0:
                return -1
            if k == K_DATA or (k == K_UNALLOC and self.has_backing):
                if pk == k and p_buf + p_len == buf and (k == K_UNALLOC or p_host + p_len == host):
                    p_len += len_
                else:
                    if self.read_pending(pk, p_host, p_goff, p_buf, p_len) < 0:
                        return -1
                    pk, p_host, p_goff, p_buf, p_len = k, host, off, buf, len_
            elif k == K_COMP:
                if self.read_compressed(host, off & self.cmask, buf, len_) < 0:
                    return -1
            else:
                memset(buf, 0, len_)
            buf += len_
            off += len_
            n -= len_
        return self.read_pending(pk, p_host, p_goff, p_buf, p_len)

    cdef int read_pending(self, int k, uint64_t host, uint64_t goff, uint8_t *buf,
                          uint64_t n) noexcept nogil:
        if k == K_DATA:
            return self.pread_exact(buf, n, host)
        if k == K_UNALLOC:
            return self.read_backing(goff, buf, n)
        return 0

    def set_backing(self, read, uint64_t size):
        """Reads of unallocated clusters go to `read(offset, memoryview)` below `size`."""
        self._backing_read = read
        self.has_backing = read is not None
        self.backing_size = size if read is not None else 0

    def read(self, uint64_t offset, unsigned char[::1] buf not None):
        """Fill `buf` with the guest bytes at `offset`."""
        cdef uint64_t n = buf.shape[0]
        cdef int rc
        if offset > self.size or n > self.size - offset:
            raise Qcow2Error(f"qcow2: read of {offset:#x}+{n:#x} is outside the disk")
        if n == 0:
            return
        with nogil:
            rc = self.do_read(offset, &buf[0], n)
        self.check_error(rc)

    # -- write ----------------------------------------------------------------------------

    cdef int set_entry(self, uint64_t gc, uint64_t e, uint64_t bm) noexcept nogil:
        cdef int32_t s = self.l2_get(gc >> self.l2_bits, True)
        cdef uint64_t l2i = gc & ((1ULL << self.l2_bits) - 1)
        if s < 0:
            return -1
        (<uint64_t*>self.l2_buf[s])[l2i * self.ewords] = htobe64(e)
        if self.extended:
            (<uint64_t*>self.l2_buf[s])[l2i * 2 + 1] = htobe64(bm)
        self.l2_dirty[s] = 1
        return 0

    cdef int cow_write(self, uint64_t gbase, uint64_t lo, uint64_t hi, uint64_t host,
                       uint64_t in_c, const uint8_t *buf, uint64_t n) noexcept nogil:
        """Write guest bytes [gbase+lo, gbase+hi) to host+lo: `buf` over the current
        contents (backing, zeroes, compressed or old data), read only where not covered."""
        if in_c == lo and in_c + n == hi:
            return self.queue_pw(host + lo, buf, n)
        if self.flush_pw() < 0 or self.do_read(gbase + lo, self.scratch, hi - lo) < 0:
            return -1
        memcpy(self.scratch + (in_c - lo), buf, n)
        return self.pwrite_all(self.scratch, hi - lo, host + lo)

    cdef int write_cluster(self, uint64_t gc, uint64_t in_c, const uint8_t *buf,
                           uint64_t n) noexcept nogil:
        cdef int32_t s = self.l2_get(gc >> self.l2_bits, True)
        cdef uint64_t l2i = gc & ((1ULL << self.l2_bits) - 1)
        cdef uint64_t e, off, bm = 0, mask, host, gbase = gc << self.cluster_bits
        cdef uint64_t s0, s1, lo, hi
        cdef int64_t new
        cdef bint reuse
        if s < 0:
            return -1
        e = be64toh((<uint64_t*>self.l2_buf[s])[l2i * self.ewords])
        off = e & OFF_MASK
        if self.extended:
            bm = be64toh((<uint64_t*>self.l2_buf[s])[l2i * 2 + 1])
        if off and not (e & COMPRESSED):
            if off & self.cmask:
                return self.fail(E_DATA_ALIGN, gbase, off)
            if self.is_meta(off >> self.cluster_bits):
                return self.fail(E_META, off, 0)
        if not self.extended:
            if (e & COPIED) and off and not (e & (COMPRESSED | ZEROF)):
                return self.queue_pw(off + in_c, buf, n)
            reuse = off and (e & COPIED) and not (e & COMPRESSED)    # preallocated zero
            if reuse:
                host = off
            else:
                new = self.alloc(1)
                if new < 0:
                    return -1
                host = <uint64_t>new
            if n < self.cluster_size and not reuse and host >= self.file_end and \
                    (off == 0 or (e & ZEROF)) and \
                    not (e & COMPRESSED) and (not self.has_backing or gbase >= self.backing_size):
                # a fresh cluster past the end of the file already reads as zeroes: write
                # only the new bytes and extend the file over the rest (no zero COW)
                if self.queue_pw(host + in_c, buf, n) < 0:
                    return -1
                if ftruncate(self.fd, host + self.cluster_size) < 0:
                    return self.fail(E_IO, errno, host)
                self.file_end = host + self.cluster_size
            elif self.cow_write(gbase, 0, self.cluster_size, host, in_c, buf, n) < 0:
                return -1
            if not reuse and self.free_entry(e) < 0:
                return -1
            return self.set_entry(gc, host | COPIED, 0)
        if (e & COMPRESSED) or (off and not (e & COPIED)):
            new = self.alloc(1)
            if new < 0:
                return -1
            if self.cow_write(gbase, 0, self.cluster_size, new, in_c, buf, n) < 0 or \
                    self.free_entry(e) < 0:
                return -1
            return self.set_entry(gc, <uint64_t>new | COPIED, ALL_ALLOC)
        s0 = in_c >> self.sc_bits
        s1 = (in_c + n - 1) >> self.sc_bits
        mask = ((1ULL << (s1 - s0 + 1)) - 1) << s0
        if off:
            host = off
        else:
            new = self.alloc(1)
            if new < 0:
                return -1
            host = <uint64_t>new
        if off and (bm & mask) == mask:
            return self.queue_pw(host + in_c, buf, n)
        lo = s0 << self.sc_bits
        hi = (s1 + 1) << self.sc_bits
        if self.cow_write(gbase, lo, hi, host, in_c, buf, n) < 0:
            return -1
        return self.set_entry(gc, host | COPIED, (bm | mask) & ~(mask << 32))

    cdef int do_write(self, uint64_t off, const uint8_t *buf, uint64_t n) noexcept nogil:
        cdef uint64_t in_c, len_
        while n:
            in_c = off & self.cmask
            len_ = min(n, self.cluster_size - in_c)
            if self.write_cluster(off >> self.cluster_bits, in_c, buf, len_) < 0:
                return -1
            off += len_
            buf += len_
            n -= len_
        return self.flush_pw()

    def write(self, uint64_t offset, const unsigned char[::1] buf not None):
        """Write `buf` at guest offset `offset`, allocating clusters as needed."""
        cdef uint64_t n = buf.shape[0]
        cdef int rc
        if self.readonly:
            raise Qcow2Error("qcow2: the image is open read-only")
        if offset > self.size or n > self.size - offset:
            raise Qcow2Error(f"qcow2: write of {offset:#x}+{n:#x} is outside the disk")
        if n == 0:
            return
        with nogil:
            rc = self.do_write(offset, &buf[0], n)
        self.check_error(rc)

    cdef int do_zero(self, uint64_t off, uint64_t n, bint unmap) noexcept nogil:
        """Make unit-aligned guest range read as zeroes (or, with `unmap`, fall through to
        the backing file), dropping the clusters it frees."""
        cdef uint64_t gc, in_c, len_, e, bm, hostoff, mask, l2i
        cdef int32_t s
        while n:
            gc = off >> self.cluster_bits
            in_c = off & self.cmask
            len_ = min(n, self.cluster_size - in_c)
            if (gc >> self.l2_bits) >= self.l1_size:
                return self.fail(E_L1_RANGE, off, 0)
            if (self.l1[gc >> self.l2_bits] & OFF_MASK) == 0 and (unmap or not self.has_backing):
                pass            # reads as zeroes already
            else:
                s = self.l2_get(gc >> self.l2_bits, True)
                if s < 0:
                    return -1
                l2i = gc & ((1ULL << self.l2_bits) - 1)
                e = be64toh((<uint64_t*>self.l2_buf[s])[l2i * self.ewords])
                bm = be64toh((<uint64_t*>self.l2_buf[s])[l2i * 2 + 1]) if self.extended else 0
                hostoff = e & OFF_MASK
                if len_ == self.cluster_size:
                    if self.free_entry(e) < 0:
                        return -1
                    if unmap:
                        rc = self.set_entry(gc, 0, 0)
                    elif self.extended:
                        rc = self.set_entry(gc, 0, ALL_ZERO)
                    else:
                        rc = self.set_entry(gc, ZEROF if self.v3 else 0, 0)
                    if rc < 0:
                        return -1
                elif (e & COMPRESSED) or (hostoff and not (e & COPIED)):
                    memset(self.dbuf, 0, len_)      # whole-cluster copy, then zeroes
                    self.dkey = 0
                    if self.write_cluster(gc, in_c, self.dbuf, len_) < 0 or self.flush_pw() < 0:
                        return -1
                else:
                    mask = ((1ULL << (len_ >> self.sc_bits)) - 1) << (in_c >> self.sc_bits)
                    if self.set_entry(gc, (hostoff | COPIED) if hostoff else 0,
                                      (bm & ~mask & ~(mask << 32)) if unmap else
                                      (bm & ~mask) | (mask << 32)) < 0:
                        return -1
            off += len_
            n -= len_
        return 0

    def zero(self, uint64_t offset, uint64_t length):
        """Zero a range aligned to the zero unit (cluster, or subcluster with extended L2)
        through metadata only. v2 images without a zero flag must have no backing file."""
        cdef int rc
        cdef uint64_t unit = self.zero_unit
        if self.readonly:
            raise Qcow2Error("qcow2: the image is open read-only")
        if offset > self.size or length > self.size - offset:
            raise Qcow2Error(f"qcow2: zero of {offset:#x}+{length:#x} is outside the disk")
        if offset % unit or (length % unit and offset + length != self.size):
            raise ValueError("zero() needs a range aligned to the zero unit")
        with nogil:
            rc = self.do_zero(offset, length, False)
        self.check_error(rc)

    def unmap(self, uint64_t offset, uint64_t length):
        """Deallocate a unit-aligned range so it reads from the backing file again."""
        cdef int rc
        if self.readonly:
            raise Qcow2Error("qcow2: the image is open read-only")
        if offset > self.size or length > self.size - offset or offset % self.zero_unit:
            raise ValueError("unmap() needs an aligned range inside the disk")
        with nogil:
            rc = self.do_zero(offset, length, True)
        self.check_error(rc)

    @property
    def zero_unit(self):
        """Granularity of metadata-only zeroing and discard."""
        return (1 << self.sc_bits) if self.extended else self.cluster_size

    def write_compressed(self, uint64_t offset, const unsigned char[::1] data not None):
        """Store one already-compressed cluster at the cluster-aligned guest `offset`."""
        cdef uint64_t n = data.shape[0], gc = offset >> self.cluster_bits
        cdef uint64_t coff, nsect, e
        cdef int64_t new
        cdef int rc = 0
        cdef int32_t s
        if self.readonly:
            raise Qcow2Error("qcow2: the image is open read-only")
        if offset & self.cmask or offset >= self.size or n == 0 or n >= self.cluster_size:
            raise ValueError("write_compressed needs a cluster offset and less than a cluster")
        with nogil:
            s = self.l2_get(gc >> self.l2_bits, True)
            if s < 0:
                rc = -1
            else:
                e = be64toh((<uint64_t*>self.l2_buf[s])[
                    (gc & ((1ULL << self.l2_bits) - 1)) * self.ewords])
                if e & (OFF_MASK | COMPRESSED):
                    rc = self.fail(E_META, offset, 0)
            if rc == 0 and self.flush_pw() == 0:
                if self.cfree and (self.cfree & self.cmask) and \
                        (self.cfree & self.cmask) + n <= self.cluster_size:
                    coff = self.cfree
                    rc = self.rc_inc(coff >> self.cluster_bits)
                else:
                    new = self.alloc(1)
                    coff = <uint64_t>new
                    rc = -1 if new < 0 else 0
                if rc == 0:
                    rc = self.pwrite_all(&data[0], n, coff)
                if rc == 0:
                    self.cfree = coff + n
                    nsect = ((coff + n - 1) >> 9) - (coff >> 9)
                    rc = self.set_entry(gc, coff | (nsect << self.csize_shift) | COMPRESSED, 0)
        if rc == 0 and self.err:
            rc = -1
        self.check_error(rc)

    def discard_pending(self):
        """Number of clusters waiting for the next flush to lose a reference (tests)."""
        return self.nfrees

    # -- resize and preallocation ---------------------------------------------------------

    def grow_l1(self, uint64_t new_size):
        """Move the L1 table to a larger one with `new_size` entries (flush to commit)."""
        cdef uint64_t n, i, old_off = self.l1_offset, old_n = self.l1_size
        cdef int64_t new
        cdef uint64_t *nl1
        cdef int32_t *nslot
        if new_size <= self.l1_size:
            return
        if new_size > (32 << 20) // 8:
            raise Qcow2Error(f"qcow2: an L1 table of {new_size} entries is too large")
        n = (new_size * 8 + self.cmask) >> self.cluster_bits
        nl1 = <uint64_t*>calloc(new_size, 8)
        nslot = <int32_t*>malloc(new_size * 4)
        if nl1 == NULL or nslot == NULL:
            free(nl1)
            free(nslot)
            raise MemoryError()
        memcpy(nl1, self.l1, self.l1_size * 8)
        memcpy(nslot, self.l1_slot, self.l1_size * 4)
        for i in range(self.l1_size, new_size):
            nslot[i] = -1
        new = self.alloc(n)
        if new < 0:
            free(nl1)
            free(nslot)
            self.check_error(-1)
        self.meta_set(<uint64_t>new >> self.cluster_bits, n, True)
        free(self.l1)
        free(self.l1_slot)
        self.l1 = nl1
        self.l1_slot = nslot
        self.l1_size = new_size
        self.l1_offset = <uint64_t>new
        self.l1_dirty = self.l1_moved = True
        if old_off and old_n:
            for i in range(old_off >> self.cluster_bits,
                           ((old_off + old_n * 8 - 1) >> self.cluster_bits) + 1):
                self.add_free(i)
        self.check_error(0)

    def set_size(self, uint64_t size):
        """Record a new virtual size (the L1 table must already cover it) and sync."""
        cdef uint64_t be = htobe64(size)
        cdef uint64_t need = (size + (self.cluster_size << self.l2_bits) - 1) >> \
            (self.cluster_bits + self.l2_bits)
        cdef int rc
        if need > self.l1_size:
            raise Qcow2Error("qcow2: the L1 table is too small for that size")
        rc = self.do_flush()
        if rc == 0:
            rc = self.pwrite_all(&be, 8, 24)
        if rc == 0:
            rc = self.sync()
        self.check_error(rc)
        self.size = size

    def preallocate(self):
        """Point every unallocated cluster at a fresh host cluster (preallocation=metadata);
        returns the end of the allocated host area in bytes."""
        cdef uint64_t gc, ncl = (self.size + self.cmask) >> self.cluster_bits, top = 0
        cdef uint64_t e, l2i
        cdef int64_t new
        cdef int32_t s
        cdef int rc = 0
        with nogil:
            for gc in range(ncl):
                s = self.l2_get(gc >> self.l2_bits, True)
                if s < 0:
                    rc = -1
                    break
                l2i = gc & ((1ULL << self.l2_bits) - 1)
                e = be64toh((<uint64_t*>self.l2_buf[s])[l2i * self.ewords])
                if e & (OFF_MASK | COMPRESSED):
                    continue
                new = self.alloc(1)
                if new < 0:
                    rc = -1
                    break
                top = max(top, <uint64_t>new + self.cluster_size)
                rc = self.set_entry(gc, <uint64_t>new | COPIED, ALL_ALLOC)
                if rc < 0:
                    break
            if rc == 0:
                rc = self.do_flush()
        self.check_error(rc)
        return top

    # -- bench ----------------------------------------------------------------------------

    def bench(self, bint write, uint64_t count, uint64_t bufsize, uint64_t step,
              uint64_t offset, int pattern, uint64_t flush_interval):
        """The `img bench` request loop, run here so Python costs nothing per request."""
        cdef uint8_t *buf = <uint8_t*>malloc(max(bufsize, 1))
        cdef uint64_t i, off = offset
        cdef int rc = 0
        if buf == NULL:
            raise MemoryError()
        if bufsize > self.size:
            free(buf)
            raise Qcow2Error("qcow2: the bench buffer is larger than the image")
        if write and self.readonly:
            free(buf)
            raise Qcow2Error("qcow2: the image is open read-only")
        memset(buf, pattern, bufsize)
        with nogil:
            for i in range(count):
                if off + bufsize > self.size:
                    off = 0
                rc = self.do_write(off, buf, bufsize) if write else self.do_read(off, buf, bufsize)
                if rc < 0:
                    break
                if flush_interval and (i + 1) % flush_interval == 0:
                    rc = self.do_flush()
                    if rc < 0:
                        break
                off = (off + step) % self.size
        free(buf)
        self.check_error(rc)


    # -- check ----------------------------------------------------------------------------

    cdef inline void ref(self, uint32_t *refs, uint64_t nb, uint64_t off, uint64_t length,
                         list recs):
        cdef uint64_t c
        if length == 0:
            return
        if off + length > nb << self.cluster_bits:
            recs.append(("outside", off, length, 0))
            return
        for c in range(off >> self.cluster_bits, ((off + length - 1) >> self.cluster_bits) + 1):
            if refs[c] < 0xffffffffU:
                refs[c] += 1

    cdef int64_t stored_rc(self, uint64_t c) noexcept nogil:
        """Refcount on disk, 0 where the refcount structure itself is broken."""
        cdef uint64_t rti = c >> self.rb_bits, off
        if rti >= self.rt_n:
            return 0
        off = self.rt[rti] & RT_MASK
        if off == 0 or off & self.cmask or off + self.cluster_size > self.file_end:
            return 0
        return self.rc_get(c)

    def check(self, list l1_tables, list fixed, int fix=0):
        """Count the references to every host cluster and compare with the refcounts.

        `l1_tables` is [(offset, entries, active)] (active first), `fixed` the other
        metadata ranges [(offset, length)] (header, snapshot table). `fix` 1 repairs leaks,
        2 everything. Returns a dict of counts and qemu-img style messages."""
        cdef uint64_t nb = (self.file_end + self.cmask) >> self.cluster_bits
        cdef uint32_t *refs
        cdef uint64_t *l1t
        cdef uint64_t *l2t
        cdef uint64_t i, j, e, off, bm, l1e, coff, nsect, csz, c, prev = 0, top = 0
        cdef int64_t stored
        cdef int rc
        cdef uint64_t allocated = 0, fragmented = 0, compressed = 0
        recs = []
        copied_fix = []
        if not self.readonly:
            rc = self.do_flush()
            self.check_error(rc)
        refs = <uint32_t*>calloc(max(nb, 1), 4)
        l2t = <uint64_t*>malloc(self.cluster_size)
        if refs == NULL or l2t == NULL:
            free(refs)
            free(l2t)
            raise MemoryError()
        try:
            for off, length in fixed:
                self.ref(refs, nb, off, length, recs)
            self.ref(refs, nb, self.rt_offset, self.rt_n * 8, recs)
            for i in range(self.rt_n):
                off = self.rt[i] & RT_MASK
                if off == 0:
                    continue
                if off & self.cmask:
                    recs.append(("rb_align", i, off, 0))
                elif off + self.cluster_size > self.file_end:
                    recs.append(("rb_outside", i, off, 0))
                else:
                    self.ref(refs, nb, off, self.cluster_size, recs)
            for l1off, l1n, active in l1_tables:
                self.ref(refs, nb, l1off, l1n * 8, recs)
                l1t = <uint64_t*>malloc(max(l1n, 1) * 8)
                if l1t == NULL:
                    raise MemoryError()
                try:
                    rc = self.pread_exact(l1t, l1n * 8, l1off)
                    self.check_error(rc)
                    for i in range(l1n):
                        l1e = be64toh(l1t[i])
                        off = l1e & OFF_MASK
                        if off == 0:
                            continue
                        if off & self.cmask:
                            recs.append(("l2_align", i, off, 0))
                            continue
                        if off + self.cluster_size > self.file_end:
                            recs.append(("outside", off, self.cluster_size, 0))
                            continue
                        self.ref(refs, nb, off, self.cluster_size, recs)
                        if active:
                            stored = self.stored_rc(off >> self.cluster_bits)
                            if (stored == 1) != bool(l1e & COPIED):
                                recs.append(("copied_l2", i, l1e, stored))
                                copied_fix.append((i, -1, stored == 1))
                        rc = self.pread_exact(l2t, self.cluster_size, off)
                        self.check_error(rc)
                        for j in range(1ULL << self.l2_bits):
                            e = be64toh(l2t[j * self.ewords])
                            bm = be64toh(l2t[j * 2 + 1]) if self.extended else 0
                            if e & COMPRESSED:
                                coff = e & ((1ULL << self.csize_shift) - 1)
                                nsect = ((e >> self.csize_shift) & self.csize_mask) + 1
                                csz = nsect * 512 - (coff & 511)
                                if coff >= self.file_end:
                                    recs.append(("outside", coff, csz, 0))
                                else:
                                    self.ref(refs, nb, coff,
                                             min(csz, (nb << self.cluster_bits) - coff), recs)
                                if active:
                                    allocated += 1
                                    compressed += 1
                                continue
                            off = e & OFF_MASK
                            if self.extended and ((bm & (bm >> 32)) & ALL_ALLOC or
                                                  (off == 0 and bm & ALL_ALLOC)):
                                recs.append(("bitmap", e, bm, 0))
                            if off == 0:
                                continue
                            if off & self.cmask:
                                recs.append(("data_align", off, 0, 0))
                                continue
                            self.ref(refs, nb, off, self.cluster_size, recs)
                            if active:
                                if not (e & ZEROF) or self.extended:
                                    allocated += 1
                                    if prev and off != prev + self.cluster_size:
                                        fragmented += 1
                                    prev = off
                                stored = self.stored_rc(off >> self.cluster_bits)
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
            self.chk_refs = refs
            self.chk_n = nb
            for c in range(nb):
                if refs[c]:
                    top = c
                stored = self.stored_rc(c)
                if stored < 0:
                    self.check_error(-1)
                if <uint64_t>stored == refs[c]:
                    continue
                leak = <uint64_t>stored > refs[c]
                repair = fix == 2 or (fix == 1 and leak)
                label = ("Repairing" if repair else
                         "Leaked" if leak else "ERROR")
                msgs.append(f"{label} cluster {c} refcount={stored} reference={refs[c]}")
                if repair:
                    rc = self.rc_set(c, refs[c])
                    self.check_error(rc)
                    if leak:
                        fixed_leaks += 1
                    else:
                        fixed_errors += 1
                elif leak:
                    leaks += 1
                else:
                    corruptions += 1
            for i in range(self.rt_n):          # refcounts past the end of the file
                off = self.rt[i] & RT_MASK
                if off == 0 or off & self.cmask or off + self.cluster_size > self.file_end:
                    continue
                for c in range(max(nb, i << self.rb_bits), (i + 1) << self.rb_bits):
                    stored = self.stored_rc(c)
                    if stored > 0:
                        if fix:
                            rc = self.rc_set(c, 0)
                            self.check_error(rc)
                            fixed_leaks += 1
                            msgs.append(f"Repairing cluster {c} refcount={stored} reference=0")
                        else:
                            leaks += 1
                            msgs.append(f"Leaked cluster {c} refcount={stored} reference=0")
            if fix == 2 and not (fixed_leaks or fixed_errors):
                # flags follow refcounts: fixed on a pass that found the refcounts right
                for i, j, want in copied_fix:
                    if j < 0:
                        self.l1[i] = (self.l1[i] | COPIED) if want else (self.l1[i] & ~COPIED)
                        self.l1_dirty = True
                    else:
                        s = self.l2_get(i, False)
                        if s < 0:
                            self.check_error(-1)
                        e = be64toh((<uint64_t*>self.l2_buf[s])[j * self.ewords])
                        e = (e | COPIED) if want else (e & ~COPIED)
                        (<uint64_t*>self.l2_buf[s])[j * self.ewords] = htobe64(e)
                        self.l2_dirty[s] = 1
                    corruptions -= 1
                    fixed_errors += 1
            if fix and (fixed_leaks or fixed_errors):
                rc = self.do_flush()
                self.check_error(rc)
        finally:
            self.chk_refs = NULL
            free(refs)
            free(l2t)
        return {"corruptions": corruptions, "leaks": leaks, "messages": msgs,
                "fixed_leaks": fixed_leaks, "fixed_corruptions": fixed_errors,
                "allocated_clusters": allocated, "fragmented_clusters": fragmented,
                "compressed_clusters": compressed,
                "image_end_offset": (top + 1) << self.cluster_bits if nb else 0}
