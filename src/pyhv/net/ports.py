"""Frame ports: where whole Ethernet frames come from and go to. The stack sees only this.

A port is started with a `deliver(frames: list[bytes])` callback, which it calls with the
frames it read in one batch (the stack sends coalesced ACKs after each batch), and takes
frames through `send(frames)`. When `offload` is true every frame in both directions starts
with a 10-byte virtio_net_hdr (TAP with IFF_VNET_HDR): checksums may be partial and one
frame may be a 64 KiB TCP super-segment. A frame is one buffer, or a tuple of buffers that
together make one frame (headers, then a view of TCP payload: never copied into a frame).
A port never queues without bound: a frame it cannot pass on at once is dropped and
counted (`dropped`), as a full NIC queue would.

Implementations: `FdPort` (a TAP fd: one frame per read/write, a batch per call through
`hvcore.net.ports`), `StreamPort` (QEMU `-netdev stream`: unix stream socket, 4-byte big-endian
length before each frame) and
`DgramPort` (unix datagram socket, one frame per datagram; vfkit/krunkit style).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable, Sequence

from hvcore.net.busypoll import BusyPoll
from hvcore.net.ports import FrameFd

Deliver = Callable[[list[bytes]], None]
MAX_FRAME = 65536 + 16
BATCH = 64                          # frames read per wakeup before the stack flushes ACKs
STREAM_WRITE_LIMIT = 8 << 20        # bytes a stream peer may lag behind before frames drop


class FramePort:
    """Base: counters and the interface (see the module docstring)."""

    offload = False

    def __init__(self) -> None:
        self.frames_in = self.frames_out = self.dropped = 0
        self.deliver: Deliver | None = None
        self.busy: BusyPoll | None = None

    def poll_with(self, busy: BusyPoll) -> None:
        """Busy-poll (`hvcore.net.busypoll`) after each batch read, with this port's descriptor
        in `busy`'s slot 0 while it has one."""
        self.busy = busy

    async def start(self, deliver: Deliver) -> None:
        """Begin delivering frames (from the running event loop)."""
        raise NotImplementedError

    def send(self, frames: Sequence[bytes | bytearray]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def stats(self) -> dict:
        return {"frames_in": self.frames_in, "frames_out": self.frames_out,
                "dropped": self.dropped}


class FdPort(FramePort):
    """A non-blocking fd that reads and writes one frame per call (a TAP device). Reading,
    writing and counting are `hvcore.net.ports.FrameFd`'s (C calls: its `send` is this
    port's `send`)."""

    def __init__(self, fd: int, offload: bool = False):
        super().__init__()
        self.fd = fd
        self.offload = offload
        os.set_blocking(fd, False)
        self.io = FrameFd(fd, BATCH, MAX_FRAME)
        self.send = self.io.send
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self, deliver) -> None:
        self.loop, self.io.deliver = asyncio.get_running_loop(), deliver
        self.loop.add_reader(self.fd, self.io.readable)

    def poll_with(self, busy: BusyPoll) -> None:
        super().poll_with(busy)
        busy.set_fd(0, self.fd)
        self.io.busy = busy                 # (FrameFd.readable polls, in C)

    def stats(self) -> dict:
        io = self.io
        return {"frames_in": io.frames_in, "frames_out": io.frames_out,
                "dropped": io.dropped}

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = -1


class _StreamPeer(asyncio.Protocol):
    """One QEMU `-netdev stream` connection: splits the byte stream into frames."""

    def __init__(self, port: StreamPort):
        self.port = port
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        if self.port.peer is not None:
            self.port.peer.transport.close()       # a new guest connection replaces the old
        self.port.peer = self
        self.transport = transport
        if self.port.busy is not None:
            self.port.busy.set_fd(0, transport.get_extra_info("socket").fileno())

    def data_received(self, data: bytes) -> None:
        busy = self.port.busy
        if busy is not None:
            busy.woke()
        self._frames(data)
        if busy is not None:
            busy.spin()

    def _frames(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        frames, pos, end = [], 0, len(buf)
        while end - pos >= 4:
            (n,) = struct.unpack_from("!I", buf, pos)
            if n > MAX_FRAME:
                self.port.dropped += 1
                self.transport.close()             # framing lost: nothing after it is sound
                return
            if end - pos - 4 < n:
                break
            frames.append(bytes(buf[pos + 4:pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]
        if frames:
            self.port.frames_in += len(frames)
            self.port.deliver(frames)

    def connection_lost(self, exc) -> None:
        if self.port.peer is self:
            self.port.peer = None
            if self.port.busy is not None:
                self.port.busy.set_fd(0, -1)


class StreamPort(FramePort):
    """Listens on a unix stream socket for QEMU (`-netdev stream,server=off,addr.path=`)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.peer: _StreamPeer | None = None
        self.server: asyncio.AbstractServer | None = None

    async def start(self, deliver) -> None:
        self.deliver = deliver
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.server = await asyncio.get_running_loop().create_unix_server(
            lambda: _StreamPeer(self), self.path)

    def send(self, frames) -> None:
        peer = self.peer
        if peer is None or peer.transport.get_write_buffer_size() > STREAM_WRITE_LIMIT:
            self.dropped += len(frames)
            return
        parts = []
        for f in frames:
            if type(f) is tuple:
                parts.append(struct.pack("!I", sum(len(p) for p in f)))
                parts.extend(f)
            else:
                parts.append(struct.pack("!I", len(f)))
                parts.append(f)
        peer.transport.write(b"".join(parts))
        self.frames_out += len(frames)

    def close(self) -> None:
        if self.peer is not None:
            self.peer.transport.close()
        if self.server is not None:
            self.server.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


class DgramPort(FramePort):
    """A bound unix datagram socket; frames go back to the last peer that sent one."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        if os.path.exists(path):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.peer: str | None = None
        self.loop = None

    async def start(self, deliver) -> None:
        self.loop, self.deliver = asyncio.get_running_loop(), deliver
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def poll_with(self, busy: BusyPoll) -> None:
        super().poll_with(busy)
        busy.set_fd(0, self.sock.fileno())

    def _readable(self) -> None:
        busy = self.busy
        if busy is not None:
            busy.woke()
        self._read()
        if busy is not None:
            busy.spin()

    def _read(self) -> None:
        frames = []
        try:
            for _ in range(BATCH):
                data, addr = self.sock.recvfrom(MAX_FRAME)
                if addr:
                    self.peer = addr
                frames.append(data)
        except (BlockingIOError, InterruptedError):
            pass
        self.frames_in += len(frames)
        if frames:
            self.deliver(frames)

    def send(self, frames) -> None:
        if self.peer is None:
            self.dropped += len(frames)
            return
        for f in frames:
            try:
                self.sock.sendmsg(f if type(f) is tuple else (f,), (), 0, self.peer)
            except OSError:
                self.dropped += 1
        self.frames_out += len(frames)

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
