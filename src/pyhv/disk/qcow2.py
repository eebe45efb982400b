"""qcow2 images: header policy, snapshots, backing chains and repairs around hvcore.qcow2.

The Cython core does the cluster work; this module decides how an image may be opened
(corrupt bit -> read-only opens and repairs only, dirty bit -> refcount rebuild, unknown
autoclear bits cleared before the first write) and how whole-range operations split into
core calls.
"""

from __future__ import annotations

import os
import sys

from hvcore.qcow2 import Qcow2, Qcow2Error
from pyhv.disk import header as hdr
from pyhv.disk.compress import decompressor
from pyhv.disk.errors import DiskError

HEADER_READ = 2 << 20
_ZEROES = bytes(1 << 20)


def warn(message: str) -> None:
    from pyhv.disk.cliutil import warn as report

    report(message)


class Qcow2Disk:
    """An open qcow2 image implementing the block-backend interface."""

    format = "qcow2"

    def __init__(self, path: str, readonly: bool = False, l2_cache_size: int = 0,
                 open_backing=None, repair: bool = False, rb_cache_size: int = 0):
        self.path = path
        self.backing = None
        self.core = None
        self.fd = -1
        try:
            self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise DiskError(f"Could not open '{path}': {e.strerror}") from None
        try:
            self._open(readonly, l2_cache_size, open_backing, repair, rb_cache_size)
        except BaseException:
            self.close()
            raise

    def _open(self, readonly: bool, l2_cache_size: int, open_backing, repair: bool,
              rb_cache_size: int) -> None:
        file_size = os.fstat(self.fd).st_size
        self.header = h = hdr.parse(os.pread(self.fd, HEADER_READ, 0), file_size)
        if h.incompatible & hdr.INCOMPAT_CORRUPT and not readonly and not repair:
            # as QEMU: only a repair may write to it (and clears the bit when it succeeds)
            raise DiskError("qcow2: Image is corrupt; cannot be opened read/write")
        self.readonly = readonly
        self.snapshots, snap_len = hdr.parse_snapshots(
            lambda off, n: os.pread(self.fd, n, off), h, file_size)
        try:
            self.core = core = Qcow2(
                self.fd, cluster_bits=h.cluster_bits, size=h.size,
                l1_offset=h.l1_table_offset, l1_size=h.l1_size,
                rt_offset=h.refcount_table_offset, rt_clusters=h.refcount_table_clusters,
                refcount_order=h.refcount_order, extended=bool(h.incompatible & hdr.INCOMPAT_EXTL2),
                v3=h.version >= 3, readonly=readonly, file_end=file_size, l2_cache=l2_cache_size,
                rb_cache=rb_cache_size)
        except Qcow2Error as e:
            raise DiskError(str(e)) from None
        core.decompress = decompressor(hdr.COMPRESSION[h.compression_type])
        overlaps = core.mark_tables()
        if h.nb_snapshots:
            if core.mark_metadata(h.snapshots_offset, snap_len):
                overlaps.append(("snapshot table", h.snapshots_offset))
            for s in self.snapshots:
                if core.mark_l1_tables(s.l1_table_offset, s.l1_size):
                    overlaps.append((f"snapshot {s.name!r} L1 table", s.l1_table_offset))
        if overlaps and not readonly and not repair:
            # (`check -r` opens it anyway: a refcount block lying on other metadata is
            # what the refcount rebuild repairs)
            what, off = overlaps[0]
            raise DiskError(f"corrupt image: the {what} at {off:#x} overlaps other "
                            "metadata; open it read-only")
        if h.backing_file and open_backing is not None:
            self.backing = open_backing(self, h.backing_file, h.backing_format)
            core.set_backing(self.backing.read, self.backing.size)
        if not readonly and not repair and h.incompatible & hdr.INCOMPAT_DIRTY:
            self.rebuild_refcounts()        # (`check -r` repairs it itself, as in QEMU)
        if not readonly and h.autoclear:
            h.autoclear = 0          # we keep no bitmaps: tell their readers they are stale
            self.write_header()

    # -- block backend --------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.core.size

    def read(self, offset: int, buf) -> None:
        self.core.read(offset, memoryview(buf).cast("B"))

    def write(self, offset: int, buf) -> None:
        self.core.write(offset, memoryview(buf).cast("B"))

    def flush(self) -> None:
        self.core.flush()

    def write_back(self) -> None:
        """Cached metadata into the file without waiting for the disk: what a device does
        before it acknowledges a write, so a killed process loses none."""
        self.core.write_back()

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero through metadata where whole units allow it, with real zeroes elsewhere."""
        if self.core.v3 or self.backing is None:
            lo, hi = self._units(offset, length)
            if lo < hi:
                self._write_zero_bytes(offset, lo - offset)
                self.core.zero(lo, hi - lo)
                self._write_zero_bytes(hi, offset + length - hi)
                return
        self._write_zero_bytes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        """Drop whole units (QEMU ignores partial ones); they read as zeroes afterwards
        (v2 images with a backing file show the backing file, as in QEMU)."""
        lo, hi = self._units(offset, length)
        if lo < hi:
            self.core.zero(lo, hi - lo)

    def _units(self, offset: int, length: int) -> tuple[int, int]:
        unit = self.core.zero_unit
        lo = -(-offset // unit) * unit
        end = offset + length
        hi = end if end == self.size else end // unit * unit
        return lo, max(lo, hi)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        while length > 0:
            n = min(length, len(_ZEROES))
            self.core.write(offset, _ZEROES[:n])
            offset, length = offset + n, length - n

    def map(self, offset: int, length: int):
        return self.core.map_range(offset, length)

    # -- header and repairs ---------------------------------------------------------------

    def write_header(self) -> None:
        """Rewrite cluster 0 from the header model (after the core has committed its
        table moves); unknown extensions and fields are written back as they were."""
        core, h = self.core, self.header
        core.flush()
        h.l1_table_offset, h.l1_size = core.l1_offset, core.l1_size
        h.refcount_table_offset = core.rt_offset
        h.refcount_table_clusters = core.rt_n * 8 // h.cluster_size
        h.size = core.size
        data = h.pack()
        os.pwrite(self.fd, data, 0)
        os.fdatasync(self.fd)

    def check(self, fix: int = 0) -> dict:
        h = self.header
        fixed = [(0, h.cluster_size)]
        tables = [(self.core.l1_offset, self.core.l1_size, True)]
        if h.nb_snapshots:
            _, snap_len = hdr.parse_snapshots(lambda off, n: os.pread(self.fd, n, off), h,
                                              os.fstat(self.fd).st_size)
            fixed.append((h.snapshots_offset, snap_len))
            tables += [(s.l1_table_offset, s.l1_size, False) for s in self.snapshots]
        if fix and self.readonly:
            raise DiskError(f"{self.path}: cannot repair an image opened read-only")
        result = self.core.check(tables, fixed, fix)
        if fix == 2 and (result["fixed_leaks"] or result["fixed_corruptions"]):
            again = self.core.check(tables, fixed, fix)     # OFLAG_COPIED after refcounts
            for key in ("fixed_leaks", "fixed_corruptions"):
                again[key] += result[key]
            again["messages"] = result["messages"] + again["messages"]
            result = again
        flags = hdr.INCOMPAT_CORRUPT | hdr.INCOMPAT_DIRTY
        if fix and not result["corruptions"] and h.incompatible & flags:
            h.incompatible &= ~flags        # repaired: writable again, refcounts exact
            self.write_header()
        return result

    def reload_snapshots(self) -> None:
        """Re-read the snapshot table after the header named a new one."""
        self.snapshots, _ = hdr.parse_snapshots(lambda off, n: os.pread(self.fd, n, off),
                                                self.header, os.fstat(self.fd).st_size)

    def rebuild_refcounts(self) -> None:
        """An image left dirty by lazy refcounts: recount every reference, then clear the
        dirty bit (as QEMU does on open)."""
        result = self.check(fix=2)
        if result["messages"]:          # QEMU's open prints what its check repaired
            print("\n".join(result["messages"]), file=sys.stderr, flush=True)
        self.header.incompatible &= ~hdr.INCOMPAT_DIRTY
        self.write_header()

    def resize(self, size: int, shrink: bool = False) -> None:
        core = self.core
        if self.readonly:
            raise DiskError(f"{self.path}: cannot resize an image opened read-only")
        if size < core.size and not shrink:
            raise DiskError("Use the --shrink option to perform a shrink operation.")
        if self.snapshots and size != core.size:
            raise DiskError("Can't resize an image which has snapshots")
        old = core.size
        cut = -(-size // core.cluster_size) * core.cluster_size
        if cut < old:
            # as QEMU: the clusters wholly past the new end are dropped (the one the end
            # falls in keeps its data; growing again zeroes what lies past the end)
            core.unmap(cut, old - cut)
            core.flush()
        entries = core.cluster_size // (16 if core.extended else 8)
        need = -(-size // (core.cluster_size * entries))
        if need * 8 > hdr.MAX_L1_BYTES:
            raise DiskError("Failed to grow the L1 table: File too large")
        if need > core.l1_size:
            core.grow_l1(need)
        core.set_size(size)
        self.header.size = size
        if self.backing is not None and size > old and not self.readonly:
            # as QEMU: the grown area reads as zeroes, not as the backing file's bytes there
            # (v2 has no zero flag: real zeroes, only where the backing file would show)
            end = size if core.v3 else min(size, max(old, self.backing.size))
            if end > old:
                self.write_zeroes(old, end - old)
                core.flush()

    def close(self) -> None:
        if self.core is not None:
            try:
                if not self.core.readonly:
                    self.core.flush()
            finally:
                self.core = None
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
