"""`img compare`: 0 identical, 1 different (first differing offset named), 2 error."""

from __future__ import annotations

import pyhv.disk
from pyhv.disk.info import extents

CHUNK = 2 << 20
SECTOR = 512


def _first_difference(a: memoryview, b: memoryview) -> int:
    """Offset of the first differing 512-byte sector, by bisection with C compares."""
    lo, hi = 0, len(a)
    while hi - lo > SECTOR:
        mid = lo + (hi - lo) // 2 // SECTOR * SECTOR or lo + SECTOR
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return lo


def _skippable(disk, size: int):
    """Guest ranges that read as zeroes without any data behind them."""
    return [(s, s + n) for s, n, _d, kind, _h, _f in extents(disk, 0, size)
            if kind in ("zero", "unallocated")]


def _zero_in(ranges, start: int, end: int) -> bool:
    return any(s <= start and end <= e for s, e in ranges)


def compare(path1: str, path2: str, fmt1: str | None, fmt2: str | None,
            strict: bool, progress: bool) -> tuple[str, int]:
    with pyhv.disk.open(path1, fmt1, readonly=True) as d1, \
            pyhv.disk.open(path2, fmt2, readonly=True) as d2:
        out = []
        if d1.size != d2.size and strict:
            return "Strict mode: Image size mismatch!", 1
        common = min(d1.size, d2.size)
        z1, z2 = _skippable(d1, d1.size), _skippable(d2, d2.size)
        b1, b2 = bytearray(CHUNK), bytearray(CHUNK)
        stops = [*range(0, common, CHUNK), *range(common, max(d1.size, d2.size), CHUNK)]
        for pos in stops:
            end = min(pos + CHUNK, common if pos < common else max(d1.size, d2.size))
            n = end - pos
            v1, v2 = memoryview(b1)[:n], memoryview(b2)[:n]
            if pos == common:       # as qemu-img: warned once the common part matched
                out.append("Warning: Image size mismatch!")
            if end <= common and _zero_in(z1, pos, end) and _zero_in(z2, pos, end):
                continue
            for disk, view, zr in ((d1, v1, z1), (d2, v2, z2)):
                m = max(0, min(n, disk.size - pos))
                if m and not _zero_in(zr, pos, pos + m):
                    disk.read(pos, view[:m])
                else:
                    view[:m] = bytes(m)
                view[m:] = bytes(n - m)
            if v1 != v2:
                at = pos + _first_difference(v1, v2)
                out.append(f"Content mismatch at offset {at}!")
                return "\n".join(out), 1
        out.append("Images are identical.")
        return "\n".join(out), 0
