# cython: language_level=3
"""The request fast path: the requests a file tree walk, a stat storm or a create loop
consist of (LOOKUP, GETATTR, FORGET, BATCH_FORGET, OPEN, CREATE, FLUSH, RELEASE, UNLINK,
and READ / WRITE through `fs.files`) answered in C from the inode table (`fs.inodes`) and the
open files, without the GIL and without entering Python.

Python decides, this module does the per-request work: `pyhv.share.server` configures it
at INIT (cache timeouts, id maps, open flags, read-only, host watch) and it applies exactly
the Python handlers' semantics; anything they would treat specially (a name that is '.' or
'..' or malformed, O_TRUNC with KILL_SUIDGID, an unmapped id, POSIX locks held on the inode,
a read-only share's changes, a full table) returns 0 and goes to the Python handler instead.
Names the server itself creates or removes are recorded for the host watch (`own`, an
`hvcore.fs.watch.OwnChanges`), so its inotify events are not echoed back as invalidations.
"""

from libc.errno cimport errno, EINTR, EAGAIN, ENOENT, ENOSYS, EISDIR, ELOOP
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int32_t, int64_t
from libc.stdio cimport snprintf
from libc.string cimport memchr, memset
from posix.fcntl cimport O_CREAT, O_EXCL, O_NOCTTY, O_DIRECT, O_CLOEXEC, O_TRUNC
from posix.fcntl cimport O_ACCMODE, O_RDONLY, O_WRONLY, O_RDWR, O_APPEND, AT_FDCWD
from posix.fcntl cimport open as c_open
from posix.stat cimport fchmodat
from posix.unistd cimport read, write, close

from hvcore.fs.attr cimport (fill_attr_st, fill_entry_st, split_time, reply_header, Times,
                            IdAxis, to_guest, to_host)
from hvcore.fs.dirs cimport opendir, readdir
from hvcore.fs.files cimport FileTable
from hvcore.fs.lookup cimport adopt, lookup
from hvcore.fs.inodes cimport NodeTable
from hvcore.fs.ops cimport _open_beneath
from hvcore.fs.watch cimport OwnChanges
from hvcore.includes.fcntl cimport (AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW, O_NOFOLLOW, O_PATH,
                                    fchownat, unlinkat)
from hvcore.includes.fuse cimport (fuse_in_header, fuse_out_header, fuse_entry_out,
                                   fuse_attr_out, fuse_open_out, fuse_open_in,
                                   fuse_create_in, fuse_release_in, fuse_flush_in,
                                   fuse_forget_in, fuse_forget_one, fuse_getattr_in,
                                   FUSE_LOOKUP, FUSE_FORGET, FUSE_BATCH_FORGET, FUSE_GETATTR,
                                   FUSE_OPEN, FUSE_CREATE, FUSE_FLUSH, FUSE_RELEASE,
                                   FUSE_UNLINK, FUSE_READ, FUSE_WRITE, FUSE_OPEN_KILL_SUIDGID,
                                   FOPEN_KEEP_CACHE,
                                   FUSE_OPENDIR, FUSE_READDIR, FUSE_READDIRPLUS,
                                   FUSE_RELEASEDIR, fuse_read_in, FUSE_READLINK, FUSE_STATFS,
                                   FUSE_GETXATTR, FUSE_LISTXATTR, FUSE_ACCESS)
from hvcore.includes.stat cimport stat, fstatat
from hvcore.includes.sys cimport (pthread_mutex_t, pthread_mutex_init, pthread_mutex_destroy,
                                  pthread_mutex_lock, pthread_mutex_unlock)

DEF NAME_MAX = 255
DEF S_IFMT = 0o170000
DEF S_IFDIR = 0o040000
DEF S_IFLNK = 0o120000
DEF S_IFREG = 0o100000
DEF S_ISGID = 0o2000
DEF OVERFLOW = 65534
cdef uint32_t UNCHANGED = 0xFFFFFFFF
DEF MAX_RANGES = 8           # IdAxis keeps this many
DEF NO_REPLY = -1
# flags a client may pass that make no sense on a reopen (as pyhv.share.data.DROP_FLAGS)
cdef int DROP_FLAGS = O_CREAT | O_EXCL | O_NOCTTY | O_NOFOLLOW | O_DIRECT


cdef inline const char *_name(const uint8_t *req, Py_ssize_t off, Py_ssize_t n) noexcept nogil:
    """The one path component at `off`, or NULL when it is anything but a plain name
    (unterminated, empty, too long, with '/', '.' or '..': the decoder's business)."""
    if off >= n:
        return NULL
    cdef const uint8_t *p = req + off
    cdef const uint8_t *end = <const uint8_t *>memchr(p, 0, n - off)
    if end == NULL:
        return NULL
    cdef Py_ssize_t length = end - p
    if length == 0 or length > NAME_MAX or memchr(p, 47, length) != NULL:
        return NULL
    if p[0] == 46 and (length == 1 or (length == 2 and p[1] == 46)):    # '.', '..'
        return NULL
    return <const char *>p


cdef class FastPath:
    """Answers the hot requests in C (`serve`, and `_serve` for the transports that call it
    from C: hvcore.fs.devfuse, .ring, .virtiofs); 0 means "for Python". Its fields are
    declared in fastpath.pxd."""

    def __cinit__(self, NodeTable nodes not None, FileTable files not None):
        self.nodes = nodes
        self.files = files
        files.nodes = nodes
        pthread_mutex_init(&self.lead, NULL)

    def __dealloc__(self):
        pthread_mutex_destroy(&self.lead)

    def configure(self, double entry_timeout, double attr_timeout, uint32_t open_flags,
                  uint32_t dir_open_flags, uint32_t max_write, bint readonly, bint watching,
                  bint writeback, bint chown_created, bint close_to_open=False) -> None:
        split_time(entry_timeout, &self.times.entry_sec, &self.times.entry_nsec)
        split_time(attr_timeout, &self.times.attr_sec, &self.times.attr_nsec)
        self.open_flags = open_flags
        self.dir_open_flags = dir_open_flags
        self.max_write = max_write
        self.readonly, self.watching, self.writeback = readonly, watching, writeback
        self.chown_created = chown_created
        self.close_to_open = close_to_open

    def set_ids(self, int axis, int kind, uint32_t own, list ranges) -> bool:
        """One id axis (0 uid, 1 gid): kind 0 identity, 1 caller, 2 [(guest, host, count)].
        False (and the fast path stays off) when there are more ranges than it keeps."""
        cdef IdAxis *a = &self.uid if axis == 0 else &self.gid
        if len(ranges) > MAX_RANGES:
            return False
        a.kind, a.own, a.n = kind, own, len(ranges)
        for i, (g, h, c) in enumerate(ranges):
            a.guest[i], a.host[i], a.count[i] = g, h, c
        return True

    cdef void _expect_name(self, uint64_t parent, const char *name) noexcept nogil:
        """The host watch will see an event for this name: it is ours."""
        if self.watching and self.own is not None:
            self.own._add(parent, name,
                          <size_t>(<const char *>memchr(name, 0, NAME_MAX + 1) - name))

    # --- replies ----------------------------------------------------------------------------

    cdef Py_ssize_t _entry(self, uint8_t *out, const fuse_in_header *h, uint64_t nodeid,
                           const stat *st, Py_ssize_t extra) noexcept nogil:
        """fuse_entry_out for `nodeid`, then `extra` zeroed bytes (CREATE's open_out)."""
        cdef Py_ssize_t ohdr = sizeof(fuse_out_header)
        memset(out + ohdr, 0, sizeof(fuse_entry_out) + extra)
        fill_entry_st(<fuse_entry_out *>(out + ohdr), nodeid, st, &self.times, &self.uid,
                      &self.gid, h.uid, h.gid)
        return reply_header(out, h.unique, 0, ohdr + sizeof(fuse_entry_out) + extra)

    cdef Py_ssize_t _open_out(self, uint8_t *out, const fuse_in_header *h, uint64_t fh,
                              Py_ssize_t at, uint32_t extra=0) noexcept nogil:
        cdef fuse_open_out *o = <fuse_open_out *>(out + at)
        memset(o, 0, sizeof(fuse_open_out))
        o.fh = fh
        o.open_flags = self.open_flags | extra
        return reply_header(out, h.unique, 0, at + sizeof(fuse_open_out))

    cdef int _flags(self, uint32_t flags) noexcept nogil:
        """The client's open flags as the host open takes them (pyhv.share.data)."""
        cdef int f = (<int>flags & ~DROP_FLAGS) | O_CLOEXEC
        if self.writeback:
            if f & O_ACCMODE == O_WRONLY:
                f = (f & ~O_ACCMODE) | O_RDWR
            f &= ~O_APPEND
        return f

    # --- the operations -------------------------------------------------------------------

    cdef Py_ssize_t _serve(self, const uint8_t *req, Py_ssize_t n, uint8_t *out,
                           Py_ssize_t cap) noexcept nogil:
        """Answer one request into `out`: the reply length, NO_REPLY (-1) for a FORGET, or 0
        when the request is for the Python handler."""
        cdef const fuse_in_header *h = <const fuse_in_header *>req
        cdef Py_ssize_t hdr = sizeof(fuse_in_header), ohdr = sizeof(fuse_out_header)
        cdef uint32_t op
        if not self.enabled or n < hdr or h.len != n or cap < 512:
            return 0
        op = h.opcode
        if op == FUSE_READ or op == FUSE_WRITE:
            return self.files._serve(req, n, out, cap)
        if op == FUSE_LOOKUP:
            return self._lookup(h, req, n, out)
        if op == FUSE_GETATTR:
            return self._getattr(h, n, out)
        if op == FUSE_FORGET or op == FUSE_BATCH_FORGET:
            return self._forget(h, req, n)
        if op == FUSE_OPEN:
            return self._open(h, req, n, out)
        if op == FUSE_CREATE:
            return self._create(h, req, n, out)
        if op == FUSE_FLUSH:
            return self._flush(h, req, n, out)
        if op == FUSE_RELEASE:
            return self._release(h, req, n, out)
        if op == FUSE_UNLINK:
            return self._unlink(h, req, n, out)
        if op == FUSE_OPENDIR:
            return opendir(self.nodes, self.files, h, req, n, out, self.dir_open_flags)
        if op == FUSE_READDIR or op == FUSE_READDIRPLUS:
            if n < hdr + <Py_ssize_t>sizeof(fuse_read_in):
                return 0
            return readdir(self.nodes, self.files, h, <const fuse_read_in *>(req + hdr), out,
                           min(cap, ohdr + self.max_write), op == FUSE_READDIRPLUS,
                           &self.times, &self.uid, &self.gid)
        if op == FUSE_RELEASEDIR:
            return self._release(h, req, n, out)
        return 0

    cdef Py_ssize_t _lookup(self, const fuse_in_header *h, const uint8_t *req, Py_ssize_t n,
                            uint8_t *out) noexcept nogil:
        cdef const char *name = _name(req, sizeof(fuse_in_header), n)
        cdef stat st
        cdef uint64_t nodeid = 0
        if name == NULL:
            return 0
        cdef int err = lookup(self.nodes, h.nodeid, name, &st, &nodeid, NULL)
        if err:
            return reply_header(out, h.unique, err, sizeof(fuse_out_header))
        return self._entry(out, h, nodeid, &st, 0)

    cdef Py_ssize_t _getattr(self, const fuse_in_header *h, Py_ssize_t n,
                             uint8_t *out) noexcept nogil:
        cdef Py_ssize_t ohdr = sizeof(fuse_out_header)
        cdef stat st
        cdef int fd = -1, err = 0
        if n < <Py_ssize_t>(sizeof(fuse_in_header) + sizeof(fuse_getattr_in)):
            return 0
        cdef int32_t s = self.nodes._pin(h.nodeid, &fd, &err)
        if s < 0:
            return reply_header(out, h.unique, err, ohdr)
        if fstatat(fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0:
            err = errno
        self.nodes._unpin(s)
        if err:
            return reply_header(out, h.unique, err, ohdr)
        memset(out + ohdr, 0, sizeof(fuse_attr_out))
        cdef fuse_attr_out *a = <fuse_attr_out *>(out + ohdr)
        a.attr_valid, a.attr_valid_nsec = self.times.attr_sec, self.times.attr_nsec
        fill_attr_st(&a.attr, &st, to_guest(&self.uid, st.st_uid, h.uid),
                     to_guest(&self.gid, st.st_gid, h.gid))
        return reply_header(out, h.unique, 0, ohdr + sizeof(fuse_attr_out))

    cdef Py_ssize_t _forget(self, const fuse_in_header *h, const uint8_t *req,
                            Py_ssize_t n) noexcept nogil:
        cdef Py_ssize_t hdr = sizeof(fuse_in_header)
        cdef const fuse_forget_one *one
        cdef uint32_t count, i
        if h.opcode == FUSE_FORGET:
            if n < hdr + <Py_ssize_t>sizeof(fuse_forget_in):
                return 0
            if self.nodes._forget(h.nodeid, (<const fuse_forget_in *>(req + hdr)).nlookup,
                                  0) < 0:
                return 0
            return NO_REPLY
        if n < hdr + 8:
            return 0
        count = (<const uint32_t *>(req + hdr))[0]
        if <uint64_t>count * sizeof(fuse_forget_one) > <uint64_t>(n - hdr - 8):
            return 0
        one = <const fuse_forget_one *>(req + hdr + 8)
        for i in range(count):
            if self.nodes._pyheld(one[i].nodeid, one[i].nlookup):
                return 0
        for i in range(count):
            self.nodes._forget(one[i].nodeid, one[i].nlookup, 1)
        return NO_REPLY

    cdef Py_ssize_t _open(self, const fuse_in_header *h, const uint8_t *req, Py_ssize_t n,
                          uint8_t *out) noexcept nogil:
        cdef Py_ssize_t hdr = sizeof(fuse_in_header), ohdr = sizeof(fuse_out_header)
        cdef const fuse_open_in *o = <const fuse_open_in *>(req + hdr)
        cdef int fd = -1, err = 0, ffd, flags
        cdef char path[40]
        cdef stat st
        if n < hdr + <Py_ssize_t>sizeof(fuse_open_in):
            return 0
        flags = self._flags(o.flags)
        if o.open_flags & FUSE_OPEN_KILL_SUIDGID and o.flags & O_TRUNC:
            return 0
        if self.readonly and ((<int>o.flags & O_ACCMODE) != O_RDONLY or o.flags & O_TRUNC):
            return 0
        cdef int32_t s = self.nodes._pin(h.nodeid, &fd, &err)
        if s < 0:
            return reply_header(out, h.unique, err, ohdr)
        cdef uint32_t kind = self.nodes._peek(s).mode
        if kind == S_IFDIR or kind == S_IFLNK:
            self.nodes._unpin(s)
            return reply_header(out, h.unique, EISDIR if kind == S_IFDIR else ELOOP, ohdr)
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd)
        ffd = c_open(path, flags, 0o777)
        if ffd < 0:
            err = errno
            self.nodes._unpin(s)
            return reply_header(out, h.unique, err, ohdr)
        cdef uint32_t keep = 0
        if o.flags & O_TRUNC:
            if self.watching and fstatat(ffd, "", &st, AT_EMPTY_PATH) == 0:
                self.nodes._set_stamp(s, &st)
        elif self.close_to_open and fstatat(ffd, "", &st, AT_EMPTY_PATH) == 0 \
                and self.nodes._keep_cache(s, &st):
            keep = FOPEN_KEEP_CACHE
        cdef uint64_t fh = self.files._add(ffd, s)      # the request's pin is now the file's
        if fh == 0:
            self.nodes._unpin(s)
            return 0
        return self._open_out(out, h, fh, ohdr, keep)

    cdef Py_ssize_t _create(self, const fuse_in_header *h, const uint8_t *req, Py_ssize_t n,
                            uint8_t *out) noexcept nogil:
        cdef Py_ssize_t hdr = sizeof(fuse_in_header), ohdr = sizeof(fuse_out_header)
        cdef const fuse_create_in *c = <const fuse_create_in *>(req + hdr)
        cdef const char *name
        cdef uint32_t hu = UNCHANGED, hg = UNCHANGED
        cdef int pfd = -1, err = 0, ffd, opath, flags
        cdef int32_t ps, s = -1
        cdef char path[40]
        cdef stat st, pst
        cdef bint new
        if self.readonly or n < hdr + <Py_ssize_t>sizeof(fuse_create_in):
            return 0
        name = _name(req, hdr + sizeof(fuse_create_in), n)
        if name == NULL:
            return 0
        if self.chown_created and not (to_host(&self.uid, h.uid, &hu)
                                       and to_host(&self.gid, h.gid, &hg)):
            return 0
        flags = self._flags(c.flags) | O_CREAT | (<int>c.flags & O_EXCL)
        ps = self.nodes._pin(h.nodeid, &pfd, &err)
        if ps < 0:
            return reply_header(out, h.unique, err, ohdr)
        self._expect_name(h.nodeid, name)
        ffd = <int>_open_beneath(pfd, name, flags, c.mode & 0o7777, &err)
        if ffd < 0:
            self.nodes._unpin(ps)
            return reply_header(out, h.unique, err, ohdr)
        snprintf(path, sizeof(path), "/proc/self/fd/%d", ffd)
        opath = c_open(path, O_PATH | O_CLOEXEC)
        if opath < 0:
            err = errno
        elif self.chown_created and not ((hu == 0 or hu == UNCHANGED)
                                         and (hg == 0 or hg == UNCHANGED)):
            # a root server creates as root: hand the new inode to the caller's ids
            if fstatat(pfd, "", &pst, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0:
                err = errno
            else:
                if pst.st_mode & S_ISGID:
                    hg = UNCHANGED              # setgid directory: its group wins
                if fchownat(opath, "", hu, hg, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0:
                    err = errno
                elif c.mode & 0o6000 and ((c.mode & S_IFMT) == S_IFREG or (c.mode & S_IFMT) == 0):
                    snprintf(path, sizeof(path), "/proc/self/fd/%d", opath)
                    if fchmodat(AT_FDCWD, path, c.mode & 0o7777, 0) < 0:    # chown cleared
                        err = errno
        if not err and fstatat(opath, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0:
            err = errno
        self.nodes._unpin(ps)
        if err:
            if opath >= 0:
                close(opath)
            close(ffd)
            return reply_header(out, h.unique, err, ohdr)
        cdef uint64_t nodeid = adopt(self.nodes, opath, &st, &err, &new, &s)
        if nodeid == 0:
            close(ffd)
            return reply_header(out, h.unique, err, ohdr)
        if self.watching:
            self.nodes._set_stamp(s, &st)
        cdef uint64_t fh = self.files._add(ffd, s)      # adopt's pin is now the file's
        if fh == 0:
            self.nodes._unpin(s)
            return reply_header(out, h.unique, 12, ohdr)     # ENOMEM
        self._entry(out, h, nodeid, &st, sizeof(fuse_open_out))
        return self._open_out(out, h, fh, ohdr + sizeof(fuse_entry_out))

    cdef Py_ssize_t _flush(self, const fuse_in_header *h, const uint8_t *req, Py_ssize_t n,
                           uint8_t *out) noexcept nogil:
        cdef stat st
        if n < <Py_ssize_t>(sizeof(fuse_in_header) + sizeof(fuse_flush_in)):
            return 0
        cdef int32_t s = self.files._flushed((<const fuse_flush_in *>(
            req + sizeof(fuse_in_header))).fh, &st)
        if s < 0 or self.nodes._peek(s).pyheld:     # POSIX locks to drop: Python's
            return 0
        if self.watching and st.st_size >= 0:       # written: stamped at the close, which
            self.nodes._set_stamp(s, &st)           # RELEASE (async) may follow an open
        return reply_header(out, h.unique, 0, sizeof(fuse_out_header))

    cdef Py_ssize_t _release(self, const fuse_in_header *h, const uint8_t *req, Py_ssize_t n,
                             uint8_t *out) noexcept nogil:
        cdef const fuse_release_in *r = <const fuse_release_in *>(req + sizeof(fuse_in_header))
        cdef stat st
        cdef bint written = 0
        cdef int32_t s
        if n < <Py_ssize_t>(sizeof(fuse_in_header) + sizeof(fuse_release_in)):
            return 0
        s = self.files._node_of(r.fh)
        if s < 0 or self.nodes._peek(s).pyheld:
            return 0
        st.st_size = -1
        if not self.files._remove(r.fh, &st if self.watching else NULL, &written, &s):
            return 0
        if written and self.watching and st.st_size >= 0:
            self.nodes._set_stamp(s, &st)
        self.nodes._unpin(s)          # the file's hold on its inode
        return reply_header(out, h.unique, 0, sizeof(fuse_out_header))

    cdef Py_ssize_t _unlink(self, const fuse_in_header *h, const uint8_t *req, Py_ssize_t n,
                            uint8_t *out) noexcept nogil:
        cdef const char *name = _name(req, sizeof(fuse_in_header), n)
        cdef int pfd = -1, err = 0
        if self.readonly or name == NULL:
            return 0
        cdef int32_t ps = self.nodes._pin(h.nodeid, &pfd, &err)
        if ps < 0:
            return reply_header(out, h.unique, err, sizeof(fuse_out_header))
        self._expect_name(h.nodeid, name)
        if unlinkat(pfd, name, 0) < 0:
            err = errno
        self.nodes._unpin(ps)
        return reply_header(out, h.unique, err, sizeof(fuse_out_header))

    # --- entry points -----------------------------------------------------------------------

    def serve(self, req, out) -> int:
        """Answer a request into `out`: the reply length, -1 when it has no reply (FORGET),
        0 when it is for the Python handler."""
        cdef const uint8_t[::1] rq = req
        cdef uint8_t[::1] o = out
        cdef Py_ssize_t n
        if rq.shape[0] == 0 or o.shape[0] == 0:
            return 0
        cdef const uint8_t *rp = &rq[0]
        cdef uint8_t *op = &o[0]
        with nogil:
            n = self._serve(rp, rq.shape[0], op, o.shape[0])
        return n
