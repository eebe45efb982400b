"""Config parsing, DNS answers, DHCP options and IPv4 fragment reassembly, without a
network: the pieces the integration tests reach only through Linux."""

from __future__ import annotations

import struct

import pytest

from hvcore.net import packet as n
from pyhv.errors import PyhvError
from pyhv.net.config import Forward, NetConfig, parse_forward, parse_upstream
from pyhv.net.dhcp import parse_options
from pyhv.net.dns import Dns, question
from pyhv.net.frag import Fragments


def test_forward_specs():
    assert parse_forward("8080:80") == Forward("tcp", "127.0.0.1", 8080, 80)
    assert parse_forward("0.0.0.0:53:53/udp") == Forward("udp", "0.0.0.0", 53, 53)
    for bad in ("80", "a:1:2", "70000:1", "1:2/sctp", "1.2.3:1:2", "0:80"):
        with pytest.raises(PyhvError):
            parse_forward(bad)
    assert parse_upstream("10.0.0.1") == ("10.0.0.1", 53)
    assert parse_upstream("10.0.0.1:5353") == ("10.0.0.1", 5353)
    with pytest.raises(PyhvError):
        parse_upstream("nameserver")


def test_config_checks_addresses():
    with pytest.raises(PyhvError, match="not inside"):
        NetConfig(gateway="10.0.0.1")
    with pytest.raises(PyhvError, match="MTU"):
        NetConfig(mtu=70000)
    assert NetConfig(host_loopback=None).alias is None


def query(name: str, qtype: int = 1) -> bytes:
    q = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return q + struct.pack("!HH", qtype, 1)


def test_dns_builtin_answers():
    dns = Dns(NetConfig())
    reply = dns.local(query("host.pyhv.internal"))
    assert reply[:2] == b"\0\7" and reply[3] & 0x0F == 0 and reply[-4:] == bytes([192, 168, 65,
                                                                               254])
    assert dns.local(query("nothing.pyhv.internal"))[3] & 0x0F == 3     # NXDOMAIN
    aaaa = dns.local(query("gateway.pyhv.internal", 28))
    assert struct.unpack_from("!H", aaaa, 6)[0] == 0                   # no AAAA, no error
    assert dns.local(query("example.com")) is None                     # forwarded
    assert dns.local(b"\0\1\2") is None
    assert dns.local(b"\0" * 12)[3] & 0x0F == 1                       # FORMERR
    assert question(query("a.b")) == ("a.b", 1, len(query("a.b")))
    assert question(b"\0" * 12 + b"\x40" + b"x" * 70) is None


def test_dhcp_options_bounds():
    assert parse_options(b"\x35\x01\x01\xff") == {53: b"\x01"}
    assert parse_options(b"\x00\x35\x01\x03") == {53: b"\x03"}
    assert parse_options(b"\x35\x05\x01") is None                      # runs past the end
    assert parse_options(b"\x35") is None


def fragments(payload: bytes, pieces: list[tuple[int, int, int]], ident: int = 9,
              whole: bytes | None = None, eth: bytes = bytes(12)):
    """IPv4 fragments of a UDP datagram (or of the IP datagram `whole`): (offset in 8-byte
    units, length, more), after the Ethernet addresses `eth`."""
    if whole is None:
        b = n.Builder(1)
        b.guest_mac = 2
        whole = bytes(b.udp(0x0A000001, 1, 0x0A000002, 2, payload))[14:]
    body = whole[20:]
    out = []
    for off, length, more in pieces:
        hdr = bytearray(whole[:20])
        hdr[2:4] = struct.pack("!H", 20 + length)
        hdr[4:6] = struct.pack("!H", ident)
        hdr[6:8] = struct.pack("!H", (more << 13) | off)
        hdr[10:12] = b"\0\0"
        hdr[10:12] = struct.pack("!H", n.checksum(hdr))
        out.append(n.parse(eth + b"\x08\x00" + bytes(hdr) + body[off * 8:off * 8 + length]))
    return out


def test_fragments_reassemble_in_any_order():
    frags = Fragments()
    parts = fragments(b"p" * 40, [(2, 32, 0), (0, 16, 1)])
    assert all(p.kind == n.FRAGMENT for p in parts)
    assert frags.add(parts[0]) is None
    whole = n.parse_ip(frags.add(parts[1]))
    assert (whole.kind, whole.proto, bytes(whole.payload)) == (n.IPV4, 17, b"p" * 40)


def _recorder():
    """A frame port that keeps what the stack sends."""
    from pyhv.net.ports import FramePort

    class Recorder(FramePort):
        def __init__(self):
            super().__init__()
            self.sent = []

        def send(self, frames):
            self.sent.extend(bytes(f) for f in frames)

    return Recorder()


def test_fragmented_echo_keeps_the_guest_mac_and_is_answered_in_fragments():
    """The reassembled datagram has no Ethernet header: the guest's MAC must come from
    its fragments (it once became 00:00:00:00:00:00, and every later reply went astray),
    and a reply larger than the MTU goes back as fragments."""
    from pyhv.net.config import ip
    from pyhv.net.stack import Stack

    port = _recorder()
    stack = Stack(NetConfig(mtu=1500), port)
    guest_mac = 0x5255_0A00_0002
    gw, guest = ip("192.168.65.1"), ip("192.168.65.2")
    b = n.Builder(guest_mac)
    b.guest_mac = stack.builder.gateway_mac
    echo = bytes(b.icmp(guest, gw, 8, 0, (5 << 16) | 1, bytes(range(256)) * 12))[14:]
    eth = stack.builder.gateway_mac.to_bytes(6, "big") + guest_mac.to_bytes(6, "big")
    for part in fragments(b"", [(0, 1480, 1), (185, len(echo) - 20 - 1480, 0)], whole=echo,
                          eth=eth):
        stack.packet(part)
    assert stack.builder.guest_mac == guest_mac
    assert len(port.sent) == 3 and all(f[:6] == guest_mac.to_bytes(6, "big")
                                       for f in port.sent)
    assert stack.counters["icmp echo answered"] == 1


def test_overlapping_fragments_drop_the_datagram():
    frags = Fragments()
    a, b, c = fragments(b"o" * 40, [(0, 16, 1), (1, 16, 1), (3, 24, 0)])
    assert frags.add(a) is None and frags.add(b) is None
    assert frags.add(c) is None and frags.dropped == 1


def test_fragment_table_is_bounded():
    frags = Fragments(limit=4)
    for i in range(10):
        frags.add(fragments(b"f" * 40, [(0, 16, 1)], ident=i)[0])
    assert len(frags.partial) == 4 and frags.dropped == 6


def test_resolv_conf_is_reread_when_it_changes(tmp_path):
    import os

    conf = tmp_path / "resolv.conf"
    conf.write_text("# test\nnameserver 10.1.1.1\nnameserver fe80::1\n")
    dns = Dns(NetConfig(resolv_conf=str(conf)))
    assert dns.upstreams() == [("10.1.1.1", 53)]
    conf.write_text("nameserver 10.2.2.2\n")
    os.utime(conf, (1, 1))                                 # a different mtime, surely
    assert dns.upstreams() == [("10.2.2.2", 53)]
    assert Dns(NetConfig(dns_upstream=[("10.3.3.3", 5353)])).upstreams() == [("10.3.3.3",
                                                                                5353)]


def test_host_targets_and_no_host_loopback():
    from pyhv.net.config import ip
    from pyhv.net.ports import FramePort
    from pyhv.net.stack import Stack

    stack = Stack(NetConfig(), FramePort())
    assert stack.host_target(ip("192.168.65.254"), 80, "tcp") == ("127.0.0.1", 80)
    assert stack.host_target(ip("192.168.65.7"), 80, "tcp") is None      # inside the subnet
    assert stack.host_target(ip("224.0.0.1"), 80, "udp") is None
    assert stack.host_target(ip("93.184.216.34"), 443, "tcp") == ("93.184.216.34", 443)
    off = Stack(NetConfig(host_loopback=None), FramePort())
    assert off.host_target(ip("192.168.65.254"), 80, "tcp") is None


def test_frames_before_the_guest_mac_are_held_then_sent():
    """A forward's SYN can come before the guest has sent a frame: up to 64 frames wait
    (ARP ones are not kept), the rest are counted, ARP asks for the guest at most every
    200 ms, and the first frame from the guest sends them with its MAC."""
    from pyhv.net.config import ip
    from pyhv.net.stack import Stack

    port = _recorder()
    stack = Stack(NetConfig(mtu=1500), port)
    gw, guest = ip("192.168.65.1"), ip("192.168.65.2")
    udp = [stack.builder.udp(gw, 53, guest, 4000 + i, b"x") for i in range(70)]
    arp = stack.builder.arp_request(guest, gw)
    stack.send(udp[:60] + [arp])
    stack.send(udp[60:])
    assert len(stack.held) == 64
    assert stack.counters["dropped: no guest MAC yet"] == 6
    assert len(port.sent) == 1 and port.sent[0][12:14] == b"\x08\x06"    # one ARP request
    guest_mac = 0x5255_0A00_0002
    b = n.Builder(guest_mac)
    b.guest_mac = stack.builder.gateway_mac
    stack.packet(n.parse(bytes(b.arp_request(gw, guest)), False))
    to_guest = [f for f in port.sent[1:] if f[12:14] == b"\x08\x00"]
    assert len(to_guest) == 64 and stack.held == []
    assert all(f[:6] == guest_mac.to_bytes(6, "big") for f in to_guest)
