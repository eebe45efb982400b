# hvcore.fs.inodes: the inode table, cimported by the metadata fast path (hvcore.fs.fastpath).
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int32_t, int64_t
from hvcore.includes.sys cimport pthread_mutex_t
from hvcore.includes.stat cimport stat

DEF HANDLE_WORDS = 17      # struct file_handle with MAX_HANDLE_SZ bytes, in 8-byte words


cdef struct Stamp:
    int64_t ctime           # ns; a file's state as far as caches tell changes: (ctime,
    int64_t mtime           # mtime, size)
    int64_t size
    bint set                # 0: none recorded


cdef inline Stamp stamp_of(const stat *st) noexcept nogil:
    cdef Stamp s
    s.ctime = st.st_ctim.tv_sec * 1000000000 + st.st_ctim.tv_nsec
    s.mtime = st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec
    s.size = st.st_size
    s.set = 1
    return s


cdef inline bint stamp_is(const Stamp *s, const stat *st) noexcept nogil:
    """Whether `st` is the recorded state (False when none is)."""
    cdef Stamp now = stamp_of(st)
    return s.set and s.ctime == now.ctime and s.mtime == now.mtime and s.size == now.size


cdef struct Node:
    uint64_t nodeid         # 0: a free slot
    uint64_t dev
    uint64_t ino
    int64_t nlookup
    Stamp stamp             # after the server's own last change (the host watch)
    Stamp kept              # of the data the client's page cache holds (set at each open
                            # and by the server's own changes; NFS close-to-open)
    int fd                  # O_PATH descriptor, -1 while not cached (handle inodes)
    int pins                # requests and open files using fd now
    int wd                  # inotify watch of a directory, -1: none
    int writers             # open files the server has written through (host watch)
    int mount_fd            # for open_by_handle_at
    uint32_t mode           # S_IFMT bits
    uint32_t handle_len     # bytes of handle in use; 0: no handle, fd kept for life
    bint dead               # forgotten while pinned: freed at the last unpin
    bint in_lru
    bint pyheld             # Python keeps state for it (POSIX lock descriptors)
    int32_t next_id         # hash chains by nodeid, by (dev, ino), by wd; free list
    int32_t next_key
    int32_t next_wd
    int32_t lru_prev
    int32_t lru_next
    uint64_t handle[HANDLE_WORDS]


cdef class NodeTable:
    cdef Node *nodes
    cdef int32_t cap
    cdef int32_t count
    cdef int32_t free_head
    cdef int32_t *by_id
    cdef int32_t *by_key
    cdef int32_t *by_wd
    cdef uint32_t nbuckets
    cdef int32_t lru_head
    cdef int32_t lru_tail
    cdef int32_t lru_len
    cdef uint64_t next_nodeid
    cdef int mounts[64][2]      # (mount id, descriptor)
    cdef int nmounts
    cdef pthread_mutex_t lock
    cdef public int capacity            # cached descriptors of handle inodes
    cdef public bint use_handles
    cdef public int inotify_fd          # >= 0: new directories get a watch (host watch on)
    cdef public uint32_t inotify_mask

    cdef int32_t _find_id(self, uint64_t nodeid) noexcept nogil
    cdef int32_t _find_key(self, uint64_t dev, uint64_t ino) noexcept nogil
    cdef int32_t _pin(self, uint64_t nodeid, int *fd, int *err) noexcept nogil
    cdef void _unpin(self, int32_t slot) noexcept nogil
    cdef void _hold(self, int32_t slot) noexcept nogil
    cdef int _forget(self, uint64_t nodeid, uint64_t count, bint force) noexcept nogil
    cdef bint _pyheld(self, uint64_t nodeid, uint64_t count) noexcept nogil
    cdef int32_t _slot_of_pinned(self, uint64_t nodeid) noexcept nogil
    cdef void _set_stamp(self, int32_t slot, const stat *st) noexcept nogil
    cdef bint _keep_cache(self, int32_t slot, const stat *st) noexcept nogil
    cdef void _writers(self, int32_t slot, int delta) noexcept nogil
    cdef int _grow(self) noexcept nogil
    cdef int32_t _alloc(self) noexcept nogil
    cdef void _free(self, int32_t s) noexcept nogil
    cdef void _link(self, int32_t s) noexcept nogil
    cdef void _link_id(self, int32_t s) noexcept nogil
    cdef void _link_key(self, int32_t s) noexcept nogil
    cdef void _link_wd(self, int32_t s) noexcept nogil
    cdef void _unchain(self, int32_t *head, int32_t s, int which) noexcept nogil
    cdef void _unlink_key(self, int32_t s) noexcept nogil
    cdef int32_t _find_wd(self, int wd) noexcept nogil
    cdef void _lru_remove(self, int32_t s) noexcept nogil
    cdef int _lru_append(self, int32_t s) noexcept nogil
    cdef int _settle(self, int32_t s) noexcept nogil
    cdef int _drop(self, int32_t s) noexcept nogil
    cdef void _close_all(self) noexcept nogil
    cdef bint _known(self, uint64_t dev, uint64_t ino) noexcept nogil
    cdef Node _peek(self, int32_t slot) noexcept nogil
