"""UDP NAT: one connected host socket per guest flow (src, sport, dst, dport), replies
mapped back, idle flows closed. Flows started from the host (port forwards) register a
handler for the guest's replies instead (`inbound`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

SWEEP = 5.0


class _Flow(asyncio.DatagramProtocol):
    __slots__ = ("nat", "key", "transport", "queue", "seen", "sent", "received")

    def __init__(self, nat: UdpNat, key: tuple[int, int, int, int]):
        self.nat, self.key = nat, key
        self.transport: asyncio.DatagramTransport | None = None
        self.queue: list[bytes] | None = []
        self.seen = time.monotonic()
        self.sent = self.received = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        queue, self.queue = self.queue, None
        for data in queue:
            transport.sendto(data)

    def send(self, data: bytes) -> None:
        self.seen = time.monotonic()
        self.sent += 1
        if self.queue is None:
            self.transport.sendto(data)
        elif len(self.queue) < self.nat.stack.cfg.udp_queue:
            self.queue.append(data)
        else:
            self.nat.stack.counters["udp dropped: queue full"] += 1

    def datagram_received(self, data: bytes, addr) -> None:
        self.seen = time.monotonic()
        self.received += 1
        src, sport, dst, dport = self.key
        self.nat.to_guest(dst, dport, src, sport, data)

    def error_received(self, exc) -> None:
        self.nat.stack.counters["udp host errors"] += 1

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class UdpNat:
    def __init__(self, stack):
        self.stack = stack
        self.flows: dict[tuple[int, int, int, int], _Flow] = {}
        self.inbound: dict[tuple[int, int, int, int], Callable[[bytes], None]] = {}
        self.sweeper: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.sweeper = self.stack.loop.call_later(SWEEP, self._sweep)

    def datagram(self, pkt) -> None:
        stack = self.stack
        key = (pkt.src, pkt.sport, pkt.dst, pkt.dport)
        handler = self.inbound.get(key)
        if handler is not None:
            handler(bytes(pkt.payload))
            return
        flow = self.flows.get(key)
        if flow is None:
            target = stack.host_target(pkt.dst, pkt.dport, "udp")
            if target is None:
                stack.counters["udp refused"] += 1
                if pkt.dst == stack.cfg.gw:         # nothing listens there: port unreachable
                    stack.unreachable(bytes(pkt.ip_datagram[:pkt.l4_offset - pkt.ip_offset
                                                            + 8]), 3)
                return
            if len(self.flows) >= stack.cfg.max_udp_flows:
                self._sweep(reschedule=False)
                if len(self.flows) >= stack.cfg.max_udp_flows:
                    stack.counters["udp dropped: flow limit"] += 1
                    return
            flow = self.flows[key] = _Flow(self, key)
            stack.counters["udp flows"] += 1
            stack.loop.create_task(self._open(flow, target))
        flow.send(bytes(pkt.payload))

    async def _open(self, flow: _Flow, target: tuple[str, int]) -> None:
        try:
            await self.stack.loop.create_datagram_endpoint(lambda: flow, remote_addr=target)
        except OSError:
            self.stack.counters["udp host socket failed"] += 1
            self.flows.pop(flow.key, None)

    def to_guest(self, src: int, sport: int, dst: int, dport: int, data: bytes) -> None:
        frames = self.stack.builder.fit(self.stack.builder.udp(src, sport, dst, dport, data))
        if len(frames) > 1:
            self.stack.counters["udp datagrams fragmented"] += 1
        self.stack.send(frames)

    def _sweep(self, reschedule: bool = True) -> None:
        now, idle = time.monotonic(), self.stack.cfg.udp_idle_timeout
        for key, flow in list(self.flows.items()):
            if now - flow.seen > idle:
                flow.close()
                del self.flows[key]
        if reschedule:
            self.sweeper = self.stack.loop.call_later(SWEEP, self._sweep)

    def stats(self) -> dict:
        return {"flows": len(self.flows)}

    def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
        for flow in self.flows.values():
            flow.close()
        self.flows.clear()
