"""A vhost-user frontend for tests and benches: it plays QEMU's part (hands over a
`GuestMemory`'s memfd and rings laid out by `virtio_driver.Driver`, kicks, waits for
interrupts) so a backend can be driven without a guest, by a driver that may be hostile."""

from __future__ import annotations

import os
import select
import socket
import struct

from hvcore.memory import GuestMemory
from pyhv.virtio import vhost_user as vu
from tests.helpers.virtio_driver import Driver

UADDR = 0x7F0000000000                  # where "QEMU" has guest memory mapped


class Frontend:
    def __init__(self, path: str, mem: GuestMemory):
        self.mem = mem
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.kicks: dict[int, int] = {}
        self.calls: dict[int, int] = {}
        self.errs: dict[int, int] = {}

    def close(self) -> None:
        self.sock.close()
        for fd in [*self.kicks.values(), *self.calls.values(), *self.errs.values()]:
            os.close(fd)
        self.kicks, self.calls, self.errs = {}, {}, {}

    def send(self, request: int, payload: bytes = b"", fds: list[int] = (),
             flags: int = vu.VERSION) -> None:
        socket.send_fds(self.sock, [vu.HEADER.pack(request, flags, len(payload)) + payload],
                        list(fds))

    def call(self, request: int, payload: bytes = b"", fds: list[int] = ()) -> bytes:
        """A request the backend answers; its reply payload."""
        self.send(request, payload, fds)
        head = self._recv(vu.HEADER.size)
        req, flags, size = vu.HEADER.unpack(head)
        assert req == request and flags & vu.REPLY, (req, flags)
        return self._recv(size)

    def _recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("the backend closed the connection")
            out += chunk
        return out

    def closed_by_backend(self, timeout: float = 5) -> bool:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return bool(ready) and self.sock.recv(1) == b""

    # ---- the usual start-up, as QEMU does it

    def handshake(self, features: int | None = None) -> int:
        offered = struct.unpack("<Q", self.call(vu.GET_FEATURES))[0]
        acked = offered if features is None else features
        self.send(vu.SET_FEATURES, struct.pack("<Q", acked))
        proto = struct.unpack("<Q", self.call(vu.GET_PROTOCOL_FEATURES))[0]
        self.send(vu.SET_PROTOCOL_FEATURES, struct.pack("<Q", proto))
        regions = self.mem.layout
        table = struct.pack("<II", len(regions), 0) + b"".join(
            struct.pack("<QQQQ", gpa, size, UADDR + gpa, offset)
            for gpa, size, _host, offset in regions)
        self.send(vu.SET_MEM_TABLE, table, [self.mem.memfd] * len(regions))
        return offered

    def config(self, size: int = 60) -> bytes:
        reply = self.call(vu.GET_CONFIG, struct.pack("<III", 0, size, 0) + bytes(size))
        return reply[12:]

    def start(self, index: int, drv: Driver) -> None:
        self.send(vu.SET_VRING_NUM, struct.pack("<II", index, drv.size))
        self.send(vu.SET_VRING_BASE, struct.pack("<II", index, 0))
        self.send(vu.SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, UADDR + drv.desc,
                                                 UADDR + drv.used, UADDR + drv.avail, 0))
        for kind, table in ((vu.SET_VRING_CALL, self.calls), (vu.SET_VRING_ERR, self.errs),
                            (vu.SET_VRING_KICK, self.kicks)):
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            table[index] = fd
            self.send(kind, struct.pack("<Q", index), [fd])
        self.send(vu.SET_VRING_ENABLE, struct.pack("<II", index, 1))

    def stop(self, index: int) -> int:
        """GET_VRING_BASE: the backend stops the ring and says where it got to."""
        _index, base = struct.unpack("<II", self.call(vu.GET_VRING_BASE,
                                                      struct.pack("<II", index, 0)))
        return base

    def kick(self, index: int) -> None:
        os.eventfd_write(self.kicks[index], 1)

    def wait(self, fd: int, timeout: float = 10) -> bool:
        ready, _, _ = select.select([fd], [], [], timeout)
        if ready:
            os.eventfd_read(fd)
        return bool(ready)

    def wait_call(self, index: int, timeout: float = 10) -> bool:
        return self.wait(self.calls[index], timeout)

    def wait_err(self, index: int, timeout: float = 10) -> bool:
        return self.wait(self.errs[index], timeout)
