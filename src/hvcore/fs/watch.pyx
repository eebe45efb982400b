# cython: language_level=3
"""The host watch's per-event work in C: inotify events read and matched without the GIL.

Every create, unlink or rename the server makes in a watched directory comes back as an
inotify event, and every file it writes as IN_MODIFY and IN_CLOSE_WRITE (a file written
through by the server while open is the server's; the events of a burst of writes merge in
the queue while this thread waits); in Python each of those cost a
wakeup of the interpreter (about 45 us, on the same CPUs the requests need). Here one thread
reads the events in C, drops the server's own (names recorded in `OwnChanges` before the
change was made; inodes whose (ctime, mtime, size) equal the stamp the server's last change
left), and returns to Python (`pyhv.share.watch`) only with host-made changes, which Python
sends as INVAL_ENTRY / INVAL_INODE through the transport.
"""

from libc.errno cimport errno, EINTR, EAGAIN
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int32_t, int64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport calloc, malloc, free
from libc.string cimport memchr, memcmp, memcpy
from posix.unistd cimport read, usleep

from cpython.bytes cimport PyBytes_FromStringAndSize
from hvcore.fs.inodes cimport NodeTable, Node, stamp_is
from hvcore.includes.fcntl cimport AT_SYMLINK_NOFOLLOW
from hvcore.includes.inotify cimport inotify_event, inotify_add_watch
from hvcore.includes.stat cimport stat, fstatat
from hvcore.includes.sys cimport (pthread_mutex_init, pthread_mutex_destroy,
                                  pthread_mutex_lock, pthread_mutex_unlock, pollfd, poll,
                                  POLLIN)

DEF NAME_MAX = 255
DEF EXPECT_SLOTS = 1024
DEF EVENTS_BUF = 65536
DEF MAX_CHANGES = EVENTS_BUF // 16     # an event is at least 16 bytes
DEF IN_MODIFY = 0x2
DEF IN_ATTRIB = 0x4
DEF IN_CLOSE_WRITE = 0x8
DEF IN_MOVED_FROM = 0x40
DEF IN_MOVED_TO = 0x80
DEF IN_CREATE = 0x100
DEF IN_DELETE = 0x200
DEF NAME_EVENTS = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
DEF DATA_EVENTS = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE
DEF KIND_ENTRY = 0
DEF KIND_INODE = 1


cdef class OwnChanges:
    """Names the server is about to create, remove or rename: (parent nodeid, name), each
    matched by one inotify name event. A bounded ring: when the events never come (coalesced,
    lost) the oldest expectations are dropped."""

    def __cinit__(self):
        self.ring = <Expect *>calloc(EXPECT_SLOTS, sizeof(Expect))
        if self.ring == NULL:
            raise MemoryError()
        pthread_mutex_init(&self.lock, NULL)

    def __dealloc__(self):
        free(self.ring)
        pthread_mutex_destroy(&self.lock)

    cdef void _add(self, uint64_t parent, const char *name, size_t length) noexcept nogil:
        if length > NAME_MAX:
            return
        pthread_mutex_lock(&self.lock)
        cdef Expect *e = &self.ring[self.head]
        e.parent, e.len = parent, <uint32_t>length
        memcpy(e.name, name, length)
        self.head = (self.head + 1) % EXPECT_SLOTS
        if self.count < EXPECT_SLOTS:
            self.count += 1
        pthread_mutex_unlock(&self.lock)

    cdef bint _take(self, uint64_t parent, const char *name, size_t length) noexcept nogil:
        """Whether (parent, name) was expected (and now no longer is). Events come in the
        order the changes were made, so the match is nearly always the oldest entry."""
        cdef int i, k
        cdef Expect *e
        cdef bint found = 0
        pthread_mutex_lock(&self.lock)
        for i in range(self.count):
            k = (self.head + EXPECT_SLOTS - self.count + i) % EXPECT_SLOTS
            e = &self.ring[k]
            if e.parent == parent and e.len == length and memcmp(e.name, name, length) == 0:
                e.parent = 0
                found = 1
                break
        while self.count and self.ring[(self.head + EXPECT_SLOTS - self.count)
                                       % EXPECT_SLOTS].parent == 0:
            self.count -= 1                 # the oldest are taken: the span shrinks
        pthread_mutex_unlock(&self.lock)
        return found

    def add(self, uint64_t parent, bytes name not None) -> None:
        """The host watch will see an event for this name: it is the server's own."""
        self._add(parent, name, len(name))

    def take(self, uint64_t parent, bytes name not None) -> bool:
        return self._take(parent, name, len(name))


cdef struct Change:
    int kind                # KIND_ENTRY (parent, name) or KIND_INODE (nodeid)
    uint64_t id
    const char *name        # into the event buffer
    uint32_t len


cdef uint64_t _node_of_wd(NodeTable t, int wd) noexcept nogil:
    pthread_mutex_lock(&t.lock)
    cdef int32_t s = t._find_wd(wd)
    cdef uint64_t r = t.nodes[s].nodeid if s >= 0 else 0
    pthread_mutex_unlock(&t.lock)
    return r


cdef uint64_t _changed_inode(NodeTable t, uint64_t parent, const char *name,
                             bint written) noexcept nogil:
    """The nodeid of `name` in `parent` when the client holds it and it is not as the
    server's own last change left it (0: not held, gone, or unchanged since). `written`
    (IN_MODIFY alone): a write, which is ours while the server has the file open written
    through (stamped at its FLUSH), a host program's otherwise."""
    cdef int pfd = -1, err = 0, rc
    cdef stat st
    cdef int32_t ps = t._pin(parent, &pfd, &err)
    if ps < 0:
        return 0
    rc = fstatat(pfd, name, &st, AT_SYMLINK_NOFOLLOW)
    t._unpin(ps)
    if rc < 0:
        return 0
    cdef uint64_t r = 0
    pthread_mutex_lock(&t.lock)
    cdef int32_t s = t._find_key(st.st_dev, st.st_ino)
    cdef Node *n
    if s >= 0 and not (written and t.nodes[s].writers > 0):
        n = &t.nodes[s]
        if not stamp_is(&n.stamp, &st):
            r = n.nodeid
    pthread_mutex_unlock(&t.lock)
    return r


cdef class Watcher:
    """Reads one inotify descriptor (whose watches the inode table keeps) until host-made
    changes come (`wait`) or the stop descriptor becomes readable."""
    cdef NodeTable nodes
    cdef OwnChanges own
    cdef int ifd, stopfd
    cdef uint8_t *buf
    cdef Change *changes
    # After a read that held only the server's own changes, wait this long before the next:
    # a burst of them (a create or unlink loop) is then one wakeup per batch, not per event
    # (a wakeup costs more here than the request it follows). Host-made changes reach the
    # client at most this much later, well inside the 1 s the cache mode allows them.
    cdef public int coalesce_us

    def __cinit__(self, NodeTable nodes not None, OwnChanges own not None, int ifd,
                  int stopfd):
        self.nodes, self.own, self.ifd, self.stopfd = nodes, own, ifd, stopfd
        self.coalesce_us = 10000
        self.buf = <uint8_t *>malloc(EVENTS_BUF)
        self.changes = <Change *>malloc(MAX_CHANGES * sizeof(Change))
        if self.buf == NULL or self.changes == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.buf)
        free(self.changes)

    cdef int _read(self, int *nch, bint *more) noexcept nogil:
        """One read of events into `changes`: 0, 1 when stopped, or an errno; `more` when
        the read filled most of the buffer (more events are waiting)."""
        cdef pollfd fds[2]
        cdef ssize_t n, pos = 0
        cdef const inotify_event *ev
        cdef const char *name
        cdef const char *end
        cdef size_t length
        cdef uint64_t parent, nodeid
        cdef Change *c
        fds[0].fd, fds[0].events, fds[0].revents = self.ifd, POLLIN, 0
        fds[1].fd, fds[1].events, fds[1].revents = self.stopfd, POLLIN, 0
        if poll(fds, 2, -1) < 0:
            return 0 if errno == EINTR else errno
        if fds[1].revents:
            return 1
        n = read(self.ifd, self.buf, EVENTS_BUF)
        if n < 0:
            return 0 if errno == EINTR or errno == EAGAIN else errno
        more[0] = n > EVENTS_BUF // 2
        while pos + <ssize_t>sizeof(inotify_event) <= n and nch[0] + 2 <= MAX_CHANGES:
            ev = <const inotify_event *>(self.buf + pos)
            pos += sizeof(inotify_event) + ev.len
            if ev.len == 0 or pos > n:
                continue                # an event on the directory itself, or overflow
            name = <const char *>ev.name
            end = <const char *>memchr(name, 0, ev.len)
            length = <size_t>(end - name) if end != NULL else ev.len
            if length == 0:
                continue
            parent = _node_of_wd(self.nodes, ev.wd)
            if parent == 0:
                continue
            if ev.mask & NAME_EVENTS and not self.own._take(parent, name, length):
                c = &self.changes[nch[0]]
                c.kind, c.id, c.name, c.len = KIND_ENTRY, parent, name, <uint32_t>length
                nch[0] += 1
            if ev.mask & DATA_EVENTS and end != NULL:
                nodeid = _changed_inode(self.nodes, parent, name,
                                        (ev.mask & DATA_EVENTS) == IN_MODIFY)
                if nodeid:
                    c = &self.changes[nch[0]]
                    c.kind, c.id, c.name, c.len = KIND_INODE, nodeid, NULL, 0
                    nch[0] += 1
        return 0

    def wait(self):
        """Block (without the GIL) until host-made changes come: ([(parent, name)],
        [nodeid]) for INVAL_ENTRY and INVAL_INODE, each once and in order; None once
        stopped. OSError when the inotify descriptor fails."""
        cdef int nch = 0, rc = 0, i
        cdef bint more = 0
        cdef Change *c
        with nogil:
            while True:
                more = 0
                rc = self._read(&nch, &more)
                if nch or rc:
                    break
                if not more:
                    usleep(self.coalesce_us)    # only the server's own changes so far
        if rc == 1:
            return None
        if rc:
            raise OSError(rc, "read inotify events")
        entries, inodes = {}, {}
        for i in range(nch):
            c = &self.changes[i]
            if c.kind == KIND_ENTRY:
                entries[(c.id, PyBytes_FromStringAndSize(c.name, c.len))] = None
            else:
                inodes[c.id] = None
        return list(entries), list(inodes)


def add_watch(NodeTable t not None, uint64_t nodeid) -> int:
    """Watch a directory node with the table's `inotify_fd` (new directories get one when
    adopted): the watch descriptor, or -1."""
    cdef int fd = -1, err = 0, wd
    cdef char path[40]
    cdef int32_t s = t._pin(nodeid, &fd, &err)
    if s < 0:
        return -1
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd)
    wd = inotify_add_watch(t.inotify_fd, path, t.inotify_mask)
    pthread_mutex_lock(&t.lock)
    if wd >= 0 and t.nodes[s].wd < 0 and not t.nodes[s].dead:
        t.nodes[s].wd = wd
        t._link_wd(s)
    pthread_mutex_unlock(&t.lock)
    t._unpin(s)
    return wd

