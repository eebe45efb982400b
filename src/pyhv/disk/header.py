"""The qcow2 header, its extensions and the snapshot table (docs/interop/qcow2.txt).

Parsing validates every field before a table is touched; writing keeps header extensions
and trailing header fields this code does not know, so a rewrite never loses them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pyhv.disk.errors import DiskError

MAGIC = b"QFI\xfb"
V2_LENGTH, V3_LENGTH = 72, 104
EXT_END, EXT_BACKING_FORMAT, EXT_FEATURES = 0, 0xE2792ACA, 0x6803F857
EXT_DATA_FILE = 0x44415441
INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE = 1, 2, 4
INCOMPAT_COMPRESSION, INCOMPAT_EXTL2 = 8, 16
INCOMPAT_KNOWN = 0x1F
COMPAT_LAZY = 1
INCOMPAT_NAMES = {0: "dirty bit", 1: "corrupt bit", 2: "external data file",
                  3: "compression type", 4: "extended L2 entries"}
COMPRESSION = {0: "zlib", 1: "zstd"}
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")


@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_LENGTH
    compression_type: int = 0
    extra: bytes = b""                    # header fields past 105 that we do not know
    extensions: list[tuple[int, bytes]] = field(default_factory=list)
    backing_file: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def backing_format(self) -> str | None:
        """The last backing-format extension (QEMU reads them in order, the last wins)."""
        found = None
        for kind, data in self.extensions:
            if kind == EXT_BACKING_FORMAT:
                found = data.decode("utf-8", "replace")
        return found

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        self.backing_file = name or None
        self.extensions = [(k, d) for k, d in self.extensions if k != EXT_BACKING_FORMAT]
        if name and fmt:
            self.extensions.insert(0, (EXT_BACKING_FORMAT, fmt.encode()))

    def unsupported_features(self, mask: int) -> str:
        """QEMU's report_unsupported_feature: the feature table's names for `mask`'s bits
        in table order (up to the first nameless entry), then the rest as one number."""
        names = []
        for k, data in self.extensions:
            if k != EXT_FEATURES:
                continue
            data = data + bytes(-len(data) % 48 + 48)     # QEMU reads short tables zero-padded
            for i in range(0, len(data) - 47, 48):
                if not data[i + 2]:
                    break
                if data[i] == 0 and data[i + 1] < 64 and mask >> data[i + 1] & 1:
                    names.append(data[i + 2:i + 48].split(b"\0")[0].decode("utf-8", "replace"))
                    mask &= ~(1 << data[i + 1])
        if mask:
            names.append(f"Unknown incompatible feature: {mask:x}")
        return ", ".join(names)

    def feature_name(self, kind: int, bit: int) -> str | None:
        for k, data in self.extensions:
            if k != EXT_FEATURES:
                continue
            for i in range(0, len(data) - 47, 48):
                if data[i] == kind and data[i + 1] == bit:
                    return data[i + 2:i + 48].rstrip(b"\0").decode("utf-8", "replace")
        return None

    def pack(self) -> bytes:
        """The header, its extensions and the backing file name, as they go in cluster 0."""
        out = bytearray(_V2.pack(MAGIC, self.version, 0, 0, self.cluster_bits, self.size,
                                 self.crypt_method, self.l1_size, self.l1_table_offset,
                                 self.refcount_table_offset, self.refcount_table_clusters,
                                 self.nb_snapshots, self.snapshots_offset))
        if self.version >= 3:
            out += _V3.pack(self.incompatible, self.compatible, self.autoclear,
                            self.refcount_order, self.header_length)
            if self.header_length > V3_LENGTH:
                tail = bytes([self.compression_type]) + self.extra
                out += tail[:self.header_length - V3_LENGTH].ljust(
                    self.header_length - V3_LENGTH, b"\0")
        for kind, data in self.extensions:
            out += struct.pack(">II", kind, len(data)) + data + b"\0" * (-len(data) % 8)
        out += struct.pack(">II", EXT_END, 0)
        name = (self.backing_file or "").encode()
        if name:
            struct.pack_into(">QI", out, 8, len(out), len(name))
            out += name
        if len(out) > self.cluster_size:
            raise DiskError("the qcow2 header and its extensions no longer fit in one cluster")
        return bytes(out)


def parse(data: bytes, file_size: int) -> Header:
    """Parse and validate the header in `data` (the start of the file, up to 2 MiB)."""
    if len(data) < V2_LENGTH or data[:4] != MAGIC:
        raise DiskError("Image is not in qcow2 format")
    f = _V2.unpack_from(data)
    version = f[1]
    if version not in (2, 3):
        raise DiskError(f"Unsupported qcow2 version {version}")
    h = Header(*f[1:])
    if not 9 <= h.cluster_bits <= 21:
        raise DiskError(f"Unsupported cluster size: 2^{h.cluster_bits}")
    cs = h.cluster_size
    if version == 3:
        if len(data) < V3_LENGTH:
            raise DiskError("qcow2 header too short")
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
         h.header_length) = _V3.unpack_from(data, V2_LENGTH)
        if h.header_length < V3_LENGTH or h.header_length > cs or h.header_length > len(data):
            raise DiskError(f"invalid qcow2 header length {h.header_length}")
        if h.header_length > V3_LENGTH:
            h.compression_type = data[V3_LENGTH]
            h.extra = bytes(data[V3_LENGTH + 1:h.header_length])
    if h.refcount_order > 6:
        raise DiskError("Reference count entry width too large; may not exceed 64 bits")
    h.extensions = _parse_extensions(data, h.header_length if version == 3 else V2_LENGTH, cs)
    unknown = h.incompatible & ~INCOMPAT_KNOWN
    if unknown:
        raise DiskError("Unsupported qcow2 feature(s): " + h.unsupported_features(unknown))
    if h.incompatible & INCOMPAT_DATA_FILE:
        raise DiskError("Unsupported qcow2 feature(s): external data file")
    if h.crypt_method:
        raise DiskError("encrypted qcow2 images are not supported")
    if h.compression_type not in COMPRESSION:
        raise DiskError(f"unknown compression type {h.compression_type}")
    if bool(h.compression_type) != bool(h.incompatible & INCOMPAT_COMPRESSION):
        raise DiskError("compression type and the compression-type feature bit disagree")
    if h.incompatible & INCOMPAT_EXTL2 and h.cluster_bits < 14:
        raise DiskError("extended L2 entries need a cluster size of at least 16 KiB")
    entries = cs // (16 if h.incompatible & INCOMPAT_EXTL2 else 8)
    if h.size > (1 << 62):
        raise DiskError(f"virtual size {h.size} is too large")
    need_l1 = -(-h.size // (cs * entries))
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise DiskError("Active L1 table too large")
    if need_l1 > 0x7fffffff:
        raise DiskError("Image is too big")
    if h.l1_size < need_l1:
        raise DiskError("L1 table is too small")
    if h.l1_table_offset % cs or (h.l1_size and h.l1_table_offset == 0):
        raise DiskError("Active L1 table offset invalid")
    if h.l1_table_offset + h.l1_size * 8 > file_size:
        raise DiskError("L1 table lies outside the file")
    if h.refcount_table_clusters == 0 or h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise DiskError("Reference count table too large")
    if h.refcount_table_offset % cs or h.refcount_table_offset == 0:
        raise DiskError("Reference count table offset invalid")
    rt_end = h.refcount_table_offset + h.refcount_table_clusters * cs
    if rt_end > file_size:
        raise DiskError("refcount table lies outside the file")
    l1_end = h.l1_table_offset + h.l1_size * 8
    if h.l1_size and h.l1_table_offset < rt_end and h.refcount_table_offset < l1_end:
        raise DiskError("the refcount table overlaps the L1 table")
    if h.nb_snapshots > 65536 or (h.nb_snapshots and (h.snapshots_offset % cs or
                                                      h.snapshots_offset >= file_size)):
        raise DiskError(f"invalid snapshot table ({h.nb_snapshots} at {h.snapshots_offset:#x})")
    if h.backing_file_offset:
        end = h.backing_file_offset + h.backing_file_size
        if h.backing_file_size > 1023 or end > cs or end > len(data):
            raise DiskError("invalid backing file name offset or length")
        h.backing_file = data[h.backing_file_offset:end].decode("utf-8", "replace")
    return h


def _parse_extensions(data: bytes, pos: int, cs: int) -> list[tuple[int, bytes]]:
    out = []
    limit = min(len(data), cs)
    while True:
        if pos + 8 > limit:
            raise DiskError("qcow2 header extensions run past the first cluster")
        kind, length = struct.unpack_from(">II", data, pos)
        pos += 8
        if kind == EXT_END:
            return out
        if pos + length > limit:
            raise DiskError(f"qcow2 header extension {kind:#x} runs past the first cluster")
        out.append((kind, bytes(data[pos:pos + length])))
        pos += length + (-length % 8)


@dataclass
class Snapshot:
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    icount: int | None


def parse_snapshots(read, h: Header, file_size: int) -> tuple[list[Snapshot], int]:
    """The snapshot table via `read(offset, length) -> bytes`; returns it and its length."""
    snaps: list[Snapshot] = []
    pos = h.snapshots_offset
    fixed = struct.Struct(">QIHHIIQII")
    for _ in range(h.nb_snapshots):
        head = read(pos, fixed.size)
        if len(head) < fixed.size:
            raise DiskError("snapshot table runs past the end of the file")
        (l1off, l1n, id_len, name_len, dsec, dnsec, clock, vmsize,
         extra_len) = fixed.unpack(head)
        if extra_len > 1024 or l1n * 8 > MAX_L1_BYTES or l1off % h.cluster_size:
            raise DiskError(f"invalid snapshot table entry at {pos:#x}")
        if l1off + l1n * 8 > file_size:
            raise DiskError(f"snapshot L1 table at {l1off:#x} lies outside the file")
        rest = read(pos + fixed.size, extra_len + id_len + name_len)
        if len(rest) < extra_len + id_len + name_len:
            raise DiskError("snapshot table runs past the end of the file")
        extra = rest[:extra_len]
        if len(extra) >= 8:
            vmsize = max(vmsize, struct.unpack_from(">Q", extra, 0)[0])
        icount = struct.unpack_from(">Q", extra, 16)[0] if len(extra) >= 24 else None
        sid = rest[extra_len:extra_len + id_len].decode("utf-8", "replace")
        name = rest[extra_len + id_len:].decode("utf-8", "replace")
        snaps.append(Snapshot(sid, name, l1off, l1n, dsec, dnsec, clock, vmsize, icount))
        length = fixed.size + extra_len + id_len + name_len
        pos += length + (-length % 8)
    return snaps, pos - h.snapshots_offset
