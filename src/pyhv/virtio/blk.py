"""virtio-blk (virtio 1.x section 5.2) on a pyhv disk (qcow2 or raw, backing chains):
read, write, flush, get-id, discard and write-zeroes, one or more queues.

A request is a byte stream, not a set of buffers (the spec lets a driver cut it anywhere):
a 16-byte header in the readable buffers, then the data (written to the disk) or the
discard/write-zeroes segments; the writable buffers take the data read and end with the
status byte. A request the disk refuses (out of range, read-only, an I/O error) is
answered with an error status and logged once per kind; the queue and the disk go on.

Before a write is acknowledged its metadata is written back into the image file (not
synced: `hvcore.qcow2_l2.do_write_back`), so a backend killed afterwards loses no write
the guest saw complete, and the guest's FLUSH still covers it, whichever backend process
answers the FLUSH (QEMU takes a restarted backend back)."""

from __future__ import annotations

import logging
import struct
import threading

from pyhv.disk.errors import DiskError
from pyhv.virtio.device import Device

log = logging.getLogger("pyhv.virtio")

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_TOPOLOGY, F_MQ = (
    1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 9, 1 << 10, 1 << 12)
F_DISCARD, F_WRITE_ZEROES = 1 << 13, 1 << 14
SECTOR = 512
CHANGING = (T_OUT, T_DISCARD, T_WRITE_ZEROES)
SEG_MAX = 254                       # data buffers per request (Linux's max_segments)
SIZE_MAX = 1 << 20                  # bytes per buffer
MAX_DISCARD_SECTORS = MAX_ZEROES_SECTORS = 0x7FFFFFFF >> 9     # QEMU's request limit
MAX_SEGMENTS = 1                    # discard / write-zeroes ranges per request
ID_BYTES = 20


def _cut(bufs: list[memoryview], start: int, end: int) -> list[memoryview]:
    """The bytes [start, end) of the buffers taken as one stream, as views."""
    out, pos = [], 0
    for b in bufs:
        n = len(b)
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            out.append(b[lo - pos:hi - pos])
        pos += n
        if pos >= end:
            break
    return out


class BlkDevice(Device):
    """The device: config space and a request handler per queue over `disk`."""

    def __init__(self, disk, readonly: bool = False, queues: int = 1, serial: str = ""):
        self.disk, self.readonly = disk, readonly or getattr(disk, "readonly", False)
        self.num_queues = queues
        self.serial = serial.encode()[:ID_BYTES]
        self.features = (F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_TOPOLOGY |
                         F_DISCARD | F_WRITE_ZEROES | (F_MQ if queues > 1 else 0) |
                         (F_RO if self.readonly else 0))
        self.failures: set[str] = set()
        self.lock = threading.Lock()       # flush and metadata calls from several queues

    def config(self) -> bytes:
        """struct virtio_blk_config (60 bytes)."""
        sectors = self.disk.size // SECTOR
        cfg = struct.pack("<QII", sectors, SIZE_MAX, SEG_MAX)
        cfg += struct.pack("<HBB", 0, 0, 0)                  # geometry: unused
        cfg += struct.pack("<I", SECTOR)                     # blk_size
        cfg += struct.pack("<BBHI", 0, 0, 1, 0)              # topology
        cfg += struct.pack("<BBH", 1, 0, self.num_queues)    # writeback, unused, queues
        cfg += struct.pack("<III", MAX_DISCARD_SECTORS, MAX_SEGMENTS, 1)
        cfg += struct.pack("<II", MAX_ZEROES_SECTORS, MAX_SEGMENTS)
        cfg += struct.pack("<B3x", 1)                        # write_zeroes_may_unmap
        return cfg

    def handler(self, index: int):
        return self.handle

    def taker(self, index: int, queue):
        """Reads and writes of Linux's shape never reach Python (hvcore.virtio.blk)."""
        from hvcore.qcow2 import Qcow2
        from hvcore.virtio.blk import BlkQueue

        core = getattr(self.disk, "core", None)
        if isinstance(core, Qcow2):
            return BlkQueue(queue, core, -1, self.disk.size, self.readonly).next
        if self.disk.format == "raw":
            return BlkQueue(queue, None, self.disk.fd, self.disk.size, self.readonly,
                            self.disk.probed).next
        return None

    def handle(self, head: int, readable: list[memoryview], writable: list[memoryview]) -> int:
        """One request; returns the bytes written into `writable` (data and status)."""
        rlen, wlen = sum(map(len, readable)), sum(map(len, writable))
        if rlen < 16 or wlen < 1:
            self._fail("a request without its header or status byte")
            return 0                        # (no status byte to answer in)
        kind, _prio, sector = struct.unpack("<IIQ", b"".join(bytes(b) for b in
                                                             _cut(readable, 0, 16)))
        status_view = _cut(writable, wlen - 1, wlen)[0]
        written = 1
        try:
            status = self._do(kind, sector, readable, rlen, writable, wlen)
            if kind in (T_IN, T_GET_ID) and status == S_OK:
                written = wlen
            if kind in CHANGING and status == S_OK and hasattr(self.disk, "write_back"):
                self.disk.write_back()      # acknowledged: must survive a killed backend
        except (DiskError, OSError, ValueError) as e:
            self._fail(f"{_name(kind)} at sector {sector}: {e}")
            status = S_IOERR
        status_view[0] = status
        return written

    def _do(self, kind: int, sector: int, readable, rlen: int, writable, wlen: int) -> int:
        offset = sector * SECTOR
        if kind == T_IN:
            self._range(offset, wlen - 1)
            pos = offset
            for b in _cut(writable, 0, wlen - 1):
                self.disk.read(pos, b)
                pos += len(b)
            return S_OK
        if kind == T_OUT:
            if self.readonly:
                return self._refused("a write to a read-only disk")
            self._range(offset, rlen - 16)
            pos = offset
            for b in _cut(readable, 16, rlen):
                self.disk.write(pos, b)
                pos += len(b)
            return S_OK
        if kind == T_FLUSH:
            with self.lock:
                self.disk.flush()
            return S_OK
        if kind == T_GET_ID:
            ident = self.serial.ljust(ID_BYTES, b"\0")
            for b in _cut(writable, 0, min(wlen - 1, ID_BYTES)):
                n = len(b)
                b[:] = ident[:n]
                ident = ident[n:]
            return S_OK
        if kind in (T_DISCARD, T_WRITE_ZEROES):
            if self.readonly:
                return self._refused("a discard or write-zeroes on a read-only disk")
            data = b"".join(bytes(b) for b in _cut(readable, 16, rlen))
            if not data or len(data) % 16 or len(data) // 16 > MAX_SEGMENTS:
                return self._refused(f"{len(data)} bytes of {_name(kind)} segments")
            for at in range(0, len(data), 16):
                start, count, flags = struct.unpack_from("<QII", data, at)
                if flags & ~1:
                    return S_UNSUPP
                self._range(start * SECTOR, count * SECTOR)
                with self.lock:
                    if kind == T_DISCARD:
                        self.disk.discard(start * SECTOR, count * SECTOR)
                    else:
                        self.disk.write_zeroes(start * SECTOR, count * SECTOR)
            return S_OK
        return S_UNSUPP

    def _range(self, offset: int, length: int) -> None:
        if length % SECTOR or offset + length > self.disk.size:
            raise ValueError(f"{length} bytes at {offset} is past the end of the disk "
                             f"({self.disk.size}) or not whole sectors")

    def _refused(self, why: str) -> int:
        self._fail(why)
        return S_IOERR

    def _fail(self, why: str) -> None:
        kind = why.split(" at ")[0]
        if kind not in self.failures:       # once per kind: a guest may repeat it forever
            self.failures.add(kind)
            log.warning("pyhv: virtio-blk: %s", why)


def _name(kind: int) -> str:
    return {T_IN: "read", T_OUT: "write", T_FLUSH: "flush", T_GET_ID: "get-id",
            T_DISCARD: "discard", T_WRITE_ZEROES: "write-zeroes"}.get(kind, f"type {kind}")
