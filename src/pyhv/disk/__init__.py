"""pyhv's disk layer: `open()` returns a Disk (raw or qcow2) with the block-backend
interface `read(offset, buf)`, `write(offset, buf)`, `flush()`, `discard(offset, length)`,
`write_zeroes(offset, length)` and `size`, used by virtio-blk and `pyhv img`."""

from __future__ import annotations

import builtins
import os
import sys

from pyhv.disk.errors import DiskError

FORMATS = ("qcow2", "raw")
MAX_CHAIN = 64


def probe(path: str, readonly: bool = False) -> str:
    """The format named by the file's first bytes; guessing raw for writing warns, as
    QEMU does."""
    try:
        with builtins.open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise DiskError(f"Could not open '{path}': {e.strerror}") from None
    if magic == b"QFI\xfb":
        return "qcow2"
    if not readonly:            # (QEMU's block layer names no program here)
        print(f"WARNING: Image format was not specified for '{path}' and probing guessed "
              "raw.\n         Automatically detecting the format is dangerous for raw "
              "images, write operations on block 0 will be restricted.\n         Specify "
              "the 'raw' format explicitly to remove the restrictions.",
              file=sys.stderr, flush=True)
    return "raw"


def backing_path(image: str, name: str) -> str:
    """A backing file name resolved as QEMU does: relative to the overlay's directory."""
    if os.path.isabs(name) or "://" in name:
        return name
    return os.path.join(os.path.dirname(image), name)


def open(path: str, format: str | None = None, readonly: bool = False, *,  # noqa: A002
         backing: bool = True, l2_cache_size: int = 0, repair: bool = False,
         _chain: tuple[str, ...] = ()):
    """Open a disk image. `format=None` probes (qcow2 by magic, raw with a warning);
    `repair` opens a qcow2 image writable for `check -r` despite overlapping tables.
    Errors read as qemu-img's: "Could not open 'F': <reason>" (a backing file's reason
    says "Could not open backing file: ...")."""
    if _chain:
        return _open(path, format, readonly, backing, l2_cache_size, repair, _chain)
    try:
        return _open(path, format, readonly, backing, l2_cache_size, repair, _chain)
    except DiskError as e:
        if str(e).startswith("Backing file '"):        # a loop: qemu names it alone
            raise
        raise DiskError(f"Could not open '{path}': {e}", e.end) from None


def _open(path, format, readonly, backing, l2_cache_size, repair, _chain):  # noqa: A002
    real = os.path.realpath(path)
    if real in _chain:
        raise DiskError(f"Backing file '{path}' creates an infinite loop.")
    if len(_chain) >= MAX_CHAIN:
        raise DiskError(f"backing chain of {path} is deeper than {MAX_CHAIN} images")
    probed = format is None
    fmt = format or probe(path, readonly)
    if fmt == "raw":
        from pyhv.disk.raw import RawDisk

        return RawDisk(path, readonly=readonly, probed=probed)
    if fmt != "qcow2":
        raise DiskError(f"Unknown file format '{fmt}' (pyhv knows qcow2 and raw)")
    from pyhv.disk.qcow2 import Qcow2Disk

    def open_backing(disk, name: str, bfmt: str | None):
        bpath = backing_path(path, name)
        if not os.path.exists(bpath):
            raise DiskError(f"Could not open backing file: Could not open '{bpath}': "
                            "No such file or directory")
        try:
            return open(bpath, bfmt, readonly=True, backing=True,
                        l2_cache_size=l2_cache_size, _chain=(*_chain, real))
        except DiskError as e:
            if str(e).startswith(("Backing file '", "Could not open backing file: ")):
                raise
            raise DiskError(f"Could not open backing file: {e}") from None

    return Qcow2Disk(path, readonly=readonly, l2_cache_size=l2_cache_size,
                     open_backing=open_backing if backing else None, repair=repair)
