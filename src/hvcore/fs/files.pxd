# hvcore.fs.files: the open files by FUSE file handle, cimported by the fast path
# (fs.fastpath) and the virtio-fs transport (fs.virtiofs: READ and WRITE on guest pages).
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int32_t
from posix.uio cimport iovec
from hvcore.includes.stat cimport stat
from hvcore.includes.sys cimport pthread_mutex_t
from hvcore.fs.inodes cimport NodeTable


cdef struct Slot:
    int fd            # -1: free
    int pins          # fast-path requests using fd now
    uint32_t gen      # bumped on every reuse: a stale file handle never finds the new file
    int32_t node      # the inode's slot in the NodeTable (held until RELEASE), -1: none
    bint closing      # removed while pinned: the last unpin closes fd
    bint written


cdef class FileTable:
    cdef Slot *slots
    cdef Py_ssize_t cap
    cdef Py_ssize_t hint
    cdef pthread_mutex_t lock
    cdef public NodeTable nodes     # counts each inode's written open files (host watch)
    cdef public bint enabled        # set once INIT is done
    cdef public bint writable       # WRITE served here (not on a read-only share)
    cdef public uint32_t max_io     # largest READ served here (max_write)

    cdef uint64_t _add(self, int fd, int32_t node) noexcept nogil
    cdef int _remove(self, uint64_t fh, stat *st, bint *written, int32_t *node) noexcept nogil
    cdef int32_t _node_of(self, uint64_t fh) noexcept nogil
    cdef int32_t _flushed(self, uint64_t fh, stat *st) noexcept nogil
    cdef void _mark_written(self, Slot *sl) noexcept nogil
    cdef Slot *_slot(self, uint64_t fh) noexcept nogil
    cdef Py_ssize_t _serve(self, const uint8_t *req, Py_ssize_t n, uint8_t *out,
                           Py_ssize_t cap) noexcept nogil
    cdef Py_ssize_t _serve_vec(self, const uint8_t *req, Py_ssize_t n, iovec *data,
                               int ndata, Py_ssize_t room, uint8_t *out) noexcept nogil
    cdef int _splice_read(self, const uint8_t *req, Py_ssize_t n, int devfd, int pr,
                          int pw, Py_ssize_t pipe_cap, uint8_t *out) noexcept nogil
    cdef int _pin(self, uint64_t fh, bint write) noexcept nogil
    cdef void _unpin(self, uint64_t fh) noexcept nogil
