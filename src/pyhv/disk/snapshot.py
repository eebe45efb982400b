"""`img snapshot -c/-a/-d`: internal snapshots taken, applied and deleted as QEMU does
(docs/interop/qcow2.txt): a snapshot is a copy of the active L1 table plus an entry in the
snapshot table. This module decides the order; hvcore.qcow2 (qcow2_snapshot) moves the
references of every cluster and keeps the COPIED flags exact.

Order, as QEMU's, so a crash leaves at most leaked clusters: the L1 copy is written before
anything names it, references are added before a table that needs them is written, and
dropped only after the table that named them is gone."""

from __future__ import annotations

import os
import struct
import time

from pyhv.disk.errors import DiskError

_FIXED = struct.Struct(">QIHHIIQII")


def _entries(disk) -> list[bytes]:
    """The snapshot table's entries as stored (their unknown extra data kept)."""
    h, out, pos = disk.header, [], disk.header.snapshots_offset
    for _ in range(h.nb_snapshots):
        f = _FIXED.unpack(os.pread(disk.fd, _FIXED.size, pos))
        n = _FIXED.size + f[8] + f[2] + f[3]
        n += -n % 8
        out.append(os.pread(disk.fd, n, pos))
        pos += n
    return out


def _new_entry(snap_id: str, name: str, l1_offset: int, l1_size: int, size: int) -> bytes:
    """QEMU 7.2's entry: 24 bytes of extra data (large VM state size, disk size, icount 0
    as qemu-img writes it), then the ID and the name, padded to 8 bytes."""
    now = time.time_ns()
    sid, sname = snap_id.encode(), name.encode()
    extra = struct.pack(">QQQ", 0, size, 0)
    entry = _FIXED.pack(l1_offset, l1_size, len(sid), len(sname), now // 10**9,
                        now % 10**9 // 1000 * 1000, 0, 0, len(extra)) + extra + sid + sname
    return entry + bytes(-len(entry) % 8)


def _write_table(disk, entries: list[bytes]) -> None:
    """A new snapshot table, then the header naming it, then the old one freed."""
    h, core = disk.header, disk.core
    old_offset, old_length = h.snapshots_offset, sum(map(len, _entries(disk)))
    data = b"".join(entries)
    offset = core.alloc_meta(len(data)) if data else 0
    if data:
        os.pwrite(disk.fd, data, offset)
        os.fdatasync(disk.fd)
    h.nb_snapshots, h.snapshots_offset = len(entries), offset
    disk.write_header()
    if old_length:
        core.free_meta(old_offset, old_length)
    disk.reload_snapshots()


def _find(disk, key: str, by_id: bool = True):
    """QEMU's lookup: an ID first, then a name (qemu-img snapshot -d: the name only)."""
    for match in (lambda s: by_id and s.id == key, lambda s: s.name == key):
        for i, s in enumerate(disk.snapshots):
            if match(s):
                return i, s
    return None, None


def _l1(disk, offset: int, entries: int) -> bytes:
    return os.pread(disk.fd, entries * 8, offset)


def create(disk, name: str) -> None:
    core = disk.core
    core.flush()
    active = _l1(disk, core.l1_offset, core.l1_size)
    copy = core.alloc_meta(len(active))
    os.pwrite(disk.fd, active, copy)
    os.fdatasync(disk.fd)
    try:
        core.snapshot_refs(active, 1)
    except OSError as e:        # qemu-img names the errno: a refcount overflow is EINVAL
        if "would overflow" in str(e):
            raise DiskError("-22 (Invalid argument)") from None
        raise
    ids = [int(s.id) for s in disk.snapshots if s.id.isdigit()]
    entry = _new_entry(str(max(ids, default=0) + 1), name, copy, core.l1_size, core.size)
    _write_table(disk, [*_entries(disk), entry])


def apply(disk, key: str) -> None:
    index, snap = _find(disk, key)
    if snap is None:
        raise DiskError("Failed to load snapshot: No such file or directory")
    core = disk.core
    size = disk_size(disk, index)
    core.flush()
    if snap.l1_size > core.l1_size:
        core.grow_l1(snap.l1_size)
        core.flush()
    wanted = _l1(disk, snap.l1_table_offset, snap.l1_size)
    core.snapshot_refs(wanted, 1)
    old = _l1(disk, core.l1_offset, core.l1_size)
    core.load_l1(wanted)
    core.flush()
    core.snapshot_refs(old, -1)
    if size is not None and size != core.size:
        core.set_size(size)


def delete(disk, key: str) -> None:
    index, snap = _find(disk, key, by_id=False)
    if snap is None:
        raise DiskError("snapshot not found")
    entries = _entries(disk)
    del entries[index]
    disk.core.flush()
    _write_table(disk, entries)
    disk.core.snapshot_refs(_l1(disk, snap.l1_table_offset, snap.l1_size), -1)
    disk.core.free_meta(snap.l1_table_offset, snap.l1_size * 8)


def disk_size(disk, index: int) -> int | None:
    """The virtual size recorded with snapshot `index` (extra data), if any."""
    entry = _entries(disk)[index]
    extra_len = _FIXED.unpack_from(entry)[8]
    if extra_len < 16:
        return None
    return struct.unpack_from(">Q", entry, _FIXED.size + 8)[0]
