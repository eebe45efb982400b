# cython: language_level=3
# Wire-format helpers shared by the network modules (net.packet: parse; net.builder: build;
# inline, so each module gets its own copy): big-endian loads and stores, MAC addresses,
# the Internet checksum (RFC 1071) and the TCP/UDP pseudo-header sum.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef enum:
    VNET = 10           # struct virtio_net_hdr (TAP with IFF_VNET_HDR)
    ETH = 14            # Ethernet header


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


# One's-complement sum of big-endian 16-bit words, folded to 16 bits (RFC 1071):
# summed as native 32-bit words, byte-swapped once at the end.
cdef inline uint32_t sum16(const uint8_t *p, Py_ssize_t n) noexcept nogil:
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


# sum16, without the GIL for payloads large enough to be worth it.
cdef inline uint32_t sum_big(const uint8_t *p, Py_ssize_t n) noexcept:
    cdef uint32_t r
    if n < 4096:
        return sum16(p, n)
    with nogil:
        r = sum16(p, n)
    return r
