# cython: language_level=3
"""Lookups into the inode table (`hvcore.fs.inodes`): one name below a directory, and adopting
the O_PATH descriptor of a looked-up or new inode (with its file handle when the table uses
handles, and an inotify watch for a new directory while the host watch is on).

Lookups are one component through openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
RESOLVE_NO_MAGICLINKS) (`fs.ops._open_beneath`); the table lock is never held across a system
call that may block."""

from libc.errno cimport errno, ENOENT, ENOMEM
from libc.stdint cimport uint32_t, uint64_t, int32_t
from libc.stdio cimport snprintf
from libc.string cimport memcmp, memcpy
from posix.fcntl cimport O_RDONLY, O_DIRECTORY, O_CLOEXEC
from posix.unistd cimport close

from hvcore.fs.inodes cimport NodeTable, Node
from hvcore.fs.ops cimport Stat, _open_beneath
from hvcore.includes.fcntl cimport (AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW, O_NOFOLLOW, O_PATH,
                                    openat)
from hvcore.includes.fhandle cimport file_handle, name_to_handle_at
from hvcore.includes.inotify cimport inotify_add_watch
from hvcore.includes.stat cimport stat, fstatat
from hvcore.includes.sys cimport pthread_mutex_lock, pthread_mutex_unlock

import os as _os

DEF HANDLE_MAX = 128
DEF HANDLE_WORDS = 17
DEF S_IFMT = 0o170000
DEF S_IFDIR = 0o040000
cdef int O_PATH_FLAGS = O_PATH | O_NOFOLLOW | O_CLOEXEC


cdef int mount_fd(NodeTable t, int mount_id, int fd, bint is_dir) noexcept nogil:
    """A descriptor on the mount `mount_id` (-1: none yet and `fd` is no directory)."""
    cdef int i, mfd
    pthread_mutex_lock(&t.lock)
    for i in range(t.nmounts):
        if t.mounts[i][0] == mount_id:
            mfd = t.mounts[i][1]
            pthread_mutex_unlock(&t.lock)
            return mfd
    pthread_mutex_unlock(&t.lock)
    if not is_dir:
        return -1
    mfd = openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    if mfd < 0:
        return -1
    pthread_mutex_lock(&t.lock)
    for i in range(t.nmounts):
        if t.mounts[i][0] == mount_id:      # another thread was first
            close(mfd)
            mfd = t.mounts[i][1]
            break
    else:
        if t.nmounts == 64:
            close(mfd)
            mfd = -1
        else:
            t.mounts[t.nmounts][0] = mount_id
            t.mounts[t.nmounts][1] = mfd
            t.nmounts += 1
    pthread_mutex_unlock(&t.lock)
    return mfd


cdef uint64_t adopt(NodeTable t, int fd, const stat *st, int *err, bint *new,
                   int32_t *slot) noexcept nogil:
    """Take ownership of an O_PATH descriptor of a looked-up or new inode and count one
    lookup: its nodeid (0 with `err` on ENOMEM). `slot` is left pinned when not NULL."""
    cdef uint64_t hbuf[HANDLE_WORDS]
    cdef file_handle *h = <file_handle *>hbuf
    cdef int mount_id = 0, mfd = -1
    cdef uint32_t hlen = 0
    cdef bint is_dir = (st.st_mode & S_IFMT) == S_IFDIR
    cdef char path[40]
    cdef int evicted = -1
    new[0] = 0
    if t.use_handles:
        h.handle_bytes = HANDLE_MAX
        if (name_to_handle_at(fd, "", h, &mount_id, AT_EMPTY_PATH) == 0
                and h.handle_bytes <= HANDLE_MAX):
            mfd = mount_fd(t, mount_id, fd, is_dir)
            if mfd >= 0:
                hlen = 8 + h.handle_bytes
    pthread_mutex_lock(&t.lock)
    cdef int32_t s = t._find_key(st.st_dev, st.st_ino)
    if (s >= 0 and t.nodes[s].handle_len and hlen
            and (t.nodes[s].handle_len != hlen
                 or memcmp(t.nodes[s].handle, hbuf, hlen) != 0)):
        t._unlink_key(s)            # the inode number was reused: a new inode
        s = -1
    cdef Node *n
    if s < 0:
        s = t._alloc()
        if s < 0:
            pthread_mutex_unlock(&t.lock)
            close(fd)
            err[0] = ENOMEM
            return 0
        n = &t.nodes[s]
        n.nodeid = t.next_nodeid
        t.next_nodeid += 1
        n.dev, n.ino, n.fd = st.st_dev, st.st_ino, fd
        n.mode = st.st_mode & S_IFMT
        n.handle_len, n.mount_fd = hlen, mfd
        memcpy(n.handle, hbuf, hlen)
        t._link(s)
        fd = -1
        new[0] = 1
        if is_dir and t.inotify_fd >= 0:
            snprintf(path, sizeof(path), "/proc/self/fd/%d", n.fd)
            n.wd = inotify_add_watch(t.inotify_fd, path, t.inotify_mask)
            if n.wd >= 0:
                t._link_wd(s)
        if hlen:
            evicted = t._lru_append(s)
    else:
        n = &t.nodes[s]
        if n.handle_len and n.fd < 0:
            n.fd, fd = fd, -1           # cache the descriptor we have
            evicted = t._lru_append(s)
    n = &t.nodes[s]
    n.nlookup += 1
    if slot != NULL:
        n.pins += 1
        slot[0] = s
    cdef uint64_t nodeid = n.nodeid
    pthread_mutex_unlock(&t.lock)
    if fd >= 0:
        close(fd)
    if evicted >= 0:
        close(evicted)
    return nodeid


cdef int lookup(NodeTable t, uint64_t parent, const char *name, stat *st, uint64_t *nodeid,
                int32_t *slot) noexcept nogil:
    """One component below `parent`, never outside it, counted as one lookup: 0 or an
    errno. `slot` (when not NULL) is left pinned."""
    cdef int pfd = -1, err = 0
    cdef int32_t ps = t._pin(parent, &pfd, &err)
    if ps < 0:
        return err
    err = lookup_fd(t, pfd, name, st, nodeid, slot)
    t._unpin(ps)
    return err


cdef int lookup_fd(NodeTable t, int pfd, const char *name, stat *st, uint64_t *nodeid,
                   int32_t *slot) noexcept nogil:
    """`lookup` below a directory descriptor the caller holds (an open directory).

    A name whose inode the table holds with an open descriptor (the client revalidating
    what it knows) takes one fstatat: `name` is one plain component (no '/', '.', '..')
    and is not followed, so it cannot leave `pfd`, and an inode we hold open cannot have
    had its number reused, so (st_dev, st_ino) names it; one held by handle only is the
    same inode when name_to_handle_at(name) gives the same handle. Anything else is a
    full lookup."""
    cdef int err = 0, mount_id = 0
    cdef bint new, handled = 0
    cdef int32_t s
    cdef uint64_t hbuf[HANDLE_WORDS]
    cdef file_handle *h = <file_handle *>hbuf
    if fstatat(pfd, name, st, AT_SYMLINK_NOFOLLOW) < 0:
        if errno == ENOENT:
            return ENOENT           # what openat2 would say (other errors: it says)
    else:
        pthread_mutex_lock(&t.lock)
        s = t._find_key(st.st_dev, st.st_ino)
        if s >= 0 and t.nodes[s].fd < 0 and t.nodes[s].handle_len:
            # held by handle, descriptor evicted: the same inode iff the same handle
            pthread_mutex_unlock(&t.lock)
            h.handle_bytes = HANDLE_MAX
            handled = (name_to_handle_at(pfd, name, h, &mount_id, 0) == 0
                       and h.handle_bytes <= HANDLE_MAX)
            pthread_mutex_lock(&t.lock)
            s = t._find_key(st.st_dev, st.st_ino)
            handled = (handled and s >= 0 and t.nodes[s].handle_len == 8 + h.handle_bytes
                       and memcmp(t.nodes[s].handle, hbuf, 8 + h.handle_bytes) == 0)
        if s >= 0 and (t.nodes[s].fd >= 0 or handled):
            t.nodes[s].nlookup += 1
            nodeid[0] = t.nodes[s].nodeid
            if slot != NULL:
                t.nodes[s].pins += 1
                slot[0] = s
            pthread_mutex_unlock(&t.lock)
            return 0
        pthread_mutex_unlock(&t.lock)
    cdef long fd = _open_beneath(pfd, name, O_PATH_FLAGS, 0, &err)
    if fd < 0:
        return err
    if fstatat(<int>fd, "", st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0:
        err = errno
        close(<int>fd)
        return err
    nodeid[0] = adopt(t, <int>fd, st, &err, &new, slot)
    return err


# --- the Python face (pyhv.share.inodes) ---------------------------------------------------


def lookup_name(NodeTable t not None, uint64_t parent, bytes name not None) -> tuple:
    """(nodeid, Stat) of `name` in `parent`, counted as one lookup."""
    cdef Stat s = Stat.__new__(Stat)
    cdef const char *p = name
    cdef uint64_t nodeid = 0
    cdef int err
    with nogil:
        err = lookup(t, parent, p, &s.st, &nodeid, NULL)
    if err:
        raise OSError(err, _os.strerror(err))
    return nodeid, s


def adopt_fd(NodeTable t not None, int fd, Stat s not None) -> int:
    """Own an O_PATH descriptor of a new (or looked-up) inode, +1 lookup: its nodeid."""
    cdef int err = 0
    cdef bint new
    cdef uint64_t nodeid
    with nogil:
        nodeid = adopt(t, fd, &s.st, &err, &new, NULL)
    if err:
        raise OSError(err, _os.strerror(err))
    return nodeid
