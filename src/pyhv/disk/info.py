"""`img info`, `img map` and `img snapshot -l`: what an image is and where its data lives,
printed in qemu-img's human and JSON shapes."""

from __future__ import annotations

import json
import os
import time

import pyhv.disk
from pyhv.disk import header as hdr
from pyhv.disk.cliutil import human


def image_info(disk, path: str) -> dict:
    st = os.stat(path)
    info: dict = {}
    if disk.format == "qcow2" and disk.snapshots:
        info["snapshots"] = [_snapshot_json(s) for s in disk.snapshots]
    info.update({"virtual-size": disk.size, "filename": path})
    if disk.format == "qcow2":
        h = disk.header
        info["cluster-size"] = h.cluster_size
        info["format"] = "qcow2"
        info["actual-size"] = st.st_blocks * 512
        data = {"compat": "1.1" if h.version >= 3 else "0.10"}
        if h.version >= 3:
            data.update({
                "compression-type": hdr.COMPRESSION[h.compression_type],
                "lazy-refcounts": bool(h.compatible & hdr.COMPAT_LAZY),
                "refcount-bits": 1 << h.refcount_order,
                "corrupt": bool(h.incompatible & hdr.INCOMPAT_CORRUPT),
                "extended-l2": bool(h.incompatible & hdr.INCOMPAT_EXTL2),
            })
        else:
            data.update({"compression-type": "zlib", "refcount-bits": 16})
        info["format-specific"] = {"type": "qcow2", "data": data}
        if h.backing_file:
            info["full-backing-filename"] = pyhv.disk.backing_path(path, h.backing_file)
            info["backing-filename"] = h.backing_file
            if h.backing_format:    # QEMU's QDict prints this key first
                info = {"backing-filename-format": h.backing_format, **info}
        info["dirty-flag"] = bool(h.incompatible & hdr.INCOMPAT_DIRTY)
    else:
        info["format"] = "raw"
        info["actual-size"] = st.st_blocks * 512
        info["dirty-flag"] = False
    return info


def _snapshot_json(s: hdr.Snapshot) -> dict:
    out = {"icount": s.icount or 0, "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
           "name": s.name, "date-sec": s.date_sec, "date-nsec": s.date_nsec,
           "vm-clock-sec": s.vm_clock_nsec // 1_000_000_000, "id": s.id,
           "vm-state-size": s.vm_state_size}
    if s.icount is None:
        del out["icount"]
    return out


def snapshot_table(snaps: list[hdr.Snapshot]) -> str:
    lines = ["Snapshot list:",
             f"{'ID':<9} {'TAG':<17} {'VM SIZE':>7} {'DATE':>20} {'VM CLOCK':>12} "
             f"{'ICOUNT':>10}".rstrip()]
    lines[1] = "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT"
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date_sec))
        secs = s.vm_clock_nsec // 1_000_000_000
        clock = (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
                 f"{s.vm_clock_nsec // 1_000_000 % 1000:03d}")
        icount = "" if s.icount is None else str(s.icount)
        lines.append(f"{s.id:<9} {s.name:<17} {human(s.vm_state_size):>7} {date} "
                     f"{clock:>12} {icount:>10}".rstrip())
    return "\n".join(lines)


def human_info(info: dict, disk) -> str:
    out = [f"image: {info['filename']}", f"file format: {info['format']}",
           f"virtual size: {human(info['virtual-size'])} ({info['virtual-size']} bytes)",
           f"disk size: {human(info['actual-size'])}"]
    if "cluster-size" in info:
        out.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        bf = info["backing-filename"]
        full = info["full-backing-filename"]
        out.append(f"backing file: {bf}" + (f" (actual path: {full})" if full != bf else ""))
        if "backing-filename-format" in info:
            out.append(f"backing file format: {info['backing-filename-format']}")
    if disk.format == "qcow2" and disk.snapshots:
        out.append(snapshot_table(disk.snapshots))
    if "format-specific" in info:
        out.append("Format specific information:")
        for k, v in info["format-specific"]["data"].items():
            out.append(f"    {k.replace('-', ' ')}: {str(v).lower() if isinstance(v, bool) else v}")
    return "\n".join(out)


def info(path: str, fmt: str | None, output: str, chain: bool) -> str:
    infos, texts = [], []
    current, current_fmt = path, fmt
    seen = set()
    while current:
        real = os.path.realpath(current)
        if real in seen:
            from pyhv.disk.errors import DiskError
            raise DiskError(f"Backing file '{current}' creates an infinite loop.")
        seen.add(real)
        with pyhv.disk.open(current, current_fmt, readonly=True, backing=False) as disk:
            i = image_info(disk, current)
            infos.append(i)
            texts.append(human_info(i, disk))
            nxt = i.get("full-backing-filename") if chain else None
            current_fmt = i.get("backing-filename-format")
        current = nxt
    if output == "json":
        return json.dumps(infos if chain else infos[0], indent=4)
    return "\n\n".join(texts)


def extents(disk, offset: int, length: int, depth: int = 0):
    """[(start, length, depth, kind, host, file)] through the backing chain."""
    out = []
    for start, n, kind, host in disk.map(offset, length):
        if kind == "unallocated" and disk.backing is not None:
            bsize = disk.backing.size
            if start < bsize:
                m = min(n, bsize - start)
                out += extents(disk.backing, start, m, depth + 1)
                if m < n:
                    out.append((start + m, n - m, depth + 1, "unallocated", None, None))
                continue
            kind = "unallocated"
        d = depth + 1 if kind == "unallocated" and disk.backing is not None else depth
        out.append((start, n, d, kind, host, getattr(disk, "path", None)))
    return out


def _hex(v: int) -> str:
    return f"{v:#x}" if v else "0"       # C's %#x


def map_image(path: str, fmt: str | None, output: str) -> str:
    with pyhv.disk.open(path, fmt, readonly=True) as disk:
        ext = extents(disk, 0, disk.size)
    merged: list[list] = []
    for start, n, depth, kind, host, fname in ext:
        if merged:
            p = merged[-1]
            if (p[2], p[3], p[5]) == (depth, kind, fname) and (
                    host is None and p[4] is None or
                    host is not None and p[4] is not None and p[4] + p[1] == host):
                p[1] += n
                continue
        merged.append([start, n, depth, kind, host, fname])
    if output == "json":
        rows = []
        for start, n, depth, kind, host, _f in merged:
            row = {"start": start, "length": n, "depth": depth,
                   "present": kind != "unallocated", "zero": kind in ("zero", "unallocated"),
                   "data": kind in ("data", "compressed")}
            if host is not None:
                row["offset"] = host
            rows.append("{ " + ", ".join(f'"{k}": {json.dumps(v)}' for k, v in row.items())
                        + "}")
        return "[" + ",\n".join(rows) + "]"
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for start, n, _depth, kind, host, fname in merged:
        if kind == "data" and host is not None:
            lines.append(f"{_hex(start):<16}{_hex(n):<16}{_hex(host):<16}{fname}")
    return "\n".join(lines)
