# cython: language_level=3
"""Builder's fields and methods, declared here so flow code in Cython (hvcore.net.tcp)
calls it in C instead of through Python calls."""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef class Builder:
    cdef public uint64_t gateway_mac, guest_mac
    cdef public int mtu
    cdef readonly bint vnet
    cdef uint16_t ip_id

    cdef bytearray _frame(self, Py_ssize_t l3len, uint16_t ethertype, uint8_t **l3)
    cdef void _ip(self, uint8_t *ip, uint32_t src, uint32_t dst, int proto, Py_ssize_t total,
                  int ttl) noexcept
    cdef bytearray _arp(self, int op, uint64_t dst, uint64_t tha, uint32_t tpa, uint32_t spa)
    cpdef list fit(self, bytearray frame)
    cdef bytearray _tcp(self, uint32_t src, int sport, uint32_t dst, int dport, uint32_t seq,
                        uint32_t ack, int flags, int window, const uint8_t *data, Py_ssize_t n,
                        int optlen, int mss, int wscale, bint sack_perm, int gso_size,
                        bint copy=*)
    cpdef bytearray tcp(self, uint32_t src, int sport, uint32_t dst, int dport, uint32_t seq,
                        uint32_t ack, int flags, int window, payload=*, int mss=*,
                        int wscale=*, bint sack_perm=*)
    cpdef list tcp_data(self, uint32_t src, int sport, uint32_t dst, int dport, uint32_t seq,
                        uint32_t ack, int window, data, Py_ssize_t offset, Py_ssize_t length,
                        int mss, int last_flags=*, bint scatter=*)
