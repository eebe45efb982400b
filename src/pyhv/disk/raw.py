"""Raw images: the block-backend interface over a plain file."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from pyhv.disk.errors import DiskError

_FALLOC_PUNCH = 0x02 | 0x01          # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_ZEROES = bytes(1 << 20)


class RawDisk:
    """A raw file. `probed` images refuse writes that would make block 0 look like
    another format (as QEMU restricts them), since the next probe would misread it."""

    format = "raw"

    def __init__(self, path: str, readonly: bool = False, probed: bool = False):
        self.path = path
        self.readonly = readonly
        self.probed = probed
        self.backing = None
        try:
            self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise DiskError(f"Could not open '{path}': {e.strerror}") from None
        self.size = os.fstat(self.fd).st_size

    def read(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        self._check(offset, len(view))
        n = os.preadv(self.fd, [view], offset)
        if n < len(view):
            view[n:] = bytes(len(view) - n)

    def write(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        self._check(offset, len(view))
        if self.readonly:
            raise DiskError(f"{self.path}: the image is open read-only")
        if self.probed and offset < 4 and view[:4 - offset].tobytes() == b"QFI\xfb"[offset:]:
            raise DiskError(f"{self.path}: refusing to write a qcow2 magic into block 0 of an "
                            "image whose format was guessed (use -f raw)")
        while len(view):
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if _libc.fallocate(self.fd, _FALLOC_PUNCH, ctypes.c_int64(offset),
                           ctypes.c_int64(length)) == 0:
            return
        while length:
            n = min(length, len(_ZEROES))
            self.write(offset, _ZEROES[:n])
            offset, length = offset + n, length - n

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    def flush(self) -> None:
        if not self.readonly:
            os.fdatasync(self.fd)

    def resize(self, size: int, shrink: bool = False) -> None:
        if size < self.size and not shrink:
            raise DiskError("Use the --shrink option to perform a shrink operation.")
        os.ftruncate(self.fd, size)
        self.size = size

    def map(self, offset: int, length: int):
        """[(start, length, kind, host)] using the file's holes (SEEK_DATA/SEEK_HOLE)."""
        out, end = [], offset + length
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:
                data = end
            data = min(data, end)
            if data > pos:
                out.append((pos, data - pos, "zero", None))
            if data >= end:
                break
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
            out.append((data, hole - data, "data", data))
            pos = hole
        return out

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskError(f"{self.path}: request {offset:#x}+{length:#x} is outside the disk "
                            f"({self.size} bytes)")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
