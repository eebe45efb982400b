"""Cluster compression codecs for qcow2: zlib (raw deflate, 4 KiB window as QEMU writes
it) and zstd. Each call handles one whole cluster; the byte work is in zlib/zstd.

zstd contexts are not thread-safe (a shared `ZstdCompressor` used from convert's worker
threads wrote corrupt clusters and crashed), so every thread gets its own context."""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable

import zstandard

from pyhv.disk.errors import DiskError


def _per_thread(make: Callable[[], object]) -> Callable[[], object]:
    """A getter that returns the calling thread's own instance, made on first use."""
    local = threading.local()

    def get():
        obj = getattr(local, "obj", None)
        if obj is None:
            obj = local.obj = make()
        return obj
    return get


def decompressor(kind: str):
    """fn(src, dst) -> bytes written into dst: what hvcore.qcow2 calls per cluster."""
    if kind == "zlib":
        def inflate(src: memoryview, dst: memoryview) -> int:
            d = zlib.decompressobj(-12)
            try:
                out = d.decompress(src, len(dst))
            except zlib.error as e:
                raise DiskError(f"qcow2: corrupt zlib-compressed cluster ({e})") from None
            dst[:len(out)] = out
            return len(out)
        return inflate
    if kind == "zstd":
        zd = _per_thread(zstandard.ZstdDecompressor)

        def unzstd(src: memoryview, dst: memoryview) -> int:
            try:
                out = zd().decompressobj().decompress(bytes(src))
            except zstandard.ZstdError as e:
                raise DiskError(f"qcow2: corrupt zstd-compressed cluster ({e})") from None
            n = min(len(out), len(dst))
            dst[:n] = out[:n]
            return len(out)
        return unzstd
    raise DiskError(f"unknown compression type {kind!r}")


def compressor(kind: str):
    """fn(cluster bytes) -> compressed bytes, in the form QEMU reads; safe to call from
    several threads at once."""
    if kind == "zlib":
        def deflate(data) -> bytes:
            c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12)
            return c.compress(data) + c.flush()
        return deflate
    if kind == "zstd":
        zc = _per_thread(lambda: zstandard.ZstdCompressor(level=3, write_content_size=False))

        def zstd(data) -> bytes:
            return zc().compress(data)
        return zstd
    raise DiskError(f"unknown compression type {kind!r}")
