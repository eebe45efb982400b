# cython: language_level=3
"""Per-frame work of the user-mode network: parse frames, checksums. Building frames is in
`hvcore.net.builder`, TCP reassembly in `hvcore.net.reassembly` (both importable from here too),
shared wire helpers in `hvcore.net.wire` (.pxd), batched TAP I/O in `hvcore.net.ports`.

Every read of guest bytes goes through a length check first: a malformed frame yields a
`Packet` whose `reason` names the first bad field (the caller counts it and drops the
frame); nothing here raises on guest input. Checksums and copies of whole payloads run
with the GIL released. The flow logic (what to send, when) lives in `pyhv.net`.

Frames optionally start with a 10-byte `struct virtio_net_hdr` (TAP with IFF_VNET_HDR):
incoming checksum-offloaded (NEEDS_CSUM / DATA_VALID) frames skip the L4 checksum check and
TSO super-frames are one big segment; outgoing TCP data then goes out as GSO frames with a
partial checksum, so the kernel behind the TAP never sees one frame per MSS.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from hvcore.net.wire cimport ETH, VNET, fold, get16, get32, getmac, pseudo, sum16, sum_big

# Packet kinds
DROP = 0
ARP = 1
IPV4 = 2
FRAGMENT = 3
OTHER = 4           # an ethertype we do not speak (IPv6, VLAN...): ignored, not malformed

# TCP flags
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10

VNET_HDR_LEN = 10

# Drop reasons: index into REASONS (the service counts drops by name).
cdef enum:
    R_OK, R_ETH_SHORT, R_VNET, R_ARP_SHORT, R_ARP_BAD, R_IP_SHORT, R_IP_HDR, R_IP_LEN,
    R_IP_CSUM, R_TCP_SHORT, R_TCP_OFF, R_TCP_OPT, R_TCP_CSUM, R_UDP_SHORT, R_UDP_LEN,
    R_UDP_CSUM, R_ICMP_SHORT, R_ICMP_CSUM, R_IP_SRC, R_NREASONS

REASONS = ("ok", "truncated ethernet", "bad virtio-net header", "truncated arp", "bad arp",
           "truncated ipv4", "bad ipv4 header", "bad ipv4 length", "bad ipv4 checksum",
           "truncated tcp", "bad tcp data offset", "bad tcp options", "bad tcp checksum",
           "truncated udp", "bad udp length", "bad udp checksum", "truncated icmp",
           "bad icmp checksum", "bad ipv4 source")


def checksum(data) -> int:
    """The Internet checksum (RFC 1071) of a buffer: 0 over a buffer carrying a valid one."""
    cdef const uint8_t[::1] b = memoryview(data).cast("B")
    if b.shape[0] == 0:
        return 0xffff
    return (~sum_big(&b[0], b.shape[0])) & 0xffff


@cython.freelist(64)                   # one per frame: reused, not malloc'ed each time
cdef class Packet:
    """One parsed frame. `reason` is 0 or the index in REASONS of the first bad field;
    offsets are into `frame`. Fields of layers the frame lacks stay 0 (declared in
    net.packet.pxd)."""

    def __init__(self):
        raise TypeError("Packet objects come from parse() / parse_ip()")

    @property
    def payload(self) -> memoryview:
        return memoryview(self.frame)[self.payload_offset:self.payload_offset + self.payload_len]

    @property
    def ip_datagram(self) -> memoryview:
        return memoryview(self.frame)[self.ip_offset:self.ip_offset + self.ip_len]

    @property
    def reason_text(self) -> str:
        return REASONS[self.reason]

    def __repr__(self):
        return (f"Packet(kind={self.kind}, reason={REASONS[self.reason]!r}, proto={self.proto},"
                f" {self.src:#x}:{self.sport} -> {self.dst:#x}:{self.dport}, "
                f"flags={self.flags:#x}, len={self.payload_len})")

    cdef int _ip(self, const uint8_t *p, Py_ssize_t n, Py_ssize_t off, bint csum_ok) noexcept:
        """IPv4 header at p[off:] and its L4 header; returns the drop reason."""
        cdef const uint8_t *ip = p + off
        cdef Py_ssize_t avail = n - off, ihl, total, l4n, doff, i, olen
        cdef const uint8_t *l4
        cdef const uint8_t *opt
        cdef uint32_t s
        cdef int fragword
        if avail < 20:
            return R_IP_SHORT
        ihl = (ip[0] & 0x0f) * 4
        if (ip[0] >> 4) != 4 or ihl < 20:
            return R_IP_HDR
        total = get16(ip + 2)
        if total < ihl or total > avail or ihl > avail:
            return R_IP_LEN
        if sum16(ip, ihl) != 0xffff:
            return R_IP_CSUM
        self.ip_offset = off
        self.ip_len = total
        self.ident = get16(ip + 4)
        fragword = get16(ip + 6)
        self.more_fragments = (fragword >> 13) & 1
        self.frag_offset = (fragword & 0x1fff) * 8
        self.ttl = ip[8]
        self.proto = ip[9]
        self.src = get32(ip + 12)
        self.dst = get32(ip + 16)
        if (self.src >> 24) == 127 or (self.src >> 28) == 14:
            return R_IP_SRC                     # loopback or multicast source: never valid
        self.l4_offset = off + ihl
        self.payload_offset = off + ihl
        self.payload_len = total - ihl
        if self.more_fragments or self.frag_offset:
            self.kind = FRAGMENT
            return R_OK
        self.kind = IPV4
        l4 = ip + ihl
        l4n = total - ihl
        if self.proto == 6:
            if l4n < 20:
                return R_TCP_SHORT
            doff = (l4[12] >> 4) * 4
            if doff < 20 or doff > l4n:
                return R_TCP_OFF
            self.sport = get16(l4)
            self.dport = get16(l4 + 2)
            self.seq = get32(l4 + 4)
            self.ack = get32(l4 + 8)
            self.flags = l4[13] & 0x3f
            self.window = get16(l4 + 14)
            self.wscale = -1
            i = 20
            while i < doff:                      # options: every length checked
                opt = l4 + i
                if opt[0] == 0:
                    break
                if opt[0] == 1:
                    i += 1
                    continue
                if i + 1 >= doff:
                    return R_TCP_OPT
                olen = opt[1]
                if olen < 2 or i + olen > doff:
                    return R_TCP_OPT
                if opt[0] == 2:
                    if olen != 4:
                        return R_TCP_OPT
                    self.mss = get16(opt + 2)
                elif opt[0] == 3:
                    if olen != 3:
                        return R_TCP_OPT
                    self.wscale = opt[2] if opt[2] <= 14 else 14
                elif opt[0] == 4:
                    if olen != 2:
                        return R_TCP_OPT
                    self.sack_perm = 1
                i += olen
            if not csum_ok:
                s = fold(<uint64_t>sum_big(l4, l4n) + pseudo(self.src, self.dst, 6, l4n))
                if s != 0xffff:
                    return R_TCP_CSUM
            self.payload_offset = off + ihl + doff
            self.payload_len = l4n - doff
        elif self.proto == 17:
            if l4n < 8:
                return R_UDP_SHORT
            if get16(l4 + 4) < 8 or get16(l4 + 4) > l4n:
                return R_UDP_LEN
            l4n = get16(l4 + 4)
            self.sport = get16(l4)
            self.dport = get16(l4 + 2)
            if not csum_ok and get16(l4 + 6) != 0:
                s = fold(<uint64_t>sum_big(l4, l4n) + pseudo(self.src, self.dst, 17, l4n))
                if s != 0xffff:
                    return R_UDP_CSUM
            self.payload_offset = off + ihl + 8
            self.payload_len = l4n - 8
        elif self.proto == 1:
            if l4n < 8:
                return R_ICMP_SHORT
            if not csum_ok and sum_big(l4, l4n) != 0xffff:
                return R_ICMP_CSUM
            self.icmp_type = l4[0]
            self.icmp_code = l4[1]
            self.icmp_id = get16(l4 + 4)
            self.icmp_seq = get16(l4 + 6)
            self.payload_offset = off + ihl + 8
            self.payload_len = l4n - 8
        return R_OK


cdef Packet _new_packet(object frame):
    cdef Packet pkt = Packet.__new__(Packet)
    pkt.frame = frame
    pkt.wscale = -1
    return pkt


cpdef Packet parse(object frame, bint vnet=False):
    """Parse an Ethernet frame (after a virtio_net_hdr when `vnet`). Never raises on the
    frame's content: `kind == DROP` and `reason` say why it is unusable."""
    cdef Py_buffer view
    PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
    try:
        return _parse(_new_packet(frame), <const uint8_t *>view.buf, view.len, vnet)
    finally:
        PyBuffer_Release(&view)


cdef Packet _parse(Packet pkt, const uint8_t *p, Py_ssize_t n, bint vnet):
    cdef Py_ssize_t off = 0
    cdef const uint8_t *a
    cdef bint csum_ok = False
    if n == 0:
        pkt.reason = R_ETH_SHORT
        return pkt
    if vnet:
        if n < VNET:
            pkt.reason = R_VNET
            return pkt
        pkt.vnet_flags = p[0]
        pkt.gso_type = p[1]
        pkt.gso_size = p[4] | (p[5] << 8)
        csum_ok = (p[0] & 3) != 0           # NEEDS_CSUM (partial) or DATA_VALID
        off = VNET
    if n - off < ETH:
        pkt.reason = R_ETH_SHORT
        return pkt
    pkt.mac_dst = getmac(p + off)
    pkt.mac_src = getmac(p + off + 6)
    pkt.ethertype = get16(p + off + 12)
    off += ETH
    if pkt.ethertype == 0x0806:
        if n - off < 28:
            pkt.reason = R_ARP_SHORT
            return pkt
        a = p + off
        if get16(a) != 1 or get16(a + 2) != 0x0800 or a[4] != 6 or a[5] != 4:
            pkt.reason = R_ARP_BAD
            return pkt
        pkt.arp_op = get16(a + 6)
        pkt.arp_sha = getmac(a + 8)
        pkt.arp_spa = get32(a + 14)
        pkt.arp_tpa = get32(a + 24)
        pkt.kind = ARP
        return pkt
    if pkt.ethertype != 0x0800:
        pkt.kind = OTHER
        return pkt
    pkt.reason = pkt._ip(p, n, off, csum_ok)
    if pkt.reason:
        pkt.kind = DROP
    return pkt


def parse_ip(datagram) -> Packet:
    """Parse a reassembled IPv4 datagram (no Ethernet header), checksums checked."""
    cdef Packet pkt = _new_packet(datagram)
    cdef const uint8_t[::1] b = datagram
    if b.shape[0] == 0:
        pkt.reason = R_IP_SHORT
        return pkt
    pkt.reason = pkt._ip(&b[0], b.shape[0], 0, False)
    if pkt.reason:
        pkt.kind = DROP
    return pkt


# Building frames and reassembling TCP data live in their own modules; the names stay
# importable from here, where the whole network stack finds its packet tools.
from hvcore.net.builder import Builder             # noqa: E402
from hvcore.net.reassembly import Reassembly          # noqa: E402
