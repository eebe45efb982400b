# hvcore.fslookup: lookups into the inode table, cimported by the fast paths (fsfast, fsdirs).
from libc.stdint cimport uint64_t, int32_t
from hvcore.fsnodes cimport NodeTable
from hvcore.includes.stat cimport stat


cdef uint64_t adopt(NodeTable t, int fd, const stat *st, int *err, bint *new,
                   int32_t *slot) noexcept nogil
cdef int lookup(NodeTable t, uint64_t parent, const char *name, stat *st, uint64_t *nodeid,
                int32_t *slot) noexcept nogil
cdef int lookup_fd(NodeTable t, int pfd, const char *name, stat *st, uint64_t *nodeid,
                   int32_t *slot) noexcept nogil
