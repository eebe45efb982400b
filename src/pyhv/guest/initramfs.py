"""An initramfs writer: cpio "newc" archive, gzip-compressed, as the kernel unpacks it.

Entries are whole files (the kernel's own format has no per-byte work for us beyond
copying contents); the archive is streamed into the compressor file by file.
"""

from __future__ import annotations

import gzip
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member: a directory, a regular file (data) or a symlink (target)."""

    path: str                   # inside the archive, without a leading "/"
    mode: int                   # full st_mode, file type included
    data: bytes = b""


def directory(path: str, perm: int = 0o755) -> Entry:
    return Entry(path, stat.S_IFDIR | perm)


def file(path: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def _header(ino: int, entry: Entry, name: bytes) -> bytes:
    fields = (ino, entry.mode, 0, 0, 1 if not stat.S_ISDIR(entry.mode) else 2, 0,
              len(entry.data), 0, 0, 0, 0, len(name) + 1, 0)
    return NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_cpio(out, entries: Iterable[Entry]) -> None:
    """Write a newc archive (with its trailer) to a binary file object."""
    ino = 1
    for entry in [*entries, Entry(TRAILER, 0)]:
        name = entry.path.lstrip("/").encode()
        head = _header(ino if entry.path != TRAILER else 0, entry, name) + name + b"\0"
        out.write(head + _pad(len(head)))
        out.write(entry.data)
        out.write(_pad(len(entry.data)))
        ino += 1


def write_initramfs(path: Path, entries: Iterable[Entry], level: int = 6) -> None:
    """Write a gzip-compressed initramfs atomically (temp file + rename)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level,
                                               mtime=0) as gz:
        write_cpio(gz, entries)
    os.replace(tmp, path)
