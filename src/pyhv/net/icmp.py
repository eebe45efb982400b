"""ICMP: echo to the gateway (and the host-loopback alias) answered here; echo to other
addresses sent from the host with unprivileged ICMP sockets (net.ipv4.ping_group_range),
or with one raw socket when those are not allowed and pyhv runs as root."""

from __future__ import annotations

import errno
import itertools
import socket
import struct
import time

from hvcore.net.packet import checksum

IDLE = 30.0


class _Flow:
    __slots__ = ("guest", "dst", "guest_id", "sock", "seen", "ours")

    def __init__(self, guest: int, dst: int, guest_id: int, sock: socket.socket | None):
        self.guest, self.dst, self.guest_id, self.sock = guest, dst, guest_id, sock
        self.seen = time.monotonic()
        self.ours = 0                   # raw-socket mode: the echo id used on the host


class Icmp:
    def __init__(self, stack):
        self.stack = stack
        self.flows: dict[tuple[int, int, int], _Flow] = {}
        self.by_id: dict[int, _Flow] = {}          # raw-socket mode: our echo id -> flow
        self.raw: socket.socket | None = None
        self.ids = itertools.cycle(range(1, 65536))
        self.mode = "dgram"

    def message(self, pkt) -> None:
        stack, cfg = self.stack, self.stack.cfg
        if pkt.icmp_type != 8:
            stack.counters["icmp ignored"] += 1
            return
        rest = (pkt.icmp_id << 16) | pkt.icmp_seq
        if pkt.dst == cfg.gw or (cfg.alias is not None and pkt.dst == cfg.alias):
            stack.counters["icmp echo answered"] += 1
            stack.send(stack.builder.fit(stack.builder.icmp(pkt.dst, pkt.src, 0, 0, rest,
                                                           pkt.payload)))
            return
        if stack.host_target(pkt.dst, 0, "icmp") is None:
            stack.counters["icmp echo refused"] += 1
            return
        self._forward(pkt)

    def _forward(self, pkt) -> None:
        key = (pkt.src, pkt.dst, pkt.icmp_id)
        flow = self.flows.get(key)
        if flow is None:
            self._expire()
            flow = self._open(pkt)
            if flow is None:
                return
            self.flows[key] = flow
        flow.seen = time.monotonic()
        dst = socket.inet_ntoa(pkt.dst.to_bytes(4, "big"))
        if flow.sock is not None:
            msg = struct.pack("!BBHHH", 8, 0, 0, 0, pkt.icmp_seq) + bytes(pkt.payload)
            sock = flow.sock
        else:
            msg = struct.pack("!BBHHH", 8, 0, 0, flow.ours, pkt.icmp_seq) + bytes(pkt.payload)
            msg = msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]
            sock = self.raw
        try:
            sock.sendto(msg, (dst, 0))
            self.stack.counters["icmp echo forwarded"] += 1
        except OSError as e:
            self.stack.counters["icmp send failed"] += 1
            if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                head = bytes(pkt.ip_datagram[:pkt.l4_offset - pkt.ip_offset + 8])
                self.stack.unreachable(head, 1 if e.errno == errno.EHOSTUNREACH else 0)

    def _open(self, pkt) -> _Flow | None:
        loop = self.stack.loop
        if self.mode == "dgram":
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
            except OSError:
                self.mode = "raw"
            else:
                sock.setblocking(False)
                flow = _Flow(pkt.src, pkt.dst, pkt.icmp_id, sock)
                loop.add_reader(sock.fileno(), self._dgram_reply, flow)
                return flow
        if self.raw is None:
            try:
                self.raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            except OSError:
                self.stack.counters["icmp sockets unavailable"] += 1
                self.mode = "none"
                return None
            self.raw.setblocking(False)
            loop.add_reader(self.raw.fileno(), self._raw_reply)
        if self.mode == "none":
            return None
        flow = _Flow(pkt.src, pkt.dst, pkt.icmp_id, None)
        flow.ours = next(self.ids)
        self.by_id[flow.ours] = flow
        return flow

    def _reply(self, flow: _Flow, seq: int, payload: bytes) -> None:
        flow.seen = time.monotonic()
        self.stack.counters["icmp echo replies"] += 1
        builder = self.stack.builder
        self.stack.send(builder.fit(builder.icmp(flow.dst, flow.guest, 0, 0,
                                                 (flow.guest_id << 16) | seq, payload)))

    def _dgram_reply(self, flow: _Flow) -> None:
        try:
            data = flow.sock.recv(65536)
        except OSError:
            return
        if len(data) >= 8 and data[0] == 0:
            self._reply(flow, struct.unpack_from("!H", data, 6)[0], data[8:])

    def _raw_reply(self) -> None:
        try:
            data, _ = self.raw.recvfrom(65536)
        except OSError:
            return
        ihl = (data[0] & 15) * 4 if data else 0
        if len(data) < ihl + 8 or data[ihl] != 0:
            return
        ours, seq = struct.unpack_from("!HH", data, ihl + 4)
        flow = self.by_id.get(ours)
        src = int.from_bytes(data[12:16], "big")
        if flow is not None and src == flow.dst:
            self._reply(flow, seq, data[ihl + 8:])

    def _expire(self) -> None:
        now = time.monotonic()
        for key, flow in list(self.flows.items()):
            if now - flow.seen > IDLE:
                self._drop(key, flow)

    def _drop(self, key, flow: _Flow) -> None:
        del self.flows[key]
        if flow.sock is not None:
            self.stack.loop.remove_reader(flow.sock.fileno())
            flow.sock.close()
        else:
            self.by_id.pop(flow.ours, None)

    def close(self) -> None:
        for key, flow in list(self.flows.items()):
            self._drop(key, flow)
        if self.raw is not None:
            self.stack.loop.remove_reader(self.raw.fileno())
            self.raw.close()
