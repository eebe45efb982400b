"""A vhost-user backend (QEMU's docs/interop/vhost-user.rst): the frontend (QEMU, Cloud
Hypervisor, crosvm) hands over the guest's memory (memfds) and each virtqueue's rings and
eventfds on a Unix socket; the device's queues are then served here, without the frontend
in the data path. One frontend at a time; when it goes away (or is restarted) the backend
waits for the next connection on the same socket, so `-chardev socket,reconnect=1` takes
it back.

A malformed message ends that connection with one log line; the device and the socket
stay. What the protocol calls "front-end" and "back-end" are the frontend and us."""

from __future__ import annotations

import logging
import mmap
import os
import socket
import struct
from dataclasses import dataclass, field

from hvcore.virtio.memmap import MemMap
from hvcore.virtio.queue import SplitQueue, VirtqueueError
from pyhv.virtio.device import Device
from pyhv.virtio.queues import QueueWorker

log = logging.getLogger("pyhv.virtio")

# requests (front-end -> back-end)
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG, SET_CONFIG = 24, 25

VERSION, REPLY, NEED_REPLY = 0x1, 0x4, 0x8
F_PROTOCOL_FEATURES = 1 << 30
PF_MQ, PF_REPLY_ACK, PF_CONFIG = 1 << 0, 1 << 3, 1 << 9
F_VERSION_1, F_INDIRECT_DESC, F_EVENT_IDX = 1 << 32, 1 << 28, 1 << 29
RING_FEATURES = F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX
VRING_NOFD = 1 << 8
MAX_PAYLOAD = 4096
HEADER = struct.Struct("<III")


class VhostUserError(Exception):
    """The frontend sent something the protocol does not allow."""


@dataclass
class _Ring:
    index: int
    size: int = 0
    addr: tuple[int, int, int] | None = None   # desc, avail, used (user addresses)
    base: int = 0
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    enabled: bool = False
    queue: SplitQueue | None = None
    worker: QueueWorker | None = None
    fds: list[int] = field(default_factory=list)


class Backend:
    """Serves `device` on the Unix socket `path` (created here)."""

    def __init__(self, device: Device, path: str):
        self.device, self.path = device, path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(path):
            os.unlink(path)
        self.listener.bind(path)
        self.listener.listen(1)

    def serve_forever(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            with conn:
                Session(self.device, conn).run()

    def close(self) -> None:
        self.listener.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


class Session:
    """One frontend connection: the protocol state and the queues it started."""

    def __init__(self, device: Device, conn: socket.socket):
        self.device, self.conn = device, conn
        self.features = self.protocol = 0
        self.mem: MemMap | None = None
        self.maps: list[mmap.mmap] = []
        self.rings = [_Ring(i) for i in range(device.num_queues)]

    def run(self) -> None:
        try:
            while self._one():
                pass
        except (VhostUserError, VirtqueueError, ValueError, OSError) as e:
            log.error("pyhv: vhost-user: %s; closing the connection", e)
        finally:
            for ring in self.rings:
                self._stop(ring)
                self._close_fds(ring)

    # ---- messages

    def _recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.conn.recv(n - len(out))
            if not chunk:
                raise VhostUserError("the frontend closed the connection mid-message")
            out += chunk
        return out

    def _one(self) -> bool:
        head, fds, _flags, _addr = socket.recv_fds(self.conn, HEADER.size, 8)
        if not head:
            return False                     # the frontend went away
        try:
            if len(head) < HEADER.size:
                head += self._recv_exact(HEADER.size - len(head))
            request, flags, size = HEADER.unpack(head)
            if flags & 0x3 != VERSION:
                raise VhostUserError(f"message version {flags & 3}, not 1")
            if size > MAX_PAYLOAD:
                raise VhostUserError(f"request {request}: payload of {size} bytes")
            payload = self._recv_exact(size) if size else b""
            reply = self._dispatch(request, payload, fds)
            fds = []                         # (kept by the request's handler)
        finally:
            for fd in fds:
                os.close(fd)
        if reply is not None:
            self._reply(request, reply)
        elif flags & NEED_REPLY and self.protocol & PF_REPLY_ACK:
            self._reply(request, struct.pack("<Q", 0))
        return True

    def _reply(self, request: int, payload: bytes) -> None:
        self.conn.sendall(HEADER.pack(request, VERSION | REPLY, len(payload)) + payload)

    def _dispatch(self, request: int, p: bytes, fds: list[int]) -> bytes | None:
        dev = self.device
        if request == GET_FEATURES:
            return struct.pack("<Q", dev.features | RING_FEATURES | F_PROTOCOL_FEATURES)
        if request == SET_FEATURES:
            self.features = _u64(p)
        elif request == GET_PROTOCOL_FEATURES:
            return struct.pack("<Q", self._protocol_features())
        elif request == SET_PROTOCOL_FEATURES:
            self.protocol = _u64(p) & self._protocol_features()
        elif request == GET_QUEUE_NUM:
            return struct.pack("<Q", dev.num_queues)
        elif request in (SET_OWNER, RESET_OWNER, SET_CONFIG):
            pass                             # (config writes: nothing is writable)
        elif request == SET_MEM_TABLE:
            self._set_mem_table(p, fds)
            fds.clear()
        elif request == GET_CONFIG:
            offset, size, flags = struct.unpack_from("<III", p)
            cfg = dev.config()
            if offset + size > len(cfg) or len(p) < 12 + size:
                raise VhostUserError(f"GET_CONFIG of {size} bytes at {offset}")
            return struct.pack("<III", offset, size, flags) + cfg[offset:offset + size]
        elif request in (SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ENABLE, GET_VRING_BASE):
            index, value = struct.unpack_from("<II", p)
            ring = self._ring(index)
            if request == SET_VRING_NUM:
                if not 0 < value <= dev.max_queue_size or value & (value - 1):
                    raise VhostUserError(f"queue {index}: size {value}")
                ring.size = value
            elif request == SET_VRING_BASE:
                ring.base = value & 0xFFFF
            elif request == SET_VRING_ENABLE:
                ring.enabled = bool(value)
                self._maybe_start(ring)
            else:
                self._stop(ring)
                base = ring.base
                self._close_fds(ring)
                return struct.pack("<II", index, base)
        elif request == SET_VRING_ADDR:
            index, _flags, desc, used, avail, _log = struct.unpack_from("<IIQQQQ", p)
            self._ring(index).addr = (desc, avail, used)
        elif request in (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR):
            value = _u64(p)
            ring = self._ring(value & 0xFF)
            fd = None if value & VRING_NOFD else (fds.pop(0) if fds else None)
            if fd is None and not value & VRING_NOFD:
                raise VhostUserError(f"request {request} without its eventfd")
            if fd is not None:
                ring.fds.append(fd)
            if request == SET_VRING_KICK:
                ring.kick = fd
                self._maybe_start(ring)
            elif request == SET_VRING_CALL:
                ring.call = fd
                if ring.worker is not None:
                    ring.worker.call_fd = fd
            else:
                ring.err = fd
        else:
            raise VhostUserError(f"unknown request {request}")
        return None

    def _protocol_features(self) -> int:
        return PF_MQ | PF_REPLY_ACK | (PF_CONFIG if self.device.frontend_reads_config else 0)

    def _ring(self, index: int) -> _Ring:
        if not 0 <= index < len(self.rings):
            raise VhostUserError(f"queue {index} of {len(self.rings)}")
        return self.rings[index]

    def _set_mem_table(self, p: bytes, fds: list[int]) -> None:
        (count,) = struct.unpack_from("<I", p)
        if count != len(fds) or not 0 < count <= 8 or len(p) < 8 + 32 * count:
            raise VhostUserError(f"SET_MEM_TABLE with {count} regions and {len(fds)} fds")
        for ring in self.rings:              # (the frontend stops the rings first)
            self._stop(ring)
        mem, maps = MemMap(), []
        try:
            for k in range(count):
                gpa, size, uaddr, offset = struct.unpack_from("<QQQQ", p, 8 + 32 * k)
                m = mmap.mmap(fds[k], size + offset, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
                maps.append(m)
                mem.add(gpa, size, uaddr, memoryview(m)[offset:offset + size])
        finally:
            for fd in fds:
                os.close(fd)
        self.mem, self.maps = mem, maps

    # ---- queues

    def _maybe_start(self, ring: _Ring) -> None:
        """A ring runs once it has rings, a kick eventfd and (with protocol features)
        has been enabled."""
        enabled = ring.enabled or not self.features & F_PROTOCOL_FEATURES
        if ring.worker is not None or ring.kick is None or ring.addr is None or \
                not enabled or self.mem is None:
            return
        q = SplitQueue(self.mem, ring.index, ring.size or self.device.max_queue_size,
                       event_idx=bool(self.features & F_EVENT_IDX),
                       indirect=bool(self.features & F_INDIRECT_DESC))
        desc, avail, used = (self.mem.uva_to_gpa(a, n) for a, n in
                             zip(ring.addr, (16 * q.size, 6 + 2 * q.size, 6 + 8 * q.size),
                                 strict=True))
        q.set_rings(desc, avail, used)
        q.base = ring.base
        ring.queue = q
        ring.worker = QueueWorker(q, self.device.handler(ring.index), ring.kick, ring.call,
                                  ring.err, self.device.taker(ring.index, q)).start()

    def _stop(self, ring: _Ring) -> None:
        if ring.worker is not None:
            ring.worker.stop()
            ring.base = ring.queue.base
            ring.worker = ring.queue = None

    @staticmethod
    def _close_fds(ring: _Ring) -> None:
        for fd in ring.fds:
            os.close(fd)
        ring.fds.clear()
        ring.kick = ring.call = ring.err = None


def _u64(p: bytes) -> int:
    if len(p) < 8:
        raise VhostUserError(f"a {len(p)}-byte payload where 8 were due")
    return struct.unpack_from("<Q", p)[0]
