# hvcore.fs.lookup: lookups into the inode table, cimported by the fast paths (fs.fastpath, fs.dirs).
from libc.stdint cimport uint64_t, int32_t
from hvcore.fs.inodes cimport NodeTable
from hvcore.includes.stat cimport stat


cdef uint64_t adopt(NodeTable t, int fd, const stat *st, int *err, bint *new,
                   int32_t *slot) noexcept nogil
cdef int lookup(NodeTable t, uint64_t parent, const char *name, stat *st, uint64_t *nodeid,
                int32_t *slot) noexcept nogil
cdef int lookup_fd(NodeTable t, int pfd, const char *name, stat *st, uint64_t *nodeid,
                   int32_t *slot) noexcept nogil
