"""The stack: takes frames from a port, parses them in Cython, and hands each to the part
that owns it (ARP and ICMP here; UDP, TCP and DHCP in their modules). Answers go back
through the same port. Drops are counted by reason; nothing a guest sends raises."""

from __future__ import annotations

import asyncio
import logging

from hvcore.net import packet as netpkt
from hvcore.net.builder import Builder
from hvcore.net.busypoll import BusyPoll
from hvcore.net.packet import ARP, FRAGMENT, IPV4, OTHER
from hvcore.net.tcp import StackCore, syns_first  # noqa: F401  (syns_first: re-exported)
from pyhv.net.config import GATEWAY_MAC, NetConfig
from pyhv.net.frag import Fragments
from pyhv.net.ports import FramePort

log = logging.getLogger(__name__)


class Stack(StackCore):
    """One virtual network: a gateway, its services and NAT, behind one frame port.
    Receiving a batch, sending, delayed ACKs and deferred work are `StackCore`'s (C
    calls for the flows); the rest is here."""

    def __init__(self, cfg: NetConfig, port: FramePort, pcap=None):
        from pyhv.net.dhcp import Dhcp
        from pyhv.net.icmp import Icmp
        from pyhv.net.tcpnat import TcpNat
        from pyhv.net.udp import UdpNat

        self.cfg, self.port, self.pcap = cfg, port, pcap
        self.vnet = port.offload
        self.builder = Builder(GATEWAY_MAC, cfg.mtu, port.offload)
        self.io = getattr(port, "io", None)     # a TAP port's frame I/O: sent to in C
        self.loop: asyncio.AbstractEventLoop | None = None
        self.guest_addrs: set[int] = {cfg.guest}
        self.frags = Fragments(cfg.max_fragments, cfg.fragment_timeout)
        self.dhcp = Dhcp(self)
        self.icmp = Icmp(self)
        self.udp = UdpNat(self)
        self.tcp = TcpNat(self)
        self.conns, self.on_syn, self.on_other = self.tcp.conns, self.tcp.syn, self.packet
        self.host_written = False           # this batch wrote to a host socket
        self.configure(cfg)
        self.dns_addr: tuple[str, int] | None = None      # the built-in DNS server (UDP)
        self.dns_tcp_addr: tuple[str, int] | None = None  # and its TCP listener
        self.busy: BusyPoll | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.port.start(self.receive)
        self.tcp.start()
        self.udp.start()
        if self.cfg.busy_poll_us:
            # the port and the host sockets: polled a while after each event (net.busypoll)
            self.busy = BusyPoll([-1, self.tcp.poller.epfd], self.cfg.busy_poll_us * 1000)
            self.port.poll_with(self.busy)
            self.tcp.poller.busy = self.busy

    def close(self) -> None:
        if self.busy is not None:           # its descriptors close now: poll none of them
            self.busy.set_fd(0, -1)
            self.busy.set_fd(1, -1)
        self.close_timer()
        for callback in self.deferred:
            callback()
        self.tcp.close()
        self.udp.close()
        self.icmp.close()
        self.port.close()

    # ---- input (receive: StackCore)

    def packet(self, pkt) -> None:
        kind = pkt.kind
        if kind == IPV4:
            self.learn(pkt)
            self.ip(pkt)
        elif kind == ARP:
            self.arp(pkt)
        elif kind == FRAGMENT:
            self.counters["fragments"] += 1
            self.learn(pkt)                 # (the reassembled datagram has no Ethernet
            whole = self.frags.add(pkt)     # header: the MAC is learnt from its fragments)
            if whole is not None:
                ip = netpkt.parse_ip(whole)
                if ip.kind == IPV4:
                    self.ip(ip)
                else:
                    self.drop(ip.reason_text)
        elif kind == OTHER:
            self.counters["ignored ethertype"] += 1
        else:
            self.drop(pkt.reason_text)

    def drop(self, reason: str) -> None:
        self.counters["dropped"] += 1
        self.counters[f"dropped: {reason}"] += 1

    def learn(self, pkt) -> None:
        if pkt.mac_src != self.builder.guest_mac and not pkt.mac_src & (1 << 40):
            self.builder.guest_mac = pkt.mac_src
            if self.held:
                held, self.held = self.held, []
                mac, at = pkt.mac_src.to_bytes(6, "big"), 10 if self.vnet else 0
                for frame in held:
                    (frame[0] if type(frame) is tuple else frame)[at:at + 6] = mac
                self.send(held)

    def arp(self, pkt) -> None:
        """Answer requests for every address except the guests' own (the guest can reach
        anything through us; its duplicate-address probes stay unanswered)."""
        self.learn(pkt)
        if pkt.arp_op != 1:
            return
        tpa = pkt.arp_tpa
        if pkt.arp_spa:
            self.guest_addrs.add(pkt.arp_spa)
        if tpa == pkt.arp_spa or (tpa in self.guest_addrs and tpa != self.cfg.gw) or \
                tpa == 0 or tpa == self.cfg.broadcast:
            return
        self.counters["arp replies"] += 1
        self.send([self.builder.arp_reply(pkt.arp_sha, pkt.arp_spa, tpa)])

    def ip(self, pkt) -> None:
        if pkt.ttl <= 1 and pkt.dst != self.cfg.gw:      # we are a hop: it expires here
            self.counters["dropped: ttl expired"] += 1
            if pkt.dst >> 28 != 14 and pkt.dst != 0xFFFFFFFF and pkt.dst != self.cfg.broadcast:
                head = bytes(pkt.ip_datagram[:pkt.l4_offset - pkt.ip_offset + 8])
                self.send([self.builder.icmp(self.cfg.gw, pkt.src, 11, 0, 0, head)])
            return
        proto = pkt.proto
        if proto == 6:
            self.tcp.segment(pkt)
        elif proto == 17:
            if pkt.dport == 67 and (pkt.dst == self.cfg.gw or pkt.dst == 0xFFFFFFFF):
                self.dhcp.request(pkt)
            else:
                self.udp.datagram(pkt)
        elif proto == 1:
            self.icmp.message(pkt)
        else:
            self.counters["ignored ip protocol"] += 1

    # ---- output (send: StackCore)

    def unreachable(self, pkt_head: bytes, code: int) -> None:
        """ICMP destination unreachable (code 0 net, 1 host, 3 port) quoting `pkt_head`,
        the offending datagram's IP header and first 8 payload bytes."""
        src = int.from_bytes(pkt_head[16:20], "big")
        dst = int.from_bytes(pkt_head[12:16], "big")
        self.counters["icmp unreachable sent"] += 1
        self.send([self.builder.icmp(src, dst, 3, code, 0, pkt_head)])

    # ---- mapping guest destinations to host ones: host_target (StackCore)

    def stats(self) -> dict:
        return {"counters": dict(self.counters), "port": self.port.stats(),
                "tcp": self.tcp.stats(), "udp": self.udp.stats(),
                "fragments dropped": self.frags.dropped,
                "busy poll": None if self.busy is None else self.busy.stats()}

