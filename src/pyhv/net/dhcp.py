"""DHCPv4 server (RFC 2131/2132): leases an address to each guest MAC, with mask, router,
DNS server, lease time, MTU and domain options. The first MAC gets `guest_ip`."""

from __future__ import annotations

import struct

from pyhv.net.config import DOMAIN

MAGIC = b"\x63\x82\x53\x63"
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = 1, 2, 3, 4, 5, 6, 7, 8


def parse_options(data: bytes) -> dict[int, bytes] | None:
    """Options after the magic cookie; None when one runs past the end."""
    opts: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        code = data[i]
        if code == 255:
            break
        if code == 0:
            i += 1
            continue
        if i + 1 >= len(data) or i + 2 + data[i + 1] > len(data):
            return None
        opts[code] = data[i + 2:i + 2 + data[i + 1]]
        i += 2 + data[i + 1]
    return opts


class Dhcp:
    def __init__(self, stack):
        self.stack = stack
        self.leases: dict[bytes, int] = {}

    def lease_for(self, mac: bytes) -> int | None:
        if mac in self.leases:
            return self.leases[mac]
        cfg = self.stack.cfg
        used = set(self.leases.values()) | {cfg.gw, cfg.alias}
        addr = cfg.guest
        while addr in used:
            addr += 1
        if addr >= cfg.broadcast:
            return None
        self.leases[mac] = addr
        return addr

    def request(self, pkt) -> None:
        stack = self.stack
        data = bytes(pkt.payload)
        if len(data) < 240 or data[0] != 1 or data[236:240] != MAGIC or data[1:3] != b"\1\6":
            stack.drop("bad dhcp request")
            return
        opts = parse_options(data[240:])
        if opts is None or len(opts.get(53, b"")) != 1:
            stack.drop("bad dhcp options")
            return
        kind = opts[53][0]
        xid, flags = data[4:8], data[10:12]
        chaddr = data[28:34]
        addr = self.lease_for(chaddr)
        if addr is None:
            stack.counters["dhcp: no free address"] += 1
            return
        if kind == DISCOVER:
            reply = OFFER
        elif kind == REQUEST:
            wanted = opts.get(50) or data[12:16]
            reply = ACK if int.from_bytes(wanted, "big") in (addr, 0) else NAK
        elif kind == INFORM:
            reply, addr = ACK, 0
        else:
            return                                  # RELEASE/DECLINE: the lease stays
        stack.counters[f"dhcp {({OFFER: 'offer', ACK: 'ack'}).get(reply, 'nak')}"] += 1
        stack.guest_addrs.add(addr)
        self._send(reply, xid, flags, data[12:16], addr if reply != NAK else 0, chaddr)

    def _send(self, kind: int, xid: bytes, flags: bytes, ciaddr: bytes, yiaddr: int,
              chaddr: bytes) -> None:
        cfg = self.stack.cfg
        gw = cfg.gw.to_bytes(4, "big")
        msg = struct.pack("!BBBB4s2s2s4s4s4s4s16s192x4s", 2, 1, 6, 0, xid, b"\0\0", flags,
                          ciaddr, yiaddr.to_bytes(4, "big"), gw, b"\0" * 4, chaddr, MAGIC)
        opts = [(53, bytes([kind])), (54, gw)]
        if kind != NAK:
            domain = DOMAIN.encode()
            opts += [(51, cfg.lease_time.to_bytes(4, "big")),
                     (1, cfg.netmask.to_bytes(4, "big")), (3, gw), (6, gw),
                     (26, cfg.mtu.to_bytes(2, "big")), (15, domain)]
        body = b"".join(bytes([c, len(v)]) + v for c, v in opts) + b"\xff"
        self.stack.send([self.stack.builder.udp(cfg.gw, 67, 0xFFFFFFFF, 68, msg + body)])
