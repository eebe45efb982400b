# C declarations from <dirent.h>: getdents64 (glibc >= 2.30, _GNU_SOURCE) for directory listings.
from libc.stdint cimport uint8_t, uint16_t, uint64_t, int64_t


cdef extern from "<dirent.h>" nogil:
    struct dirent64:
        uint64_t d_ino
        int64_t d_off
        uint16_t d_reclen
        uint8_t d_type
        char d_name[1]
    ssize_t getdents64(int fd, void *buffer, size_t length)
