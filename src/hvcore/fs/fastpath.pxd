# hvcore.fs.fastpath: the request fast path, cimported by the transports that call it in C
# (`_serve`: one request into a reply buffer, without the GIL).
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from hvcore.fs.attr cimport IdAxis, Times
from hvcore.fs.files cimport FileTable
from hvcore.fs.inodes cimport NodeTable
from hvcore.fs.watch cimport OwnChanges
from hvcore.includes.fuse cimport fuse_in_header
from hvcore.includes.stat cimport stat
from hvcore.includes.sys cimport pthread_mutex_t


cdef class FastPath:
    cdef NodeTable nodes
    cdef FileTable files
    cdef IdAxis uid
    cdef IdAxis gid
    cdef Times times
    cdef public OwnChanges own          # the server's own changes, for the host watch
    cdef pthread_mutex_t lead           # held by the one reader reading /dev/fuse
    cdef public bint enabled            # set once INIT is done
    cdef public bint readonly
    cdef public bint watching           # stamps and expected names for the host watch
    cdef public bint writeback          # FUSE_WRITEBACK_CACHE negotiated
    cdef public bint chown_created      # a root server hands new inodes to the caller
    cdef public uint32_t open_flags     # FOPEN_* for files (the cache mode's)
    cdef public bint close_to_open      # auto: an open keeps the cache of an unchanged file
    cdef public uint32_t dir_open_flags  # FOPEN_* for directories
    cdef public uint32_t max_write      # largest READDIR(PLUS) payload

    cdef void _expect_name(self, uint64_t parent, const char *name) noexcept nogil
    cdef Py_ssize_t _entry(self, uint8_t *out, const fuse_in_header *h, uint64_t nodeid,
                           const stat *st, Py_ssize_t extra) noexcept nogil
    cdef Py_ssize_t _open_out(self, uint8_t *out, const fuse_in_header *h, uint64_t fh,
                              Py_ssize_t at, uint32_t extra=*) noexcept nogil
    cdef int _flags(self, uint32_t flags) noexcept nogil
    cdef Py_ssize_t _serve(self, const uint8_t *req, Py_ssize_t n, uint8_t *out,
                           Py_ssize_t cap) noexcept nogil
    cdef Py_ssize_t _lookup(self, const fuse_in_header *h, const uint8_t *req, Py_ssize_t n,
                            uint8_t *out) noexcept nogil
    cdef Py_ssize_t _getattr(self, const fuse_in_header *h, Py_ssize_t n,
                             uint8_t *out) noexcept nogil
    cdef Py_ssize_t _forget(self, const fuse_in_header *h, const uint8_t *req,
                            Py_ssize_t n) noexcept nogil
    cdef Py_ssize_t _open(self, const fuse_in_header *h, const uint8_t *req, Py_ssize_t n,
                          uint8_t *out) noexcept nogil
    cdef Py_ssize_t _create(self, const fuse_in_header *h, const uint8_t *req, Py_ssize_t n,
                            uint8_t *out) noexcept nogil
    cdef Py_ssize_t _flush(self, const fuse_in_header *h, const uint8_t *req, Py_ssize_t n,
                           uint8_t *out) noexcept nogil
    cdef Py_ssize_t _release(self, const fuse_in_header *h, const uint8_t *req, Py_ssize_t n,
                             uint8_t *out) noexcept nogil
    cdef Py_ssize_t _unlink(self, const fuse_in_header *h, const uint8_t *req, Py_ssize_t n,
                            uint8_t *out) noexcept nogil
