# cython: language_level=3
"""Packet's fields, declared here so flow code in Cython (hvcore.net.tcp) reads them as C
struct fields instead of Python attributes."""

from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef class Packet:
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

    cdef int _ip(self, const uint8_t *p, Py_ssize_t n, Py_ssize_t off, bint csum_ok) noexcept


cpdef Packet parse(object frame, bint vnet=*)
