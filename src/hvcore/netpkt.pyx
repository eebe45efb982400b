# cython: language_level=3
"""Per-frame and per-byte work of the user-mode network: parse, build, checksum, reassemble.

Every read of guest bytes goes through a length check first: a malformed frame yields a
`Packet` whose `reason` names the first bad field (the caller counts it and drops the
frame); nothing here raises on guest input. Checksums and copies of whole payloads run
with the GIL released. The flow logic (what to send, when) lives in `pyhv.net`.

Frames optionally start with a 10-byte `struct virtio_net_hdr` (TAP with IFF_VNET_HDR):
incoming checksum-offloaded (NEEDS_CSUM / DATA_VALID) frames skip the L4 checksum check and
TSO super-frames are one big segment; outgoing TCP data then goes out as GSO frames with a
partial checksum, so the kernel behind the TAP never sees one frame per MSS.
"""

from cpython.bytearray cimport PyByteArray_FromStringAndSize, PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset

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
DEF VNET = 10
DEF ETH = 14
DEF MAX_INTERVALS = 64

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


cdef inline uint16_t get16(const uint8_t *p) noexcept nogil:
    return (p[0] << 8) | p[1]


cdef inline uint32_t get32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void put16(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = (v >> 8) & 0xff
    p[1] = v & 0xff


cdef inline void put32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = (v >> 16) & 0xff
    p[2] = (v >> 8) & 0xff
    p[3] = v & 0xff


cdef inline void putmac(uint8_t *p, uint64_t mac) noexcept nogil:
    cdef int i
    for i in range(6):
        p[i] = (mac >> (8 * (5 - i))) & 0xff


cdef inline uint64_t getmac(const uint8_t *p) noexcept nogil:
    cdef uint64_t m = 0
    cdef int i
    for i in range(6):
        m = (m << 8) | p[i]
    return m


cdef uint32_t sum16(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    """One's-complement sum of big-endian 16-bit words, folded to 16 bits (RFC 1071):
    summed as native 32-bit words, byte-swapped once at the end."""
    cdef uint64_t s = 0
    cdef uint64_t w
    while n >= 8:
        memcpy(&w, p, 8)
        s += <uint32_t>w + (w >> 32)
        p += 8
        n -= 8
    while n >= 2:
        s += p[0] | (p[1] << 8)
        p += 2
        n -= 2
    if n:
        s += p[0]
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ((s & 0xff) << 8) | (s >> 8)


cdef inline uint32_t fold(uint64_t s) noexcept nogil:
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return <uint32_t>s


cdef inline uint32_t pseudo(uint32_t src, uint32_t dst, uint32_t proto, uint32_t length) noexcept nogil:
    return fold(<uint64_t>(src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff)
                + proto + length)


cdef uint32_t sum_big(const uint8_t *p, Py_ssize_t n) noexcept:
    """sum16, without the GIL for payloads large enough to be worth it."""
    cdef uint32_t r
    if n < 4096:
        return sum16(p, n)
    with nogil:
        r = sum16(p, n)
    return r


def checksum(data) -> int:
    """The Internet checksum (RFC 1071) of a buffer: 0 over a buffer carrying a valid one."""
    cdef const uint8_t[::1] b = memoryview(data).cast("B")
    if b.shape[0] == 0:
        return 0xffff
    return (~sum_big(&b[0], b.shape[0])) & 0xffff


cdef class Packet:
    """One parsed frame. `reason` is 0 or the index in REASONS of the first bad field;
    offsets are into `frame`. Fields of layers the frame lacks stay 0."""
    cdef readonly object frame
    cdef readonly int kind, reason, ethertype
    cdef readonly uint64_t mac_src, mac_dst
    cdef readonly int vnet_flags, gso_type, gso_size
    cdef readonly int arp_op
    cdef readonly uint64_t arp_sha
    cdef readonly uint32_t arp_spa, arp_tpa
    cdef readonly uint32_t src, dst
    cdef readonly int proto, ttl, ident, frag_offset, more_fragments, ip_offset, ip_len
    cdef readonly int sport, dport
    cdef readonly uint32_t seq, ack
    cdef readonly int flags, window, mss, wscale, sack_perm
    cdef readonly int icmp_type, icmp_code, icmp_id, icmp_seq
    cdef readonly int l4_offset, payload_offset, payload_len

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


def parse(frame, bint vnet=False) -> Packet:
    """Parse an Ethernet frame (after a virtio_net_hdr when `vnet`). Never raises on the
    frame's content: `kind == DROP` and `reason` say why it is unusable."""
    cdef Packet pkt = _new_packet(frame)
    cdef const uint8_t[::1] b = frame
    cdef Py_ssize_t n = b.shape[0], off = 0
    cdef const uint8_t *p
    cdef const uint8_t *a
    cdef bint csum_ok = False
    if n == 0:
        pkt.reason = R_ETH_SHORT
        return pkt
    p = &b[0]
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


cdef class Builder:
    """Builds frames from the gateway's MAC to the guest's: headers, checksums, segmentation.
    `vnet` prepends a virtio_net_hdr (and then TCP checksums are left to the receiver)."""
    cdef public uint64_t gateway_mac, guest_mac
    cdef public int mtu
    cdef readonly bint vnet
    cdef uint16_t ip_id

    def __init__(self, uint64_t gateway_mac, int mtu=1500, bint vnet=False):
        self.gateway_mac = gateway_mac
        self.guest_mac = 0xffffffffffff
        self.mtu = mtu
        self.vnet = vnet

    cdef bytearray _frame(self, Py_ssize_t l3len, uint16_t ethertype, uint8_t **l3):
        cdef Py_ssize_t hdr = (VNET if self.vnet else 0) + ETH
        cdef bytearray out = PyByteArray_FromStringAndSize(NULL, hdr + l3len)
        cdef uint8_t *p = <uint8_t *>PyByteArray_AS_STRING(out)
        if self.vnet:
            memset(p, 0, VNET)
            p += VNET
        putmac(p, self.guest_mac)
        putmac(p + 6, self.gateway_mac)
        put16(p + 12, ethertype)
        l3[0] = p + ETH
        return out

    cdef void _ip(self, uint8_t *ip, uint32_t src, uint32_t dst, int proto, Py_ssize_t total,
                  int ttl) noexcept:
        ip[0] = 0x45
        ip[1] = 0
        put16(ip + 2, total)
        self.ip_id += 1
        put16(ip + 4, self.ip_id)
        put16(ip + 6, 0x4000)                 # DF
        ip[8] = ttl
        ip[9] = proto
        put16(ip + 10, 0)
        put32(ip + 12, src)
        put32(ip + 16, dst)
        put16(ip + 10, (~sum16(ip, 20)) & 0xffff)

    def arp_reply(self, uint64_t tha, uint32_t tpa, uint32_t spa) -> bytearray:
        """ARP reply: `spa` is at the gateway's MAC, sent to (tha, tpa)."""
        cdef uint8_t *a
        cdef bytearray out = self._frame(28, 0x0806, &a)
        put16(a, 1)
        put16(a + 2, 0x0800)
        a[4] = 6
        a[5] = 4
        put16(a + 6, 2)
        putmac(a + 8, self.gateway_mac)
        put32(a + 14, spa)
        putmac(a + 18, tha)
        put32(a + 24, tpa)
        return out

    def arp_request(self, uint32_t tpa, uint32_t spa) -> bytearray:
        """Broadcast ARP request from the gateway's MAC: who has `tpa`? (tell `spa`)."""
        cdef uint8_t *a
        cdef bytearray out = self._frame(28, 0x0806, &a)
        putmac(a - ETH, 0xffffffffffff)
        put16(a, 1)
        put16(a + 2, 0x0800)
        a[4] = 6
        a[5] = 4
        put16(a + 6, 1)
        putmac(a + 8, self.gateway_mac)
        put32(a + 14, spa)
        putmac(a + 18, 0)
        put32(a + 24, tpa)
        return out

    def udp(self, uint32_t src, int sport, uint32_t dst, int dport, payload) -> bytearray:
        """A UDP datagram in one frame (callers keep it within the MTU)."""
        cdef const uint8_t[::1] b = memoryview(payload).cast("B")
        cdef Py_ssize_t n = b.shape[0]
        cdef uint8_t *ip
        cdef uint8_t *u
        cdef uint32_t s
        if n > 65535 - 28:
            raise ValueError(f"UDP payload of {n} bytes does not fit one datagram")
        cdef bytearray out = self._frame(28 + n, 0x0800, &ip)
        self._ip(ip, src, dst, 17, 28 + n, 64)
        u = ip + 20
        put16(u, sport)
        put16(u + 2, dport)
        put16(u + 4, 8 + n)
        put16(u + 6, 0)
        if n:
            memcpy(u + 8, &b[0], n)
        s = (~fold(<uint64_t>sum_big(u, 8 + n) + pseudo(src, dst, 17, 8 + n))) & 0xffff
        put16(u + 6, s if s else 0xffff)
        return out

    def icmp(self, uint32_t src, uint32_t dst, int icmp_type, int code, uint32_t rest,
             payload) -> bytearray:
        """An ICMP message: 4 bytes after the checksum are `rest` (id/seq, or unused)."""
        cdef const uint8_t[::1] b = memoryview(payload).cast("B")
        cdef Py_ssize_t n = b.shape[0]
        cdef uint8_t *ip
        cdef uint8_t *m
        if n > 65535 - 28:
            raise ValueError(f"ICMP payload of {n} bytes does not fit one datagram")
        cdef bytearray out = self._frame(28 + n, 0x0800, &ip)
        self._ip(ip, src, dst, 1, 28 + n, 64)
        m = ip + 20
        m[0] = icmp_type
        m[1] = code
        put16(m + 2, 0)
        put32(m + 4, rest)
        if n:
            memcpy(m + 8, &b[0], n)
        put16(m + 2, (~sum_big(m, 8 + n)) & 0xffff)
        return out

    cdef bytearray _tcp(self, uint32_t src, int sport, uint32_t dst, int dport, uint32_t seq,
                        uint32_t ack, int flags, int window, const uint8_t *data, Py_ssize_t n,
                        int optlen, int mss, int wscale, bint sack_perm, int gso_size,
                        bint copy=True):
        """One segment; without `copy` only the headers are built (the payload goes out
        as a second buffer of a writev), their lengths and checksum covering it."""
        cdef uint8_t *ip
        cdef uint8_t *t
        cdef uint8_t *v
        cdef Py_ssize_t tl = 20 + optlen + n
        cdef bytearray out = self._frame(20 + (tl if copy else 20 + optlen), 0x0800, &ip)
        cdef int o = 20
        self._ip(ip, src, dst, 6, 20 + tl, 64)
        t = ip + 20
        put16(t, sport)
        put16(t + 2, dport)
        put32(t + 4, seq)
        put32(t + 8, ack)
        t[12] = ((20 + optlen) // 4) << 4
        t[13] = flags
        put16(t + 14, window)
        put32(t + 16, 0)                      # checksum, urgent pointer
        if mss:
            t[o] = 2
            t[o + 1] = 4
            put16(t + o + 2, mss)
            o += 4
        if wscale >= 0:
            t[o] = 1
            t[o + 1] = 3
            t[o + 2] = 3
            t[o + 3] = wscale
            o += 4
        if sack_perm:
            t[o] = 1
            t[o + 1] = 1
            t[o + 2] = 4
            t[o + 3] = 2
            o += 4
        if n and copy:
            if n >= 4096:
                with nogil:
                    memcpy(t + o, data, n)
            else:
                memcpy(t + o, data, n)
        if self.vnet:                         # partial checksum: the receiver completes it
            v = ip - ETH - VNET
            v[0] = 1                          # VIRTIO_NET_HDR_F_NEEDS_CSUM
            v[2] = 14 + 20 + o                # hdr_len (little-endian u16)
            v[3] = 0
            if gso_size and n > gso_size:
                v[1] = 1                      # VIRTIO_NET_HDR_GSO_TCPV4
                v[4] = gso_size & 0xff
                v[5] = gso_size >> 8
            v[6] = 14 + 20
            v[8] = 16
            put16(t + 16, pseudo(src, dst, 6, tl))
        elif copy:
            put16(t + 16, (~fold(<uint64_t>sum_big(t, tl) + pseudo(src, dst, 6, tl))) & 0xffff)
        else:                                 # header and payload summed apart (o is even)
            put16(t + 16, (~fold(<uint64_t>sum16(t, o) + sum_big(data, n)
                                 + pseudo(src, dst, 6, tl))) & 0xffff)
        return out

    def tcp(self, uint32_t src, int sport, uint32_t dst, int dport, uint32_t seq, uint32_t ack,
            int flags, int window, payload=None, int mss=0, int wscale=-1,
            bint sack_perm=False) -> bytearray:
        """One TCP segment; `mss`/`wscale`/`sack_perm` add those options (SYN segments)."""
        cdef const uint8_t[::1] b
        cdef const uint8_t *d = NULL
        cdef Py_ssize_t n = 0
        cdef int optlen = (4 if mss else 0) + (4 if wscale >= 0 else 0) + (4 if sack_perm else 0)
        if payload is not None:
            b = memoryview(payload).cast("B")
            n = b.shape[0]
            if n:
                d = &b[0]
        if n > 65535 - 40 - optlen:
            raise ValueError(f"TCP payload of {n} bytes does not fit one segment")
        return self._tcp(src, sport, dst, dport, seq, ack, flags, window, d, n, optlen, mss,
                         wscale, sack_perm, 0)

    def tcp_data(self, uint32_t src, int sport, uint32_t dst, int dport, uint32_t seq,
                 uint32_t ack, int window, data, Py_ssize_t offset, Py_ssize_t length,
                 int mss, int last_flags=0x18, bint scatter=False) -> list:
        """Segment data[offset:offset+length] into ACK frames of at most `mss` payload
        bytes each, or with vnet into GSO frames of up to 64 KiB (gso_size = mss); the
        last one gets `last_flags` (ACK|PSH, or with FIN when the stream ends there).
        With `scatter` each frame is a (headers, payload memoryview) pair: no copy of
        the payload here, the port writes both buffers at once."""
        cdef const uint8_t[::1] b = memoryview(data).cast("B")
        cdef object view = memoryview(data) if scatter else None
        cdef bytearray hdr
        cdef list frames = []
        cdef Py_ssize_t step, n, pos = offset, end = offset + length
        if offset < 0 or length < 0 or end > b.shape[0] or mss <= 0:
            raise ValueError(f"bad segment range {offset}+{length} of {b.shape[0]}, mss {mss}")
        step = mss
        if self.vnet:
            step = ((65535 - 40) // mss) * mss
            if step == 0:
                step = mss
        while pos < end:
            n = min(step, end - pos)
            hdr = self._tcp(src, sport, dst, dport, seq, ack,
                            last_flags if pos + n == end else 0x10, window, &b[pos], n, 0,
                            0, -1, False, mss, not scatter)
            frames.append((hdr, view[pos:pos + n]) if scatter else hdr)
            seq = seq + <uint32_t>n
            pos += n
        return frames


cdef class Reassembly:
    """Out-of-order TCP data of one flow, held in a ring of `capacity` bytes (allocated only
    while something is held) as at most 64 sorted byte intervals. Sequence numbers are
    unwrapped 64-bit values; `base` is the next byte expected in order (rcv_nxt)."""
    cdef uint8_t *ring
    cdef readonly Py_ssize_t capacity
    cdef readonly uint64_t base
    cdef uint64_t starts[MAX_INTERVALS]
    cdef uint64_t ends[MAX_INTERVALS]
    cdef int n

    def __cinit__(self, Py_ssize_t capacity, uint64_t base=0):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.base = base
        self.ring = NULL
        self.n = 0

    def __dealloc__(self):
        free(self.ring)

    @property
    def pending(self) -> int:
        """Bytes held (in or out of order)."""
        cdef uint64_t total = 0
        cdef int i
        for i in range(self.n):
            total += self.ends[i] - self.starts[i]
        return total

    @property
    def intervals(self) -> list:
        return [(self.starts[i], self.ends[i]) for i in range(self.n)]

    def set_base(self, uint64_t base) -> None:
        """Move the in-order point (only while nothing is held)."""
        if self.n:
            raise ValueError("cannot move the base while data is held")
        self.base = base

    def add(self, uint64_t seq, data) -> int:
        """Store data at `seq`, clipped to [base, base + capacity); returns the bytes now
        ready in order at `base`, or -1 when the segment was dropped (too many holes)."""
        cdef const uint8_t[::1] b = memoryview(data).cast("B")
        cdef uint64_t s = seq, e = seq + <uint64_t>b.shape[0]
        cdef uint64_t lim = self.base + <uint64_t>self.capacity
        cdef Py_ssize_t skip, pos, first, k
        cdef int i, j, lo, hi
        if s < self.base:
            s = self.base
        if e > lim:
            e = lim
        if e <= s:
            return self._ready()
        # where the new interval goes, and which existing ones it touches
        lo = 0
        while lo < self.n and self.ends[lo] < s:
            lo += 1
        hi = lo
        while hi < self.n and self.starts[hi] <= e:
            hi += 1
        if lo == hi and self.n == MAX_INTERVALS:
            return -1
        if self.ring == NULL:
            self.ring = <uint8_t *>malloc(self.capacity)
            if self.ring == NULL:
                raise MemoryError()
        skip = <Py_ssize_t>(s - seq)
        pos = <Py_ssize_t>(s % <uint64_t>self.capacity)
        k = <Py_ssize_t>(e - s)
        first = min(k, self.capacity - pos)
        with nogil:
            memcpy(self.ring + pos, &b[skip], first)
            if k > first:
                memcpy(self.ring, &b[skip + first], k - first)
        if lo < hi:                            # merge [lo, hi) with the new interval
            if self.starts[lo] < s:
                s = self.starts[lo]
            if self.ends[hi - 1] > e:
                e = self.ends[hi - 1]
            j = lo + 1
            for i in range(hi, self.n):
                self.starts[j] = self.starts[i]
                self.ends[j] = self.ends[i]
                j += 1
            self.n = j
        else:                                  # insert at lo
            i = self.n
            while i > lo:
                self.starts[i] = self.starts[i - 1]
                self.ends[i] = self.ends[i - 1]
                i -= 1
            self.n += 1
        self.starts[lo] = s
        self.ends[lo] = e
        return self._ready()

    cdef Py_ssize_t _ready(self):
        if self.n and self.starts[0] == self.base:
            return <Py_ssize_t>(self.ends[0] - self.base)
        return 0

    def take(self) -> bytes:
        """The bytes ready in order at `base` (possibly empty); `base` moves past them."""
        cdef Py_ssize_t k = self._ready(), pos, first
        cdef bytes out
        cdef char *dst
        cdef int i
        if k == 0:
            return b""
        out = PyBytes_FromStringAndSize(NULL, k)
        dst = PyBytes_AS_STRING(out)
        pos = <Py_ssize_t>(self.base % <uint64_t>self.capacity)
        first = min(k, self.capacity - pos)
        with nogil:
            memcpy(dst, self.ring + pos, first)
            if k > first:
                memcpy(dst + first, self.ring, k - first)
        self.base = self.ends[0]
        for i in range(1, self.n):
            self.starts[i - 1] = self.starts[i]
            self.ends[i - 1] = self.ends[i]
        self.n -= 1
        if self.n == 0:
            free(self.ring)
            self.ring = NULL
        return out
