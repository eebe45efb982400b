"""Port forwarding: host listeners whose connections and datagrams reach a guest port from
the gateway address. Forwards are added and removed at run time (control socket), each
with traffic counters."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pyhv.errors import PyhvError
from pyhv.net.config import Forward
from pyhv.net.tcp import HostSide

UDP_IDLE = 60.0


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


class _ForwardSide(HostSide):
    """An accepted host connection: opens its flow to the guest on connection_made."""

    def __init__(self, forwards: Forwards, active: _Active):
        super().__init__()
        self.forwards, self.active = forwards, active

    def connection_made(self, transport) -> None:
        c = self.active.counters
        c["connections"] += 1
        c["active"] += 1
        stack = self.forwards.stack
        self.conn = stack.tcp.open_inbound(transport, stack.cfg.guest,
                                           self.active.forward.guest_port, self._closed)
        self.active.live.add(self.conn)

    def _closed(self, conn) -> None:
        self.active.live.discard(conn)
        c = self.active.counters
        c["active"] -= 1
        c["bytes_in"] += conn.bytes_to_guest
        c["bytes_out"] += conn.bytes_to_host


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
                active.server = await loop.create_server(lambda: _ForwardSide(self, active),
                                                         fwd.host_ip, fwd.host_port,
                                                         reuse_address=True)
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
