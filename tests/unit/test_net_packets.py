"""hvcore.net.packet: frames built by Builder parse back; malformed frames are dropped with a
reason, never raise; checksums agree with a straightforward Python RFC 1071 sum."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvcore.net import packet as n

GW_MAC, GUEST_MAC = 0x0250_0000_0001, 0x0250_0000_0002
GW, GUEST = 0xC0A8_4101, 0xC0A8_4102


def ref_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@given(st.binary(max_size=3000))
def test_checksum_matches_reference(data):
    assert n.checksum(data) == ref_checksum(data)


def builder(vnet=False) -> n.Builder:
    b = n.Builder(GW_MAC, vnet=vnet)
    b.guest_mac = GUEST_MAC
    return b


def test_tcp_roundtrip_with_options():
    f = builder().tcp(GW, 80, GUEST, 4000, 7, 9, n.SYN | n.ACK, 5000, b"hi", mss=1460,
                      wscale=7, sack_perm=True)
    p = n.parse(bytes(f))
    assert (p.kind, p.reason, p.proto) == (n.IPV4, 0, 6)
    assert (p.src, p.dst, p.sport, p.dport, p.seq, p.ack) == (GW, GUEST, 80, 4000, 7, 9)
    assert (p.flags, p.window, p.mss, p.wscale, p.sack_perm) == (0x12, 5000, 1460, 7, 1)
    assert bytes(p.payload) == b"hi" and p.mac_src == GW_MAC and p.mac_dst == GUEST_MAC


def test_udp_icmp_arp_roundtrip():
    b = builder()
    p = n.parse(b.udp(GW, 53, GUEST, 5353, b"answer"))
    assert (p.proto, p.sport, p.dport, bytes(p.payload)) == (17, 53, 5353, b"answer")
    p = n.parse(b.icmp(GW, GUEST, 0, 0, (7 << 16) | 3, b"ping"))
    assert (p.proto, p.icmp_type, p.icmp_id, p.icmp_seq) == (1, 0, 7, 3)
    p = n.parse(b.arp_reply(GUEST_MAC, GUEST, GW))
    assert (p.kind, p.arp_op, p.arp_sha, p.arp_spa, p.arp_tpa) == (n.ARP, 2, GW_MAC, GW, GUEST)


def test_segmentation_plain_and_gso():
    data = bytes(range(256)) * 1000
    frames = builder().tcp_data(GW, 80, GUEST, 4000, 1000, 1, 100, data, 6, 10_000, 1460)
    got = [n.parse(bytes(f)) for f in frames]
    assert all(p.reason == 0 and p.payload_len <= 1460 for p in got)
    assert b"".join(bytes(p.payload) for p in got) == data[6:10_006]
    assert [p.seq for p in got][:2] == [1000, 2460] and got[-1].flags & n.PSH
    frames = builder(vnet=True).tcp_data(GW, 80, GUEST, 4000, 0, 1, 100, data, 0, len(data),
                                         1460)
    got = [n.parse(bytes(f), vnet=True) for f in frames]
    assert all(p.reason == 0 and p.gso_size == 1460 and p.gso_type == 1 for p in got)
    assert b"".join(bytes(p.payload) for p in got) == data


def test_malformed_frames_name_their_fault():
    good = bytes(builder().tcp(GW, 80, GUEST, 4000, 1, 1, n.ACK, 100, b"data"))
    cases = {
        b"": "truncated ethernet",
        good[:20]: "truncated ipv4",
        good[:14] + b"\x46" + good[15:]: "bad ipv4 checksum",
        good[:14] + b"\x65" + good[15:]: "bad ipv4 header",
        good[:-1] + bytes([good[-1] ^ 1]): "bad tcp checksum",
        good[:16] + b"\xff\xff" + good[18:]: "bad ipv4 length",
    }
    for frame, reason in cases.items():
        p = n.parse(frame)
        assert (p.kind, p.reason_text) == (n.DROP, reason), frame.hex()


def test_bogus_tcp_options_dropped():
    f = bytearray(builder().tcp(GW, 80, GUEST, 4000, 1, 1, n.SYN, 100, mss=1460))
    f[14 + 20 + 20 + 1] = 9                        # MSS option claims 9 bytes
    f[14 + 20 + 16:14 + 20 + 18] = b"\0\0"
    ph = struct.pack("!IIHH", GW, GUEST, 6, 24)
    f[14 + 20 + 16:14 + 20 + 18] = struct.pack("!H", ref_checksum(ph + bytes(f[34:])))
    assert n.parse(bytes(f)).reason_text == "bad tcp options"


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_random_frames_never_raise(frame, vnet):
    p = n.parse(frame, vnet=vnet)
    assert p.kind in (n.DROP, n.ARP, n.IPV4, n.FRAGMENT, n.OTHER)
    if p.kind == n.DROP:
        assert p.reason_text != "ok"
    assert len(p.payload) == p.payload_len


@settings(max_examples=1000, deadline=None)
@given(st.data())
def test_mutated_frames_never_raise(data):
    base = bytearray(builder().tcp(GW, 80, GUEST, 4000, 1, 1, n.SYN, 100, b"x" * 20,
                                   mss=1460, wscale=3))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(base) - 1))
        base[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(base)))
    p = n.parse(bytes(base[:cut]))
    assert len(p.payload) == p.payload_len


def test_packet_not_constructible():
    with pytest.raises(TypeError):
        n.Packet()


@pytest.mark.parametrize("vnet", [False, True])
def test_scatter_frames_equal_copied_ones(vnet):
    data = bytes(range(256)) * 500
    b = builder(vnet)
    args = (GW, 80, GUEST, 4000, 1000, 1, 100, data, 3, 70_000, 1460)
    copied = b.tcp_data(*args)
    scattered = n.Builder(GW_MAC, vnet=vnet)
    scattered.guest_mac = GUEST_MAC
    pairs = scattered.tcp_data(*args, scatter=True)
    assert all(type(p) is tuple and len(p) == 2 for p in pairs)
    joined = [b"".join(p) for p in pairs]
    for c, j in zip(copied, joined, strict=True):
        pc, pj = n.parse(bytes(c), vnet=vnet), n.parse(j, vnet=vnet)
        assert pj.reason == 0 and bytes(pj.payload) == bytes(pc.payload)
        assert (pj.seq, pj.flags, pj.gso_size) == (pc.seq, pc.flags, pc.gso_size)


@pytest.mark.parametrize("vnet", [False, True])
@pytest.mark.parametrize("size", [1472, 1473, 4000, 65507])
def test_fit_fragments_datagrams_larger_than_the_mtu(vnet, size):
    b = builder(vnet)
    b.mtu = 1500
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    whole = b.udp(GW, 53, GUEST, 5353, data)
    frames = b.fit(whole)
    hdr = (10 if vnet else 0) + 14
    if 28 + size <= 1500:
        assert frames == [whole]
        return
    assert len(frames) == -(-(8 + size) // 1480)
    joined, ids = b"", set()
    for i, f in enumerate(frames):
        f = bytes(f)
        assert f[:hdr] == bytes(whole[:hdr])                   # same vnet + Ethernet header
        ip = f[hdr:hdr + 20]
        assert len(f) - hdr == struct.unpack("!H", ip[2:4])[0] <= 1500
        assert ref_checksum(ip) == 0                            # header checksum redone
        word = struct.unpack("!H", ip[6:8])[0]
        assert not word & 0x4000                                # DF cleared
        assert bool(word & 0x2000) == (i < len(frames) - 1)     # MF on all but the last
        assert (word & 0x1FFF) * 8 == len(joined)               # contiguous offsets
        assert (len(f) - hdr - 20) % 8 == 0 or i == len(frames) - 1
        assert n.parse(f, vnet).kind == n.FRAGMENT
        ids.add(ip[4:6])
        joined += f[hdr + 20:]
    assert len(ids) == 1 and ids == {bytes(whole[hdr + 4:hdr + 6])}
    assert joined == bytes(whole[hdr + 20:])                    # UDP header + data, intact
