"""`img convert`: copy only what the source chain allocates, skip zeroes (-S), and write
compressed clusters (-c).

Reading, zero detection / compression and writing overlap, as qemu-img's do: a reader
thread fills a few 2 MiB buffers (each gathers several data extents) and hands them over a
bounded queue; the writer hands a whole buffer to hvcore.qcow2 (`write_batch`: zero scan and
writes with the GIL released, contiguous host clusters in one pwritev) or, for raw targets,
scans it with hvcore.qcow2.nonzero_runs; compression runs on a small thread pool (zlib and
zstd release the GIL)."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import pyhv.disk
from hvcore.qcow2 import nonzero_runs
from hvcore.qcow2_pipe import read_raw_extents, write_raw_pieces
from pyhv.disk.cliutil import Progress
from pyhv.disk.compress import compressor
from pyhv.disk.create import create
from pyhv.disk.errors import DiskError
from pyhv.disk.info import extents

CHUNK = 2 << 20


def data_extents(disk, size: int, top: bool = False):
    """(start, length) of guest ranges the source chain holds data for (`top`: only its
    top image, for a target whose backing file holds the rest, as qemu-img -B)."""
    for start, n, depth, kind, _host, _f in extents(disk, 0, size):
        if kind in ("data", "compressed") and not (top and depth):
            yield start, n


def convert(src: str, dst: str, src_fmt: str | None, dst_fmt: str, compress: bool,
            progress: bool, sparse: int, options: dict[str, str],
            cache: str = "unsafe", workers: int = 8, skip_create: bool = False) -> None:
    """qemu-img's default target cache for convert is 'unsafe': writes keep their crash-safe
    order but nothing is synced; any other mode syncs at the end. `workers` compress in
    parallel (qemu-img's `-m` coroutines). `skip_create` (-n) writes into an existing
    target at least as large, zeroing what the source does not hold."""
    if compress and dst_fmt != "qcow2":
        raise DiskError("Compression not supported for this file format")
    if sparse and sparse % 512:
        raise DiskError("Invalid buffer size for sparse output specified")
    top = bool(options.get("backing_file"))
    if top and not options.get("backing_fmt"):
        raise DiskError("Use of backing file requires explicit backing format")
    with pyhv.disk.open(src, src_fmt, readonly=True) as s:
        size = s.size
        if not skip_create:
            create(dst, dst_fmt, size, options)
        with pyhv.disk.open(dst, dst_fmt) as d:
            if d.size < size:
                raise DiskError("Error while writing to the target: the target image is "
                                "smaller than the source")
            if d.format == "qcow2":
                d.core.unsafe_cache = cache == "unsafe"
            total = sum(n for _start, n in data_extents(s, size, top))  # qemu: allocated
            _copy(s, d, size, compress, Progress(progress, total), sparse, workers, top)
            if skip_create:     # an existing target: what the source lacks reads zero
                pos = 0
                for start, n in [*data_extents(s, size), (size, 0)]:
                    if start > pos:
                        d.write_zeroes(pos, start - pos)
                    pos = start + n
            if top:     # all the top holds, zeroes too, must hide the target's backing
                for start, n, depth, kind, _h, _f in extents(s, 0, size):
                    if depth or kind == "unallocated":
                        continue
                    for at, m, left, _host in d.map(start, n):
                        if left == "unallocated":       # (skipped as zeroes by the copy)
                            d.write_zeroes(at, m)
            if cache != "unsafe":
                d.flush()


def _ranges(s, size: int, align: int, top: bool = False):
    """The source's data extents rounded out to `align` and merged."""
    cur = None
    for start, n in data_extents(s, size, top):
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


BUFFERS = 4                          # buffers in flight between reader and writer


def _batches(ranges, chunk: int):
    """Lists of (guest offset, length) totalling at most `chunk` bytes; ranges longer than
    `chunk` are cut at `chunk` steps from their start."""
    batch, used = [], 0
    for a, b in ranges:
        for pos in range(a, b, chunk):
            n = min(chunk, b - pos)
            if used + n > chunk:
                yield batch
                batch, used = [], 0
            batch.append((pos, n))
            used += n
    if batch:
        yield batch


class _Reader(threading.Thread):
    """Fills free buffers with batches of source extents; the free-buffer queue bounds
    how far it runs ahead of the writer."""

    def __init__(self, fill):
        super().__init__(name="convert-reader", daemon=True)
        self.fill = fill                    # fill(buffer) -> pieces, [] at the end
        self.free: queue.Queue = queue.Queue()
        self.full: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        for _ in range(BUFFERS):
            self.free.put(memoryview(bytearray(CHUNK)))

    def run(self) -> None:
        try:
            while True:
                view = self._take()
                if view is None:
                    return
                pieces = self.fill(view)
                if not pieces:
                    break
                self.full.put((view, pieces))
            self.full.put(None)
        except BaseException as e:          # handed to the writer, which raises it
            self.full.put(e)

    def _take(self):
        while not self.stop.is_set():
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def items(self):
        """(buffer, pieces) in order; a reader error is raised here."""
        try:
            while True:
                item = self.full.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                self.free.put(item[0])
        finally:
            self.stop.set()
            self.join()


def _fill_generic(s, batches):
    """Batches of the source's data extents, read through its Disk (any format)."""
    def fill(view: memoryview):
        pieces, boff = [], 0
        for pos, n in next(batches, ()):
            s.read(pos, view[boff:boff + n])
            pieces.append((pos, boff, n))
            boff += n
        return pieces
    return fill


def _fill_raw(s, size: int):
    """A raw source: extents found and read by hvcore (one call per batch, no GIL)."""
    pos = 0

    def fill(view: memoryview):
        nonlocal pos
        pieces = []
        while not pieces and pos < size:
            pos, pieces = read_raw_extents(s.fd, pos, size, view)
        return pieces
    return fill


def _copy(s, d, size: int, compress: bool, bar: Progress, sparse: int,
          workers: int, top: bool = False) -> None:
    cs = d.core.cluster_size if d.format == "qcow2" else 4096
    if s.format == "raw" and not compress:
        fill = _fill_raw(s, size)
    else:
        ranges = _ranges(s, size, cs if compress else 1, top)
        fill = _fill_generic(s, _batches(ranges, CHUNK))
    reader = _Reader(fill)
    squeeze = compressor(_ctype(d)) if compress else None
    pool = ThreadPoolExecutor(workers) if compress else None
    done = 0
    reader.start()
    try:
        for view, pieces in reader.items():
            if compress:
                _write_compressed(d, view, pieces, cs, squeeze, pool)
            elif d.format == "qcow2":
                d.core.write_batch(view, pieces, sparse)
            elif d.format == "raw" and not d.probed:
                write_raw_pieces(d.fd, view, pieces, d.size, sparse)
            else:
                for pos, boff, n in pieces:
                    chunk = view[boff:boff + n]
                    for x, y in nonzero_runs(chunk, sparse) if sparse else [(0, n)]:
                        d.write(pos + x, chunk[x:y])
            for _p, _b, n in pieces:            # one step per extent, as qemu-img's runs
                done += n
                bar.update(done)
    finally:
        if pool is not None:
            pool.shutdown()
    bar.done()


def _write_compressed(d, view: memoryview, pieces, cs: int, squeeze, pool) -> None:
    """Compress the full clusters of a buffer on the pool, then write them in order."""
    clusters = [(pos + a, view[boff + a:boff + min(a + cs, n)])
                for pos, boff, n in pieces for a in range(0, n, cs)]

    def pack(piece):
        if not nonzero_runs(piece, len(piece)):
            return None                      # all zeroes: nothing to write
        if len(piece) < cs:                  # the last, short cluster: written as is
            return piece
        return squeeze(piece)

    packed_all = pool.map(pack, [c for _p, c in clusters])
    for (pos, piece), packed in zip(clusters, packed_all, strict=True):
        if packed is None:
            continue
        if packed is not piece and len(packed) < cs:
            d.core.write_compressed(pos, packed)
        else:
            d.write(pos, piece)


def _ctype(d) -> str:
    from pyhv.disk.header import COMPRESSION

    return COMPRESSION[d.header.compression_type]
