# hvcore.fs.watch: the server's own changes, recorded by the fast path (fs.fastpath) and the Python
# handlers, matched against inotify events by the host watch.
from libc.stdint cimport uint32_t, uint64_t
from hvcore.includes.sys cimport pthread_mutex_t

DEF NAME_MAX = 255


cdef struct Expect:
    uint64_t parent         # 0: taken (or never used)
    uint32_t len
    char name[NAME_MAX + 1]


cdef class OwnChanges:
    cdef Expect *ring
    cdef int head           # the next slot written
    cdef int count          # live span: the `count` slots before head (oldest first)
    cdef pthread_mutex_t lock

    cdef void _add(self, uint64_t parent, const char *name, size_t length) noexcept nogil
    cdef bint _take(self, uint64_t parent, const char *name, size_t length) noexcept nogil
