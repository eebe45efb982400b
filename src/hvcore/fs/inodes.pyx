# cython: language_level=3
"""The inode table in C: every host inode the client holds, so LOOKUP, GETATTR and FORGET
can be answered without Python (`hvcore.fs.fastpath`) while Python's handlers use the same table.

Semantics as virtiofsd's `--inode-file-handles` (see `pyhv.share.inodes`, the Python face):
a nodeid per host inode ((st_dev, st_ino), and the same file handle: a reused inode number
gets a new nodeid), never reused; a lookup count the client's FORGETs take back. A handle
inode's O_PATH descriptor lives in a bounded LRU and is reopened with open_by_handle_at;
without handles the descriptor is kept for the inode's life. A descriptor in use is pinned
(requests, open files); a node forgotten while pinned is freed at its last unpin. Lookups
and adopting new inodes are `hvcore.fs.lookup`'s; directory watches `hvcore.fs.watch`'s.

One mutex guards the table; system calls run outside it where they may block (descriptors
are closed after it is released: the last close of a deleted file frees it on the host).
Nodes live in one array (slots, found through chained hashes by nodeid, by (dev, ino) and by
inotify wd).
"""

from libc.errno cimport errno, ESTALE
from libc.stdint cimport uint32_t, uint64_t, int32_t, int64_t
from libc.stdlib cimport malloc, free, realloc
from libc.string cimport memcpy, memset
from posix.fcntl cimport O_CLOEXEC
from posix.unistd cimport close

from hvcore.fs.ops cimport Stat
from hvcore.includes.fcntl cimport O_NOFOLLOW, O_PATH
from hvcore.includes.fhandle cimport file_handle, open_by_handle_at
from hvcore.includes.inotify cimport inotify_rm_watch
from hvcore.includes.sys cimport (adaptive_mutex_init, pthread_mutex_destroy,
                                  pthread_mutex_lock, pthread_mutex_unlock)

import os as _os

DEF HANDLE_WORDS = 17
DEF S_IFMT = 0o170000
DEF S_IFDIR = 0o040000
DEF ROOT_ID = 1
cdef int O_PATH_FLAGS = O_PATH | O_NOFOLLOW | O_CLOEXEC


cdef inline uint32_t _mix(uint64_t x) noexcept nogil:
    x ^= x >> 33
    x *= <uint64_t>0xff51afd7ed558ccd
    x ^= x >> 33
    return <uint32_t>x


cdef inline uint32_t _hkey(uint64_t dev, uint64_t ino) noexcept nogil:
    return _mix(ino * <uint64_t>0x9e3779b97f4a7c15 + dev)


cdef class NodeTable:
    """The inode table (C). Python reaches it through `pyhv.share.inodes.InodeTable`."""

    def __cinit__(self, int root_fd, uint64_t dev, uint64_t ino, int capacity,
                  bint use_handles):
        adaptive_mutex_init(&self.lock)
        self.cap = 0
        self.nodes = NULL
        self.nbuckets = 0
        self.free_head = -1
        self.lru_head = self.lru_tail = -1
        self.inotify_fd = -1
        self.capacity = capacity
        self.use_handles = use_handles
        self.next_nodeid = ROOT_ID
        if self._grow() < 0:
            raise MemoryError()
        cdef int32_t s = self._alloc()
        cdef Node *n = &self.nodes[s]
        n.nodeid, n.dev, n.ino, n.fd, n.mode = ROOT_ID, dev, ino, root_fd, S_IFDIR
        n.nlookup = 1 << 62
        self.next_nodeid = ROOT_ID + 1
        self._link(s)

    def __dealloc__(self):
        self._close_all()
        free(self.nodes)
        free(self.by_id)
        free(self.by_key)
        free(self.by_wd)
        pthread_mutex_destroy(&self.lock)

    # --- slots and hashes (lock held) --------------------------------------------------------

    cdef int _grow(self) noexcept nogil:
        cdef int32_t ncap = self.cap * 2 if self.cap else 1024
        cdef Node *grown = <Node *>realloc(self.nodes, ncap * sizeof(Node))
        if grown == NULL:
            return -1
        cdef int32_t *bi = <int32_t *>malloc(ncap * sizeof(int32_t))
        cdef int32_t *bk = <int32_t *>malloc(ncap * sizeof(int32_t))
        cdef int32_t *bw = <int32_t *>malloc(ncap * sizeof(int32_t))
        self.nodes = grown
        if bi == NULL or bk == NULL or bw == NULL:
            free(bi)
            free(bk)
            free(bw)
            return -1
        memset(grown + self.cap, 0, (ncap - self.cap) * sizeof(Node))
        cdef int32_t i
        for i in range(ncap - 1, self.cap - 1, -1):
            grown[i].next_id = self.free_head
            self.free_head = i
        memset(bi, 0xff, ncap * sizeof(int32_t))
        memset(bk, 0xff, ncap * sizeof(int32_t))
        memset(bw, 0xff, ncap * sizeof(int32_t))
        free(self.by_id)
        free(self.by_key)
        free(self.by_wd)
        self.by_id, self.by_key, self.by_wd = bi, bk, bw
        cdef int32_t old = self.cap
        self.cap = ncap
        self.nbuckets = <uint32_t>ncap
        for i in range(old):            # rehash the live nodes (dead ones are in no chain)
            if grown[i].nodeid and not grown[i].dead:
                self._link_id(i)
                if grown[i].next_key != -2:
                    self._link_key(i)
                if grown[i].wd >= 0:
                    self._link_wd(i)
        return 0

    cdef int32_t _alloc(self) noexcept nogil:
        if self.free_head < 0 and self._grow() < 0:
            return -1
        cdef int32_t s = self.free_head
        self.free_head = self.nodes[s].next_id
        memset(&self.nodes[s], 0, sizeof(Node))
        self.nodes[s].fd = -1
        self.nodes[s].wd = -1
        self.nodes[s].mount_fd = -1
        self.nodes[s].lru_prev = self.nodes[s].lru_next = -1
        self.count += 1
        return s

    cdef void _free(self, int32_t s) noexcept nogil:
        self.nodes[s].nodeid = 0
        self.nodes[s].next_id = self.free_head
        self.free_head = s
        self.count -= 1

    cdef void _link(self, int32_t s) noexcept nogil:
        self._link_id(s)
        self._link_key(s)

    cdef void _link_id(self, int32_t s) noexcept nogil:
        cdef uint32_t b = _mix(self.nodes[s].nodeid) & (self.nbuckets - 1)
        self.nodes[s].next_id = self.by_id[b]
        self.by_id[b] = s

    cdef void _link_key(self, int32_t s) noexcept nogil:
        cdef uint32_t b = _hkey(self.nodes[s].dev, self.nodes[s].ino) & (self.nbuckets - 1)
        self.nodes[s].next_key = self.by_key[b]
        self.by_key[b] = s

    cdef void _link_wd(self, int32_t s) noexcept nogil:
        cdef uint32_t b = _mix(<uint64_t>self.nodes[s].wd) & (self.nbuckets - 1)
        self.nodes[s].next_wd = self.by_wd[b]
        self.by_wd[b] = s

    cdef void _unchain(self, int32_t *head, int32_t s, int which) noexcept nogil:
        cdef int32_t *p = head
        while p[0] >= 0:
            if p[0] == s:
                if which == 0:
                    p[0] = self.nodes[s].next_id
                elif which == 1:
                    p[0] = self.nodes[s].next_key
                else:
                    p[0] = self.nodes[s].next_wd
                return
            if which == 0:
                p = &self.nodes[p[0]].next_id
            elif which == 1:
                p = &self.nodes[p[0]].next_key
            else:
                p = &self.nodes[p[0]].next_wd

    cdef void _unlink_key(self, int32_t s) noexcept nogil:
        if self.nodes[s].next_key == -2:
            return
        self._unchain(&self.by_key[_hkey(self.nodes[s].dev, self.nodes[s].ino)
                                   & (self.nbuckets - 1)], s, 1)
        self.nodes[s].next_key = -2         # in no key chain

    cdef int32_t _find_id(self, uint64_t nodeid) noexcept nogil:
        cdef int32_t s = self.by_id[_mix(nodeid) & (self.nbuckets - 1)]
        while s >= 0 and self.nodes[s].nodeid != nodeid:
            s = self.nodes[s].next_id
        return s

    cdef int32_t _find_key(self, uint64_t dev, uint64_t ino) noexcept nogil:
        cdef int32_t s = self.by_key[_hkey(dev, ino) & (self.nbuckets - 1)]
        while s >= 0 and (self.nodes[s].ino != ino or self.nodes[s].dev != dev):
            s = self.nodes[s].next_key
        return s

    cdef int32_t _find_wd(self, int wd) noexcept nogil:
        cdef int32_t s = self.by_wd[_mix(<uint64_t>wd) & (self.nbuckets - 1)]
        while s >= 0 and self.nodes[s].wd != wd:
            s = self.nodes[s].next_wd
        return s

    # --- the descriptor cache of handle inodes (lock held) -----------------------------------

    cdef void _lru_remove(self, int32_t s) noexcept nogil:
        cdef Node *n = &self.nodes[s]
        if not n.in_lru:
            return
        if n.lru_prev >= 0:
            self.nodes[n.lru_prev].lru_next = n.lru_next
        else:
            self.lru_head = n.lru_next
        if n.lru_next >= 0:
            self.nodes[n.lru_next].lru_prev = n.lru_prev
        else:
            self.lru_tail = n.lru_prev
        n.lru_prev = n.lru_next = -1
        n.in_lru = 0
        self.lru_len -= 1

    cdef int _lru_append(self, int32_t s) noexcept nogil:
        """Most recently used; then descriptors over capacity leave the cache (LRU first;
        pinned ones close at their last unpin): returns one for the caller to close once
        the lock is released (-1: none), the rare others are closed here."""
        cdef Node *n = &self.nodes[s]
        if n.in_lru:
            self._lru_remove(s)
        n.lru_prev, n.lru_next = self.lru_tail, -1
        if self.lru_tail >= 0:
            self.nodes[self.lru_tail].lru_next = s
        else:
            self.lru_head = s
        self.lru_tail = s
        n.in_lru = 1
        self.lru_len += 1
        cdef int32_t old
        cdef int evicted = -1
        while self.lru_len > self.capacity and self.lru_head >= 0:
            old = self.lru_head
            self._lru_remove(old)
            if self.nodes[old].pins == 0 and self.nodes[old].fd >= 0:
                if evicted >= 0:
                    close(evicted)
                evicted, self.nodes[old].fd = self.nodes[old].fd, -1
        return evicted

    cdef int _settle(self, int32_t s) noexcept nogil:
        """After an unpin or a drop: free dead slots; returns the descriptor nobody uses any
        more (-1: none), for the caller to close after releasing the lock (closing a deleted
        file's last descriptor frees the inode on the host: slow, and no reason to make
        every other request wait)."""
        cdef Node *n = &self.nodes[s]
        cdef int fd = -1
        if n.pins > 0:
            return -1
        if n.dead:
            fd = n.fd
            self._free(s)
        elif n.fd >= 0 and n.handle_len and not n.in_lru:
            fd, n.fd = n.fd, -1
        return fd

    cdef int _drop(self, int32_t s) noexcept nogil:
        """Forget a node (lock held): the descriptor to close after releasing it, or -1."""
        cdef Node *n = &self.nodes[s]
        self._unchain(&self.by_id[_mix(n.nodeid) & (self.nbuckets - 1)], s, 0)
        self._unlink_key(s)
        if n.wd >= 0:
            self._unchain(&self.by_wd[_mix(<uint64_t>n.wd) & (self.nbuckets - 1)], s, 2)
            if self.inotify_fd >= 0:
                inotify_rm_watch(self.inotify_fd, n.wd)
            n.wd = -1
        self._lru_remove(s)
        n.dead = 1
        return self._settle(s)

    # --- operations (C) ----------------------------------------------------------------------

    cdef int32_t _pin(self, uint64_t nodeid, int *fd, int *err) noexcept nogil:
        """The node's slot with its descriptor pinned in `fd` (reopened by handle when not
        cached), or -1 with `err` (ESTALE: unknown nodeid)."""
        cdef uint64_t hbuf[HANDLE_WORDS]
        cdef int mfd, nfd, evicted = -1
        cdef Node *n
        pthread_mutex_lock(&self.lock)
        cdef int32_t s = self._find_id(nodeid)
        if s < 0:
            pthread_mutex_unlock(&self.lock)
            err[0] = ESTALE
            return -1
        n = &self.nodes[s]
        if n.fd >= 0:
            n.pins += 1
            if n.handle_len:
                evicted = self._lru_append(s)
            fd[0] = n.fd
            pthread_mutex_unlock(&self.lock)
            if evicted >= 0:
                close(evicted)
            return s
        memcpy(hbuf, n.handle, sizeof(hbuf))
        mfd = n.mount_fd
        pthread_mutex_unlock(&self.lock)
        nfd = open_by_handle_at(mfd, <file_handle *>hbuf, O_PATH_FLAGS)
        if nfd < 0:
            err[0] = errno
            return -1
        pthread_mutex_lock(&self.lock)
        s = self._find_id(nodeid)
        if s < 0:
            pthread_mutex_unlock(&self.lock)
            close(nfd)
            err[0] = ESTALE
            return -1
        n = &self.nodes[s]
        if n.fd >= 0:
            close(nfd)                  # another thread reopened it meanwhile
        else:
            n.fd = nfd
        n.pins += 1
        evicted = self._lru_append(s)
        fd[0] = self.nodes[s].fd
        pthread_mutex_unlock(&self.lock)
        if evicted >= 0:
            close(evicted)
        return s

    cdef void _unpin(self, int32_t slot) noexcept nogil:
        pthread_mutex_lock(&self.lock)
        self.nodes[slot].pins -= 1
        cdef int fd = self._settle(slot)
        pthread_mutex_unlock(&self.lock)
        if fd >= 0:
            close(fd)

    cdef void _hold(self, int32_t slot) noexcept nogil:
        """One more pin (an open file keeps its inode's descriptor until RELEASE)."""
        pthread_mutex_lock(&self.lock)
        self.nodes[slot].pins += 1
        pthread_mutex_unlock(&self.lock)

    cdef Node _peek(self, int32_t slot) noexcept nogil:
        """A copy of a pinned slot's node (the array may move when another thread grows it,
        so nothing reads it outside the lock)."""
        pthread_mutex_lock(&self.lock)
        cdef Node n = self.nodes[slot]
        pthread_mutex_unlock(&self.lock)
        return n

    cdef bint _known(self, uint64_t dev, uint64_t ino) noexcept nogil:
        pthread_mutex_lock(&self.lock)
        cdef bint r = self._find_key(dev, ino) >= 0
        pthread_mutex_unlock(&self.lock)
        return r

    cdef int _forget(self, uint64_t nodeid, uint64_t count, bint force) noexcept nogil:
        """Take back `count` lookups: 1 when the node is gone, 0 when it stays (or is
        unknown), -1 when it would go but Python holds state for it (and not `force`)."""
        pthread_mutex_lock(&self.lock)
        cdef int32_t s = self._find_id(nodeid)
        if s < 0 or nodeid == ROOT_ID:
            pthread_mutex_unlock(&self.lock)
            return 0
        cdef Node *n = &self.nodes[s]
        if n.nlookup > <int64_t>count:
            n.nlookup -= count
            pthread_mutex_unlock(&self.lock)
            return 0
        if n.pyheld and not force:
            pthread_mutex_unlock(&self.lock)
            return -1
        n.nlookup = 0
        cdef int fd = self._drop(s)
        pthread_mutex_unlock(&self.lock)
        if fd >= 0:
            close(fd)
        return 1

    cdef bint _pyheld(self, uint64_t nodeid, uint64_t count) noexcept nogil:
        """Whether forgetting `count` lookups would drop a node Python holds state for."""
        pthread_mutex_lock(&self.lock)
        cdef int32_t s = self._find_id(nodeid)
        cdef bint r = (s >= 0 and self.nodes[s].pyheld
                       and self.nodes[s].nlookup <= <int64_t>count)
        pthread_mutex_unlock(&self.lock)
        return r

    cdef int32_t _slot_of_pinned(self, uint64_t nodeid) noexcept nogil:
        pthread_mutex_lock(&self.lock)
        cdef int32_t s = self._find_id(nodeid)
        pthread_mutex_unlock(&self.lock)
        return s

    cdef void _set_stamp(self, int32_t slot, const stat *st) noexcept nogil:
        pthread_mutex_lock(&self.lock)
        cdef Node *n = &self.nodes[slot]
        n.stamp = stamp_of(st)
        n.kept = n.stamp                # the client made this change: its cache holds it
        pthread_mutex_unlock(&self.lock)

    cdef void _writers(self, int32_t slot, int delta) noexcept nogil:
        """An open file of the node's was written through (+1), or a written one closed."""
        pthread_mutex_lock(&self.lock)
        self.nodes[slot].writers += delta
        pthread_mutex_unlock(&self.lock)

    cdef bint _keep_cache(self, int32_t slot, const stat *st) noexcept nogil:
        """An open finds the file as `st`: whether the client may keep the pages it caches
        (the file is as they were read or written: same ctime, mtime and size, or the client
        is writing it through an open file now), as NFS's close-to-open does. From now on
        the client's cache holds `st`'s data either way (an open without FOPEN_KEEP_CACHE
        drops the pages)."""
        pthread_mutex_lock(&self.lock)
        cdef Node *n = &self.nodes[slot]
        cdef bint keep = n.writers > 0 or stamp_is(&n.kept, st)
        n.kept = stamp_of(st)
        pthread_mutex_unlock(&self.lock)
        return keep

    cdef void _close_all(self) noexcept nogil:
        cdef int32_t i
        for i in range(self.cap):
            if self.nodes[i].nodeid and self.nodes[i].fd >= 0:
                close(self.nodes[i].fd)
                self.nodes[i].fd = -1
        for i in range(self.nmounts):
            close(self.mounts[i][1])
        self.nmounts = 0

    # --- the Python face (pyhv.share.inodes) -------------------------------------------------

    def add_mount(self, int mount_id, int fd) -> None:
        """A descriptor (not O_PATH) on a mount, for open_by_handle_at; the table owns it."""
        pthread_mutex_lock(&self.lock)
        self.mounts[self.nmounts][0] = mount_id
        self.mounts[self.nmounts][1] = fd
        self.nmounts += 1
        pthread_mutex_unlock(&self.lock)

    def forget(self, uint64_t nodeid, uint64_t count) -> bool:
        """Whether the node is gone now."""
        return self._forget(nodeid, count, 1) == 1

    def pin(self, uint64_t nodeid) -> tuple:
        """(fd, slot): the descriptor, pinned until `unpin(slot)`."""
        cdef int fd = -1, err = 0
        cdef int32_t s
        with nogil:
            s = self._pin(nodeid, &fd, &err)
        if s < 0:
            raise OSError(err, _os.strerror(err) if err != ESTALE else f"unknown nodeid {nodeid}")
        return fd, s

    def unpin(self, int32_t slot) -> None:
        self._unpin(slot)

    def hold(self, int32_t slot) -> None:
        self._hold(slot)

    def info(self, uint64_t nodeid) -> tuple:
        """(dev, ino, S_IFMT mode, has a handle); ESTALE for an unknown nodeid."""
        pthread_mutex_lock(&self.lock)
        cdef int32_t s = self._find_id(nodeid)
        if s < 0:
            pthread_mutex_unlock(&self.lock)
            raise OSError(ESTALE, f"unknown nodeid {nodeid}")
        cdef Node n = self.nodes[s]
        pthread_mutex_unlock(&self.lock)
        return n.dev, n.ino, n.mode, n.handle_len != 0

    def find(self, uint64_t dev, uint64_t ino) -> int:
        """The nodeid of a host inode the client holds, or 0."""
        pthread_mutex_lock(&self.lock)
        cdef int32_t s = self._find_key(dev, ino)
        cdef uint64_t r = self.nodes[s].nodeid if s >= 0 else 0
        pthread_mutex_unlock(&self.lock)
        return r

    def set_stamp(self, uint64_t nodeid, Stat s not None) -> None:
        cdef int32_t slot = self._slot_of_pinned(nodeid)
        if slot >= 0:
            self._set_stamp(slot, &s.st)

    def keep_cache(self, uint64_t nodeid, Stat s not None) -> bool:
        """`_keep_cache` for a node the caller has pinned (False for an unknown one)."""
        cdef int32_t slot = self._slot_of_pinned(nodeid)
        return slot >= 0 and self._keep_cache(slot, &s.st)

    def stamp(self, uint64_t nodeid):
        """(ctime, mtime, size) after the server's own last change, or None."""
        pthread_mutex_lock(&self.lock)
        cdef int32_t s = self._find_id(nodeid)
        cdef Node n
        if s >= 0:
            n = self.nodes[s]
        pthread_mutex_unlock(&self.lock)
        if s < 0 or not n.stamp.set:
            return None
        return (n.stamp.ctime, n.stamp.mtime, n.stamp.size)

    def set_pyheld(self, uint64_t nodeid, bint held) -> None:
        pthread_mutex_lock(&self.lock)
        cdef int32_t s = self._find_id(nodeid)
        if s >= 0:
            self.nodes[s].pyheld = held
        pthread_mutex_unlock(&self.lock)

    def __len__(self) -> int:
        pthread_mutex_lock(&self.lock)
        cdef int32_t i, n = 0
        for i in range(self.cap):
            if self.nodes[i].nodeid and not self.nodes[i].dead:
                n += 1
        pthread_mutex_unlock(&self.lock)
        return n

    def cached_fds(self) -> int:
        """How many inode descriptors are open now (root and fd-mode inodes included)."""
        pthread_mutex_lock(&self.lock)
        cdef int32_t i, n = 0
        for i in range(self.cap):
            if self.nodes[i].nodeid and not self.nodes[i].dead and self.nodes[i].fd >= 0:
                n += 1
        pthread_mutex_unlock(&self.lock)
        return n

    def close(self) -> None:
        pthread_mutex_lock(&self.lock)
        self._close_all()
        pthread_mutex_unlock(&self.lock)

    def slot_info(self, int32_t slot) -> tuple:
        """(nodeid, dev, ino, S_IFMT mode) of a pinned slot (an open file's inode)."""
        if slot < 0 or slot >= self.cap:
            raise OSError(ESTALE, f"no inode slot {slot}")
        pthread_mutex_lock(&self.lock)
        cdef Node n = self.nodes[slot]
        pthread_mutex_unlock(&self.lock)
        return n.nodeid, n.dev, n.ino, n.mode
