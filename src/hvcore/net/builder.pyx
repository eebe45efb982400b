# cython: language_level=3
"""Frames from the gateway to the guest: Ethernet, ARP, IPv4, UDP, ICMP and TCP headers
with their checksums, and TCP data cut into segments (or, with a virtio_net_hdr, GSO
super-frames of up to 64 KiB whose checksum the receiver completes). Payloads are copied
with the GIL released, or not at all (scatter: headers and a view of the payload)."""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_FromStringAndSize, PyByteArray_AS_STRING
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from hvcore.net.wire cimport (ETH, VNET, fold, pseudo, put16, put32, putmac, sum16,
                             sum_big)


cdef class Builder:
    """Builds frames from the gateway's MAC to the guest's: headers, checksums, segmentation.
    `vnet` prepends a virtio_net_hdr (and then TCP checksums are left to the receiver).
    Its fields and C methods are declared in net.builder.pxd, so flows call it in C."""

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
        return self._arp(2, self.guest_mac, tha, tpa, spa)

    def arp_request(self, uint32_t tpa, uint32_t spa) -> bytearray:
        """Broadcast ARP request from the gateway's MAC: who has `tpa`? (tell `spa`)."""
        return self._arp(1, 0xffffffffffff, 0, tpa, spa)

    cdef bytearray _arp(self, int op, uint64_t dst, uint64_t tha, uint32_t tpa, uint32_t spa):
        """An Ethernet/IPv4 ARP frame from the gateway's MAC to `dst`."""
        cdef uint8_t *a
        cdef bytearray out = self._frame(28, 0x0806, &a)
        putmac(a - ETH, dst)
        put16(a, 1)
        put16(a + 2, 0x0800)
        a[4] = 6
        a[5] = 4
        put16(a + 6, op)
        putmac(a + 8, self.gateway_mac)
        put32(a + 14, spa)
        putmac(a + 18, tha)
        put32(a + 24, tpa)
        return out

    def udp(self, uint32_t src, int sport, uint32_t dst, int dport, payload) -> bytearray:
        """A UDP datagram in one frame (`fit` cuts it to the MTU)."""
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

    cpdef list fit(self, bytearray frame):
        """`frame` as the guest can take it: [frame] when its IPv4 datagram fits the MTU,
        else its fragments (RFC 791: data in multiples of 8 bytes, MF on all but the last,
        the original's id, DF cleared, each header's checksum redone), as a router between
        the host's 64 KiB datagrams (UDP replies, ICMP echo replies) and a 1500-byte link
        does. TCP never needs this: its segments are cut to the MSS."""
        cdef Py_ssize_t hdr = (VNET if self.vnet else 0) + ETH
        cdef Py_ssize_t total = len(frame) - hdr
        if total <= self.mtu:
            return [frame]
        cdef const uint8_t *src = <uint8_t *>PyByteArray_AS_STRING(frame)
        cdef const uint8_t *ip = src + hdr
        cdef Py_ssize_t ihl = (ip[0] & 15) * 4
        cdef Py_ssize_t data = total - ihl, step = ((self.mtu - ihl) // 8) * 8, off = 0, n
        cdef bytearray piece
        cdef uint8_t *q
        cdef list out = []
        while off < data:
            n = min(step, data - off)
            piece = PyByteArray_FromStringAndSize(NULL, hdr + ihl + n)
            q = <uint8_t *>PyByteArray_AS_STRING(piece)
            memcpy(q, src, hdr + ihl)
            q += hdr
            put16(q + 2, ihl + n)
            put16(q + 6, (off >> 3) | (0x2000 if off + n < data else 0))
            put16(q + 10, 0)
            put16(q + 10, (~sum16(q, ihl)) & 0xffff)
            memcpy(q + ihl, ip + ihl + off, n)
            out.append(piece)
            off += n
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

    cpdef bytearray tcp(self, uint32_t src, int sport, uint32_t dst, int dport, uint32_t seq,
                        uint32_t ack, int flags, int window, payload=None, int mss=0,
                        int wscale=-1, bint sack_perm=False):
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

    cpdef list tcp_data(self, uint32_t src, int sport, uint32_t dst, int dport, uint32_t seq,
                        uint32_t ack, int window, data, Py_ssize_t offset, Py_ssize_t length,
                        int mss, int last_flags=0x18, bint scatter=False):
        """Segment data[offset:offset+length] into ACK frames of at most `mss` payload
        bytes each, or with vnet into GSO frames of up to 64 KiB (gso_size = mss); the
        last one gets `last_flags` (ACK|PSH, or with FIN when the stream ends there).
        With `scatter` each frame is a (headers, payload memoryview) pair: no copy of
        the payload here, the port writes both buffers at once."""
        cdef Py_buffer buf
        cdef const uint8_t *b
        cdef object view = None
        cdef bytearray hdr
        cdef list frames = []
        cdef Py_ssize_t step, n, pos = offset, end = offset + length
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            if offset < 0 or length < 0 or end > buf.len or mss <= 0:
                raise ValueError(f"bad segment range {offset}+{length} of {buf.len}, mss {mss}")
            b = <const uint8_t *>buf.buf
            if scatter:
                view = memoryview(data)
            step = mss
            if self.vnet:
                step = ((65535 - 40) // mss) * mss
                if step == 0:
                    step = mss
            while pos < end:
                n = min(step, end - pos)
                hdr = self._tcp(src, sport, dst, dport, seq, ack,
                                last_flags if pos + n == end else 0x10, window, b + pos, n, 0,
                                0, -1, False, mss, not scatter)
                frames.append((hdr, view[pos:pos + n]) if scatter else hdr)
                seq = seq + <uint32_t>n
                pos += n
        finally:
            PyBuffer_Release(&buf)
        return frames
