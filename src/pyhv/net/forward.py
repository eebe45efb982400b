"""Port forwarding: host listeners whose connections and datagrams reach a guest port from
the gateway address. Forwards are added and removed at run time (control socket), each
with traffic counters."""

from __future__ import annotations

import asyncio
import errno
import socket
from dataclasses import dataclass, field

from pyhv.errors import PyhvError
from pyhv.net.config import Forward

UDP_IDLE = 60.0
ACCEPT_BACKOFF = 1.0        # out of fds: accepting pauses this long (as asyncio's servers)


@dataclass
class _Active:
    forward: Forward
    server: object
    counters: dict = field(default_factory=lambda: {"connections": 0, "active": 0,
                                                    "bytes_in": 0, "bytes_out": 0})
    live: set = field(default_factory=set)         # open flows: their bytes count too

    def totals(self) -> dict:
        c = dict(self.counters)
        c["bytes_in"] += sum(conn.bytes_to_guest for conn in self.live)
        c["bytes_out"] += sum(conn.bytes_to_host for conn in self.live)
        return c


class _TcpListener:
    """A listening host socket: each accepted connection becomes a flow to the guest
    (its socket goes to the flow as it is, no asyncio transport)."""

    def __init__(self, forwards: Forwards, active: _Active, loop):
        self.forwards, self.active, self.loop = forwards, active, loop
        fwd = active.forward
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((fwd.host_ip, fwd.host_port))
            self.sock.listen(1024)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.retry = None
        loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.forwards.stack.counters["tcp forward accept failed"] += 1
                    self.loop.remove_reader(self.sock.fileno())
                    self.retry = self.loop.call_later(ACCEPT_BACKOFF, self._resume)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = self.active.counters
            c["connections"] += 1
            c["active"] += 1
            stack = self.forwards.stack
            conn = stack.tcp.open_inbound(sock, stack.cfg.guest,
                                          self.active.forward.guest_port, self._closed)
            self.active.live.add(conn)

    def _resume(self) -> None:
        self.retry = None
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def _closed(self, conn) -> None:
        self.active.live.discard(conn)
        c = self.active.counters
        c["active"] -= 1
        c["bytes_in"] += conn.bytes_to_guest
        c["bytes_out"] += conn.bytes_to_host

    def close(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
        else:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class _UdpForward(asyncio.DatagramProtocol):
    """A host UDP socket: each peer address becomes a flow from a gateway port."""

    def __init__(self, forwards: Forwards, active: _Active):
        self.forwards, self.active = forwards, active
        self.peers: dict[tuple, int] = {}
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        stack = self.forwards.stack
        gw, guest, gport = stack.cfg.gw, stack.cfg.guest, self.active.forward.guest_port
        port = self.peers.get(addr)
        if port is None:
            port = self.peers[addr] = stack.tcp.next_port
            stack.tcp.next_port += 1
            key = (guest, gport, gw, port)
            stack.udp.inbound[key] = lambda reply, a=addr: self._reply(reply, a)
        self.active.counters["bytes_in"] += len(data)
        stack.udp.to_guest(gw, port, guest, gport, data)

    def _reply(self, data: bytes, addr) -> None:
        self.active.counters["bytes_out"] += len(data)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        stack = self.forwards.stack
        for key in [k for k in stack.udp.inbound if k[1] == self.active.forward.guest_port]:
            del stack.udp.inbound[key]


class Forwards:
    def __init__(self, stack):
        self.stack = stack
        self.active: dict[tuple[str, str, int], _Active] = {}

    async def add(self, fwd: Forward) -> None:
        key = (fwd.proto, fwd.host_ip, fwd.host_port)
        if key in self.active:
            raise PyhvError(f"{fwd.host_ip}:{fwd.host_port}/{fwd.proto} is already forwarded")
        loop = asyncio.get_running_loop()
        active = _Active(fwd, None)
        try:
            if fwd.proto == "tcp":
                active.server = _TcpListener(self, active, loop)
            else:
                _, active.server = await loop.create_datagram_endpoint(
                    lambda: _UdpForward(self, active), local_addr=(fwd.host_ip, fwd.host_port))
        except OSError as e:
            raise PyhvError(f"cannot listen on {fwd.host_ip}:{fwd.host_port}/{fwd.proto}: "
                            f"{e.strerror}") from None
        self.active[key] = active

    def remove(self, fwd: Forward) -> None:
        active = self.active.pop((fwd.proto, fwd.host_ip, fwd.host_port), None)
        if active is None:
            raise PyhvError(f"no forward on {fwd.host_ip}:{fwd.host_port}/{fwd.proto}")
        active.server.close()

    def list(self) -> list[dict]:
        return [{"spec": a.forward.spec, **a.totals()} for a in self.active.values()]

    def close(self) -> None:
        for active in self.active.values():
            active.server.close()
        self.active.clear()
