"""`img convert`: copy only what the source chain allocates, skip zeroes (-S), and write
compressed clusters (-c); the zero scan runs in hvcore.qcow2.nonzero_runs."""

from __future__ import annotations

import pyhv.disk
from hvcore.qcow2 import nonzero_runs
from pyhv.disk.cliutil import Progress
from pyhv.disk.compress import compressor
from pyhv.disk.create import create
from pyhv.disk.errors import DiskError
from pyhv.disk.info import extents

CHUNK = 2 << 20


def data_extents(disk, size: int):
    """(start, length) of guest ranges the source chain holds data for."""
    for start, n, _depth, kind, _host, _f in extents(disk, 0, size):
        if kind in ("data", "compressed"):
            yield start, n


def convert(src: str, dst: str, src_fmt: str | None, dst_fmt: str, compress: bool,
            progress: bool, sparse: int, options: dict[str, str],
            cache: str = "unsafe") -> None:
    """qemu-img's default target cache for convert is 'unsafe': writes keep their crash-safe
    order but nothing is synced; any other mode syncs at the end."""
    if compress and dst_fmt != "qcow2":
        raise DiskError("Compression not supported for this file format")
    if sparse and sparse % 512:
        raise DiskError("Invalid buffer size for sparse output specified")
    with pyhv.disk.open(src, src_fmt, readonly=True) as s:
        size = s.size
        create(dst, dst_fmt, size, options)
        with pyhv.disk.open(dst, dst_fmt) as d:
            if d.format == "qcow2":
                d.core.unsafe_cache = cache == "unsafe"
            _copy(s, d, size, compress, Progress(progress, size), sparse)
            if cache != "unsafe":
                d.flush()


def _ranges(s, size: int, align: int):
    """The source's data extents rounded out to `align` and merged."""
    cur = None
    for start, n in data_extents(s, size):
        a = start // align * align
        b = min(size, -(-(start + n) // align) * align)
        if cur and a <= cur[1]:
            cur[1] = max(cur[1], b)
            continue
        if cur:
            yield tuple(cur)
        cur = [a, b]
    if cur:
        yield tuple(cur)


def _copy(s, d, size: int, compress: bool, bar: Progress, sparse: int) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    cs = d.core.cluster_size if d.format == "qcow2" else 4096
    squeeze = compressor(_ctype(d)) if compress else None
    done = 0
    for a, b in _ranges(s, size, cs if compress else 1):
        for pos in range(a, b, CHUNK):
            chunk = view[:min(CHUNK, b - pos)]
            s.read(pos, chunk)
            if compress:
                _write_compressed(d, pos, chunk, cs, squeeze)
            elif sparse:
                for x, y in nonzero_runs(chunk, sparse):
                    d.write(pos + x, chunk[x:y])
            else:
                d.write(pos, chunk)
            done += len(chunk)
            bar.update(done)
    bar.done()


def _write_compressed(d, pos: int, chunk: memoryview, cs: int, squeeze) -> None:
    for a in range(0, len(chunk), cs):
        piece = chunk[a:a + cs]
        if not nonzero_runs(piece, len(piece)):
            continue
        if len(piece) < cs:                      # the last, short cluster: write as is
            d.write(pos + a, piece)
            continue
        packed = squeeze(piece)
        if len(packed) < cs:
            d.core.write_compressed(pos + a, packed)
        else:
            d.write(pos + a, piece)


def _ctype(d) -> str:
    from pyhv.disk.header import COMPRESSION

    return COMPRESSION[d.header.compression_type]
