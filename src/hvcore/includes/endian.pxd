# C declarations from <endian.h>: qcow2 tables are big-endian on disk.
from libc.stdint cimport uint16_t, uint32_t, uint64_t


cdef extern from "<endian.h>" nogil:
    uint16_t be16toh(uint16_t x)
    uint16_t htobe16(uint16_t x)
    uint32_t be32toh(uint32_t x)
    uint32_t htobe32(uint32_t x)
    uint64_t be64toh(uint64_t x)
    uint64_t htobe64(uint64_t x)
