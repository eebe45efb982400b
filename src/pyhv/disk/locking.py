"""QEMU's image locking (block/file-posix.c), so QEMU and pyhv see each other's use of an
image: open-file-description read locks on single bytes of the image file, at 100 + bit
for each permission a user holds and at 200 + bit for each it does not share. A writer
holds consistent-read, write and resize and shares neither write nor resize (as QEMU's
writable drives and qemu-storage-daemon exports do); a reader holds consistent-read and
does not share write. The locks last as long as the descriptor."""

from __future__ import annotations

import fcntl
import os
import struct

from pyhv.disk.errors import DiskError

PERM_BASE, SHARED_BASE = 100, 200
CONSISTENT_READ, WRITE, RESIZE = 0, 1, 3
NAMES = {CONSISTENT_READ: "consistent read", WRITE: "write", RESIZE: "resize"}
FLOCK = struct.Struct("hhxxxxqqi4x")          # struct flock on x86-64


def _lock(fd: int, cmd: int, kind: int, byte: int) -> int:
    """fcntl(cmd) on one byte; the lock type the kernel reports (F_OFD_GETLK)."""
    raw = fcntl.fcntl(fd, cmd, FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))
    return FLOCK.unpack(raw)[0]


def lock_image(fd: int, path: str, write: bool) -> None:
    """Take the locks of a writer (or a reader) of the image open on `fd`; DiskError
    naming the permission when another user's locks forbid it."""
    held = (CONSISTENT_READ, WRITE, RESIZE) if write else (CONSISTENT_READ,)
    unshared = (WRITE, RESIZE) if write else (WRITE,)
    try:
        for bit in held:
            _lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, PERM_BASE + bit)
        for bit in unshared:
            _lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, SHARED_BASE + bit)
        # (our own locks do not show in F_OFD_GETLK: only another user's do)
        for bit in held:
            if _lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, SHARED_BASE + bit) != fcntl.F_UNLCK:
                raise DiskError(f'Failed to get "{NAMES[bit]}" lock: is another process '
                                f"using the image {path}?")
        for bit in unshared:
            if _lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, PERM_BASE + bit) != fcntl.F_UNLCK:
                raise DiskError(f'Failed to get shared "{NAMES[bit]}" lock: is another '
                                f"process using the image {path}?")
    except OSError as e:
        raise DiskError(f"Could not lock '{path}': {e.strerror}") from None
