"""`img bench`: qemu-img bench's flags and output.

`-i threads` (default): -d N runs N worker threads, thread t issuing requests t, t+N, ...
with its own buffer in one Cython loop with the GIL released (no Python per request), so N
requests are in flight as with qemu-img bench: qcow2 images through Qcow2.bench (the engine
is safe for concurrent requests: metadata under a lock, data of mapped clusters outside
it), raw images through hvcore.qcow2_pipe.

`-i io_uring` / `-i native` (Linux AIO): one thread keeps N requests in flight on an
hvcore.aio queue (qcow2_pipe.run_aio, the GIL released). Raw images: every request goes
through the queue. qcow2: data of mapped clusters goes through it; allocation, copy-on-write,
compressed, zero and backing-file requests run through the engine at once (QEMU serialises
allocation under its lock too), and flushes wait for the queue to drain, so data still
reaches the disk before the metadata naming it. As in QEMU, native AIO needs O_DIRECT
(`-t none` or `directsync`); io_uring works with every cache mode.

`-t none` bypasses the page cache with O_DIRECT (page-aligned buffers); writethrough and
directsync make every write durable before it counts (a flush after it; with the async
modes queued writes carry RWF_DSYNC instead)."""

from __future__ import annotations

import mmap
import os
import threading
import time

import pyhv.disk
from hvcore.aio import AioQueue
from hvcore.qcow2_pipe import raw_aio_requests, raw_requests
from pyhv.disk.errors import DiskError

AIO_MODES = ("threads", "native", "io_uring")


def bench(path: str, fmt: str | None, count: int, depth: int, bufsize: int, step: int | None,
          write: bool, offset: int, pattern: int, flush_interval: int, cache: str,
          quiet: bool, aio: str = "threads") -> str:
    if aio not in AIO_MODES:
        raise DiskError(f"Invalid aio option: {aio}")
    if depth < 1:
        raise DiskError("Invalid queue depth specified")
    if flush_interval and flush_interval < depth:
        raise DiskError("Flush interval can't be smaller than depth")
    step = bufsize if step is None else step
    if not write and flush_interval:
        raise DiskError("--flush-interval is only available in write tests")
    lines = [f"Sending {count} {'write' if write else 'read'} requests, {bufsize} bytes each, "
             f"{depth} in parallel (starting at offset {offset}, step size {step})"]
    if flush_interval:
        lines.append(f"Sending flush every {flush_interval} requests")
    direct = cache in ("none", "directsync")
    dsync = cache in ("writethrough", "directsync") and write
    if dsync and aio == "threads":
        flush_interval = 1          # these modes flush after every write
    if aio == "native" and not direct:
        raise DiskError(f"Could not open '{path}': aio=native was specified, but it requires "
                        "cache.direct=on, which was not specified.")
    with pyhv.disk.open(path, fmt, readonly=not write) as disk:
        if bufsize > disk.size:
            raise DiskError("the bench buffer is larger than the image")
        if disk.format == "qcow2" and direct:
            _direct(disk.core.use_direct_io)
        queue = None if aio == "threads" else _queue(path, aio, min(depth, max(count, 1)))
        try:
            start = time.perf_counter()
            if queue is not None:
                _aio_run(disk, queue, write, count, bufsize, step, offset, pattern,
                         flush_interval, direct, dsync)
            elif disk.format == "qcow2":
                _qcow2_run(disk.core, write, count, depth, bufsize, step, offset, pattern,
                           flush_interval)
            else:
                _raw_run(disk, write, count, depth, bufsize, step, offset, pattern,
                         flush_interval, direct)
        finally:
            if queue is not None:
                queue.close()
        if write:
            disk.flush()
        elapsed = time.perf_counter() - start
    lines.append(f"Run completed in {elapsed:.3f} seconds.")
    return "\n".join(lines[-1:] if quiet else lines)


def _direct(opener):
    try:
        return opener()
    except OSError as e:
        raise DiskError(f"cannot open the image with O_DIRECT (-t none): {e.strerror}") from None


def _queue(path: str, aio: str, depth: int) -> AioQueue:
    try:
        return AioQueue(aio, depth)
    except OSError as e:
        name = "Linux AIO" if aio == "native" else aio
        raise DiskError(f"Could not open '{path}': Unable to use {name}: {e.strerror}") from None


def _aio_run(disk, queue: AioQueue, write: bool, count: int, bufsize: int, step: int,
             offset: int, pattern: int, flush_interval: int, direct: bool,
             dsync: bool) -> None:
    """One thread, `queue.depth` requests in flight, one shared buffer (as qemu-img)."""
    if disk.format == "qcow2":
        disk.core.bench_aio(queue, write, count, bufsize, step, offset, pattern,
                            flush_interval, dsync)
        return
    fd = fallback = disk.fd
    if direct:
        fd = _direct(lambda: os.open(disk.path, (os.O_RDWR if write else os.O_RDONLY) |
                                     os.O_DIRECT | os.O_CLOEXEC))
    buf = mmap.mmap(-1, max(bufsize, mmap.PAGESIZE))
    view = memoryview(buf)[:bufsize]
    view[:] = bytes([pattern]) * bufsize
    try:
        raw_aio_requests(queue, fd, fallback if fd != fallback else -1, view, write, count,
                         step, offset, disk.size, flush_interval, dsync)
    except OSError as e:
        raise DiskError(f"{disk.path}: bench request failed: {e.strerror}") from None
    finally:
        view.release()
        buf.close()
        if fd != disk.fd:
            os.close(fd)


def _workers(n: int, run) -> None:
    if n == 1:
        run(0)
        return
    threads = [threading.Thread(target=run, args=(t,)) for t in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def _qcow2_run(core, write: bool, count: int, depth: int, bufsize: int, step: int,
               offset: int, pattern: int, flush_interval: int) -> None:
    workers = min(depth, max(count, 1))
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            core.bench(write, count, bufsize, step, offset, pattern, flush_interval, t,
                       workers)
        except OSError as e:
            errors.append(e)

    _workers(workers, run)
    if errors:
        raise errors[0]


def _raw_run(disk, write: bool, count: int, depth: int, bufsize: int, step: int, offset: int,
             pattern: int, flush_interval: int, direct: bool) -> None:
    """`depth` threads, thread t issuing requests t, t+depth, ... with its own buffer."""
    fd = disk.fd
    if direct:
        fd = _direct(lambda: os.open(disk.path, (os.O_RDWR if write else os.O_RDONLY) |
                                     os.O_DIRECT | os.O_CLOEXEC))
    workers = min(depth, max(count, 1))
    bufs = [mmap.mmap(-1, max(bufsize, mmap.PAGESIZE)) for _ in range(workers)]
    errors: list[BaseException] = []

    def run(t: int) -> None:
        view = memoryview(bufs[t])[:bufsize]
        view[:] = bytes([pattern]) * bufsize
        try:
            raw_requests(fd, view, write, t, count, workers, step, offset, disk.size,
                         flush_interval)
        except OSError as e:
            errors.append(e)
        finally:
            view.release()

    try:
        _workers(workers, run)
    finally:
        for b in bufs:
            b.close()
        if fd != disk.fd:
            os.close(fd)
    if errors:
        raise DiskError(f"{disk.path}: bench request failed: {errors[0].strerror}")
