"""`img bench`: qemu-img bench's flags and output; the request loop runs in hvcore.qcow2
(raw images use a Python loop of preadv/pwrite). Requests are issued one at a time: the
page cache answers them, so the depth flag is accepted and reported but not needed."""

from __future__ import annotations

import os
import time

import pyhv.disk
from pyhv.disk.errors import DiskError


def bench(path: str, fmt: str | None, count: int, depth: int, bufsize: int, step: int | None,
          write: bool, offset: int, pattern: int, flush_interval: int, cache: str,
          quiet: bool) -> str:
    if flush_interval and flush_interval < depth:
        raise DiskError("Flush interval can't be smaller than depth")
    step = bufsize if step is None else step
    if not write and flush_interval:
        raise DiskError("--flush-interval is only available in write tests")
    lines = [f"Sending {count} {'write' if write else 'read'} requests, {bufsize} bytes each, "
             f"{depth} in parallel (starting at offset {offset}, step size {step})"]
    if flush_interval:
        lines.append(f"Sending flush every {flush_interval} requests")
    if cache in ("writethrough", "directsync") and write:
        flush_interval = 1          # these modes flush after every write
    with pyhv.disk.open(path, fmt, readonly=not write) as disk:
        start = time.perf_counter()
        if disk.format == "qcow2":
            disk.core.bench(write, count, bufsize, step, offset, pattern, flush_interval)
        else:
            _raw_loop(disk, write, count, bufsize, step, offset, pattern, flush_interval)
        if write:
            disk.flush()
        elapsed = time.perf_counter() - start
    lines.append(f"Run completed in {elapsed:.3f} seconds.")
    return "\n".join(lines[-1:] if quiet else lines)


def _raw_loop(disk, write: bool, count: int, bufsize: int, step: int, offset: int,
              pattern: int, flush_interval: int) -> None:
    buf = bytearray([pattern]) * bufsize
    view = memoryview(buf)
    fd, size, off = disk.fd, disk.size, offset
    op = os.pwrite if write else os.preadv
    for i in range(count):
        if off + bufsize > size:
            off = 0
        op(fd, view if write else [view], off)
        if flush_interval and (i + 1) % flush_interval == 0:
            os.fdatasync(fd)
        off = (off + step) % size
