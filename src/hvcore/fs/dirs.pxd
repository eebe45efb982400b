# hvcore.fs.dirs: directory requests of the fast path (hvcore.fs.fastpath).
from libc.stdint cimport uint8_t, uint32_t
from hvcore.fs.attr cimport Times, IdAxis
from hvcore.fs.files cimport FileTable
from hvcore.fs.inodes cimport NodeTable
from hvcore.includes.fuse cimport fuse_in_header, fuse_read_in


cdef Py_ssize_t opendir(NodeTable nodes, FileTable files, const fuse_in_header *h,
                        const uint8_t *req, Py_ssize_t n, uint8_t *out,
                        uint32_t open_flags) noexcept nogil
cdef Py_ssize_t readdir(NodeTable nodes, FileTable files, const fuse_in_header *h,
                        const fuse_read_in *rd, uint8_t *out, Py_ssize_t cap, bint plus,
                        const Times *t, const IdAxis *u, const IdAxis *g) noexcept nogil
