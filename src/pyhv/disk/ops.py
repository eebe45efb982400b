"""`img resize`, `img commit` and `img rebase`: operations that move data between the
layers of a backing chain or change an image's size."""

from __future__ import annotations

import os

import pyhv.disk
from pyhv.disk.cliutil import Progress
from pyhv.disk.errors import DiskError

CHUNK = 2 << 20


def resize(path: str, fmt: str | None, size_text: str, shrink: bool) -> None:
    from pyhv.disk.cliutil import parse_size

    # with the backing file open: growing zeroes the new area over it, as QEMU does
    with pyhv.disk.open(path, fmt) as disk:
        if size_text[:1] in "+-":
            delta = parse_size(size_text[1:])
            size = disk.size + delta if size_text[0] == "+" else disk.size - delta
        else:
            size = parse_size(size_text)
        if size < 0:
            raise DiskError("New image size must be positive")
        if disk.format == "qcow2":
            size = -(-size // 512) * 512
        disk.resize(size, shrink)


def _copy_layer(src, dst, start: int, length: int, bar: Progress | None, done: int) -> int:
    buf = bytearray(CHUNK)
    pos, end = start, start + length
    while pos < end:
        m = min(CHUNK, end - pos)
        view = memoryview(buf)[:m]
        src.read(pos, view)
        dst.write(pos, view)
        pos += m
        done += m
        if bar:
            bar.update(done)
    return done


def commit(path: str, fmt: str | None, drop: bool, progress: bool,
           base: str | None = None) -> None:
    """Write what the top image holds into its backing file, then empty the top; with
    `base` (-b), what every image above `base` holds goes into it, and nothing is emptied
    (qemu-img: -b implies -d, the images in between no longer read as before)."""
    if base is not None:
        _commit_to(path, fmt, base, progress)
        return
    with pyhv.disk.open(path, fmt, backing=False) as top:
        if top.format != "qcow2" or top.header.backing_file is None:
            raise DiskError(f"Image '{path}' does not have a backing file")
        base_path = pyhv.disk.backing_path(path, top.header.backing_file)
        with pyhv.disk.open(base_path, top.header.backing_format) as base:
            ext = [(s, n, kind) for s, n, kind, _h in top.map(0, top.size)
                   if kind != "unallocated"]
            bar = Progress(progress, sum(n for _s, n, _k in ext))
            done = 0
            if top.size > base.size:
                base.resize(top.size)
            for s, n, kind in ext:
                if kind == "zero":
                    base.write_zeroes(s, n)
                    done += n
                else:
                    done = _copy_layer(top, base, s, n, bar, done)
            base.flush()
            bar.done()
        if not drop:
            _make_empty(top)


def _commit_to(path: str, fmt: str | None, base: str, progress: bool) -> None:
    from pyhv.disk.info import extents

    with pyhv.disk.open(path, fmt, readonly=True) as top:
        chain, disk = [], top
        while disk is not None:
            chain.append(disk)
            disk = getattr(disk, "backing", None)
        wanted = os.path.realpath(base)
        depth = next((i for i, d in enumerate(chain) if i and
                      os.path.realpath(d.path) == wanted), None)
        if depth is None:
            raise DiskError(f"Did not find '{base}' in the backing chain of '{path}'")
        above = [(s, n, kind) for s, n, d, kind, _h, _f in extents(top, 0, top.size)
                 if d < depth and kind != "unallocated"]
        base_fmt = chain[depth - 1].header.backing_format
        with pyhv.disk.open(chain[depth].path, base_fmt, backing=False) as target:
            bar = Progress(progress, sum(n for _s, n, _k in above))
            if top.size > target.size:
                target.resize(top.size)
            done = 0
            for s, n, kind in above:
                if kind == "zero":
                    target.write_zeroes(s, n)
                    done += n
                else:
                    done = _copy_layer(top, target, s, n, bar, done)
            target.flush()
            bar.done()


def _make_empty(top) -> None:
    """Drop every cluster of the top layer, so reads go to the backing file again."""
    top.core.unmap(0, top.size)
    top.flush()


def rebase(path: str, fmt: str | None, backing: str, backing_fmt: str | None,
           unsafe: bool, progress: bool) -> None:
    """Point `path` at a new backing file; the safe mode first copies into the top every
    range where the old and new backing files differ, so the guest sees the same data."""
    with pyhv.disk.open(path, fmt, backing=not unsafe) as top:
        if top.format != "qcow2":
            raise DiskError("rebase needs a qcow2 image")
        if not unsafe:
            new = None
            if backing:
                bpath = pyhv.disk.backing_path(path, backing)
                if os.path.realpath(bpath) == os.path.realpath(path):
                    raise DiskError("an image cannot be its own backing file")
                new = pyhv.disk.open(bpath, backing_fmt, readonly=True)
            try:
                _copy_differences(top, new, progress)
            finally:
                if new is not None:
                    new.close()
        top.header.set_backing(backing or None, backing_fmt if backing else None)
        top.write_header()


def _copy_differences(top, new, progress: bool) -> None:
    old = top.backing
    unalloc = [(s, n) for s, n, kind, _h in top.map(0, top.size) if kind == "unallocated"]
    bar = Progress(progress, sum(n for _s, n in unalloc))
    a, b = bytearray(CHUNK), bytearray(CHUNK)
    done = 0
    for s, n in unalloc:
        pos, end = s, s + n
        while pos < end:
            m = min(CHUNK, end - pos)
            va, vb = memoryview(a)[:m], memoryview(b)[:m]
            _read_or_zero(old, pos, va)
            _read_or_zero(new, pos, vb)
            if va != vb:
                cs = top.core.cluster_size
                for x in range(0, m, cs):          # only the clusters that differ
                    if va[x:x + cs] == vb[x:x + cs]:
                        continue
                    if old is None or pos + x >= old.size:
                        # past the old backing file's end: zero clusters, as qemu-img
                        top.write_zeroes(pos + x, len(va[x:x + cs]))
                    else:
                        top.write(pos + x, va[x:x + cs])
            pos += m
            done += m
            bar.update(done)
    bar.done()


def _read_or_zero(disk, pos: int, view: memoryview) -> None:
    m = 0 if disk is None else max(0, min(len(view), disk.size - pos))
    if m:
        disk.read(pos, view[:m])
    view[m:] = bytes(len(view) - m)
