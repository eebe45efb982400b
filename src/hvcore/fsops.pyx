# cython: language_level=3
"""File system calls the share server needs and Python's os module lacks or does per entry.

Lookups that cannot leave their directory (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS),
stat with nanosecond times (`Stat`, whose struct the reply encoders in `fuseproto` read),
renameat2, fchownat on O_PATH descriptors, fallocate, file handles (name_to_handle_at /
open_by_handle_at), directory listings packed as fuse_dirent records straight from
getdents64, and inotify record decoding. Every call releases the GIL around the syscall and
raises OSError with the errno text after taking it back.

`FileTable` is the data fast path: the open files' descriptors by FUSE file handle, and READ /
WRITE served from the request buffer into a preallocated reply buffer without the GIL (one
pread / pwrite per request; anything unusual is left to the Python handler).
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport errno, EINVAL, ENOSYS
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free, realloc
from libc.string cimport memchr, memcpy, memset, strlen
from posix.unistd cimport lseek, read, write, pread, pwrite, close
from libc.errno cimport EINTR, EAGAIN, ENOENT
from posix.fcntl cimport O_CREAT

from hvcore.includes.fuse cimport (fuse_dirent, FUSE_NAME_OFFSET, FUSE_NAME_OFFSET_DIRENTPLUS,
                                   fuse_in_header, fuse_out_header, fuse_read_in,
                                   fuse_write_in, fuse_write_out, FUSE_READ, FUSE_WRITE,
                                   FUSE_WRITE_KILL_SUIDGID)
from hvcore.includes.sys cimport (pthread_mutex_t, pthread_mutex_init, pthread_mutex_destroy,
                                  pthread_mutex_lock, pthread_mutex_unlock)
from hvcore.includes.dirent cimport dirent64, getdents64
from hvcore.includes.inotify cimport inotify_event
from hvcore.includes.openat2 cimport (open_how, syscall, SYS_openat2, RESOLVE_BENEATH,
                                      RESOLVE_NO_SYMLINKS, RESOLVE_NO_MAGICLINKS)
from hvcore.includes.stat cimport fstatat
from hvcore.includes.fcntl cimport (AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW, O_NOFOLLOW, openat,
                                    fchownat, fallocate)
from hvcore.includes.stdio cimport renameat2
from hvcore.includes.fhandle cimport (file_handle, MAX_HANDLE_SZ, name_to_handle_at,
                                      open_by_handle_at)

import os as _os


cdef class Stat:
    """struct stat of one host inode (from `lstat_at`), nanosecond times kept for replies."""

    def __init__(self):
        raise TypeError("Stat objects come from lstat_at()")

    @property
    def dev(self): return self.st.st_dev
    @property
    def ino(self): return self.st.st_ino
    @property
    def mode(self): return self.st.st_mode
    @property
    def uid(self): return self.st.st_uid
    @property
    def gid(self): return self.st.st_gid
    @property
    def size(self): return self.st.st_size
    @property
    def nlink(self): return self.st.st_nlink
    @property
    def rdev(self): return self.st.st_rdev
    @property
    def mtime_ns(self): return self.st.st_mtim.tv_sec * 1000000000 + self.st.st_mtim.tv_nsec
    @property
    def stamp(self):
        """(ctime, mtime, size): changes whenever anyone changes the inode."""
        return (self.st.st_ctim.tv_sec * 1000000000 + self.st.st_ctim.tv_nsec,
                self.st.st_mtim.tv_sec * 1000000000 + self.st.st_mtim.tv_nsec, self.st.st_size)


def lstat_at(int dirfd, bytes name not None) -> Stat:
    """fstatat(dirfd, name, AT_SYMLINK_NOFOLLOW); b"" stats dirfd itself (AT_EMPTY_PATH)."""
    cdef Stat s = Stat.__new__(Stat)
    cdef const char *p = name
    cdef int flags = AT_SYMLINK_NOFOLLOW | (AT_EMPTY_PATH if len(name) == 0 else 0)
    cdef int rc
    with nogil:
        rc = fstatat(dirfd, p, &s.st, flags)
    if rc < 0:
        raise OSError(errno, _os.strerror(errno))
    return s


# ---------------------------------------------------------------------------------------------
# Directory listings: getdents64 records packed straight into FUSE records.

DEF DENTS_BUF = 32768


cdef inline size_t align8(size_t n) noexcept nogil:
    return (n + 7) & ~<size_t>7


def read_dir(int fd, int64_t offset, uint32_t size) -> bytes:
    """READDIR payload: fuse_dirent records from `offset` (a d_off cookie) filling at most
    `size` bytes; each record's `off` is the cookie of the entry after it."""
    cdef char *out = <char *>malloc(size if size else 1)
    cdef char *dents = <char *>malloc(DENTS_BUF)
    cdef size_t used = 0, rec
    cdef ssize_t n = 0, pos
    cdef int err = 0
    cdef size_t namelen
    cdef dirent64 *d
    cdef fuse_dirent *fd_out
    cdef bint full = False
    if out == NULL or dents == NULL:
        free(out)
        free(dents)
        raise MemoryError()
    with nogil:
        if lseek(fd, offset, 0) < 0:
            err = errno
        while not err and not full:
            n = getdents64(fd, dents, DENTS_BUF)
            if n < 0:
                err = errno
            if n <= 0:
                break
            pos = 0
            while pos < n:
                d = <dirent64 *>(dents + pos)
                if d.d_reclen == 0 or pos + d.d_reclen > n:
                    break
                namelen = strlen(d.d_name)
                rec = align8(FUSE_NAME_OFFSET + namelen)
                if used + rec > size:
                    full = True
                    break
                fd_out = <fuse_dirent *>(out + used)
                memset(fd_out, 0, rec)
                fd_out.ino = d.d_ino
                fd_out.off = <uint64_t>d.d_off
                fd_out.namelen = <uint32_t>namelen
                fd_out.type = d.d_type
                memcpy(out + used + FUSE_NAME_OFFSET, d.d_name, namelen)
                used += rec
                pos += d.d_reclen
    free(dents)
    try:
        if err:
            raise OSError(err, _os.strerror(err))
        return PyBytes_FromStringAndSize(out, used)
    finally:
        free(out)


def list_dir(int fd, int64_t offset, uint32_t size) -> list:
    """READDIRPLUS entries from `offset` that fit in `size` bytes as fuse_direntplus records:
    [(name, d_ino, d_type, d_off), ...]. The caller looks each one up, then packs them."""
    cdef char *dents = <char *>malloc(DENTS_BUF)
    cdef size_t used = 0, rec
    cdef ssize_t n = 0, pos
    cdef int err = 0
    cdef dirent64 *d
    cdef bint full = False
    result = []
    if dents == NULL:
        raise MemoryError()
    try:
        with nogil:
            if lseek(fd, offset, 0) < 0:
                err = errno
        while not err and not full:
            with nogil:
                n = getdents64(fd, dents, DENTS_BUF)
                if n < 0:
                    err = errno
            if n <= 0:
                break
            pos = 0
            while pos < n:
                d = <dirent64 *>(dents + pos)
                if d.d_reclen == 0 or pos + d.d_reclen > n:
                    break
                rec = align8(FUSE_NAME_OFFSET_DIRENTPLUS + strlen(d.d_name))
                if used + rec > size:
                    full = True
                    break
                used += rec
                result.append((<bytes>d.d_name, d.d_ino, d.d_type, d.d_off))
                pos += d.d_reclen
        if err:
            raise OSError(err, _os.strerror(err))
        return result
    finally:
        free(dents)


# ---------------------------------------------------------------------------------------------
# Lookups that stay inside their directory, ownership and space calls, inotify records.

DEF HANDLE_MAX = 128           # MAX_HANDLE_SZ
DEF HANDLE_HEADER = 8          # struct file_handle before f_handle
DEF HANDLE_WORDS = 17          # (HANDLE_HEADER + HANDLE_MAX) / 8

cdef int _have_openat2 = 1


cdef long _open_beneath(int dirfd, const char *p, int flags, int mode,
                        int *err) noexcept nogil:
    global _have_openat2
    cdef open_how how
    cdef long fd = -1
    memset(&how, 0, sizeof(how))
    how.flags = <uint64_t>(flags | O_NOFOLLOW)
    how.mode = <uint64_t>mode if flags & O_CREAT else 0
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
    err[0] = 0
    if _have_openat2:
        fd = syscall(SYS_openat2, dirfd, p, &how, sizeof(how))
        if fd < 0:
            err[0] = errno
            if err[0] == ENOSYS:
                _have_openat2 = 0
    if not _have_openat2:
        fd = openat(dirfd, p, flags | O_NOFOLLOW, mode)
        err[0] = errno if fd < 0 else 0
    return fd


def open_beneath(int dirfd, bytes name not None, int flags, int mode=0) -> int:
    """openat2(dirfd, name, flags, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS): nothing outside
    dirfd can be reached, no symlink is followed (a trailing one with O_PATH|O_NOFOLLOW gives
    the link itself). Falls back to openat(O_NOFOLLOW) on kernels without openat2."""
    cdef const char *p = name
    cdef long fd
    cdef int err = 0
    with nogil:
        fd = _open_beneath(dirfd, p, flags, mode, &err)
    if fd < 0:
        raise OSError(err, _os.strerror(err))
    return fd


def lookup_at(int dirfd, bytes name not None, int flags, bint want_handle) -> tuple:
    """A whole lookup in one release of the GIL: `open_beneath(dirfd, name, flags)`, the
    descriptor's stat and, with `want_handle`, its file handle. Returns `(fd, Stat, mount_id,
    handle)`; handle is None when not wanted or the file system has none."""
    cdef Stat s = Stat.__new__(Stat)
    cdef uint64_t hbuf[HANDLE_WORDS]
    cdef file_handle *h = <file_handle *>hbuf
    cdef const char *p = name
    cdef int mount_id = 0, err = 0, herr = 1
    cdef long fd
    h.handle_bytes = HANDLE_MAX
    with nogil:
        fd = _open_beneath(dirfd, p, flags, 0, &err)
        if fd >= 0:
            if fstatat(<int>fd, "", &s.st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0:
                err = errno
                close(<int>fd)
                fd = -1
            elif want_handle:
                herr = name_to_handle_at(<int>fd, "", h, &mount_id, AT_EMPTY_PATH)
    if fd < 0:
        raise OSError(err, _os.strerror(err))
    handle = None
    if want_handle and herr == 0 and h.handle_bytes <= HANDLE_MAX:
        handle = PyBytes_FromStringAndSize(<const char *>hbuf, HANDLE_HEADER + h.handle_bytes)
    return fd, s, mount_id, handle


def chown_fd(int fd, uint32_t uid, uint32_t gid) -> None:
    """fchownat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW): works on O_PATH descriptors and
    changes a symlink itself. -1 (0xffffffff) leaves that id unchanged."""
    cdef int rc
    with nogil:
        rc = fchownat(fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)
    if rc < 0:
        raise OSError(errno, _os.strerror(errno))


def rename_at(int olddirfd, bytes old not None, int newdirfd, bytes new not None,
              unsigned int flags) -> None:
    """renameat2(2): flags RENAME_NOREPLACE (1) and RENAME_EXCHANGE (2)."""
    cdef const char *o = old
    cdef const char *n = new
    cdef int rc
    with nogil:
        rc = renameat2(olddirfd, o, newdirfd, n, flags)
    if rc < 0:
        raise OSError(errno, _os.strerror(errno))


def fallocate_fd(int fd, int mode, int64_t offset, int64_t length) -> None:
    """fallocate(2) with its mode bits (KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE, ...)."""
    cdef int rc
    with nogil:
        rc = fallocate(fd, mode, offset, length)
    if rc < 0:
        raise OSError(errno, _os.strerror(errno))


# ---------------------------------------------------------------------------------------------
# File handles: an inode named without a descriptor (virtiofsd --inode-file-handles).

HANDLE_SIZE_MAX = HANDLE_HEADER + HANDLE_MAX


def handle_of(int fd) -> tuple:
    """name_to_handle_at(fd, "", AT_EMPTY_PATH): `(mount_id, handle)` of the inode an (O_PATH)
    descriptor is on; `handle` is the whole struct file_handle, for `open_by_handle`."""
    cdef uint64_t buf[HANDLE_WORDS]
    cdef file_handle *h = <file_handle *>buf
    cdef int mount_id = 0, rc, err = 0
    assert MAX_HANDLE_SZ == HANDLE_MAX
    h.handle_bytes = HANDLE_MAX
    with nogil:
        rc = name_to_handle_at(fd, "", h, &mount_id, AT_EMPTY_PATH)
        if rc < 0:
            err = errno
    if rc < 0:
        raise OSError(err, _os.strerror(err))
    if h.handle_bytes > HANDLE_MAX:
        raise OSError(EINVAL, f"file handle of {h.handle_bytes} bytes")
    return mount_id, PyBytes_FromStringAndSize(<const char *>buf, HANDLE_HEADER + h.handle_bytes)


def open_by_handle(int mount_fd, bytes handle not None, int flags) -> int:
    """open_by_handle_at(mount_fd, handle, flags): a new descriptor on the inode `handle_of`
    named (ESTALE once it is deleted). `mount_fd` is a descriptor (not O_PATH: the kernel
refuses those) on the same mount."""
    cdef uint64_t buf[HANDLE_WORDS]
    cdef Py_ssize_t n = len(handle)
    cdef int fd, err = 0
    if n < HANDLE_HEADER or n > HANDLE_HEADER + HANDLE_MAX:
        raise OSError(EINVAL, f"file handle of {n} bytes")
    cdef unsigned int hbytes
    memcpy(buf, <const char *>handle, n)
    memcpy(&hbytes, buf, sizeof(hbytes))
    if hbytes != <unsigned int>(n - HANDLE_HEADER):
        raise OSError(EINVAL, "file handle length does not match its header")
    with nogil:
        fd = open_by_handle_at(mount_fd, <file_handle *>buf, flags)
        if fd < 0:
            err = errno
    if fd < 0:
        raise OSError(err, _os.strerror(err))
    return fd


def inotify_events(buf) -> list:
    """Decode a read() from an inotify descriptor: [(wd, mask, cookie, name), ...]."""
    cdef const uint8_t[::1] view = buf
    cdef Py_ssize_t n = view.shape[0], pos = 0
    cdef const inotify_event *ev
    cdef size_t hdr = sizeof(inotify_event)
    result = []
    while pos + <Py_ssize_t>hdr <= n:
        ev = <const inotify_event *>&view[pos]
        if pos + <Py_ssize_t>hdr + ev.len > n:
            break
        if ev.len:
            namelen = strlen(ev.name) if memchr(ev.name, 0, ev.len) != NULL else ev.len
            name = PyBytes_FromStringAndSize(ev.name, namelen)
        else:
            name = b""
        result.append((ev.wd, ev.mask, ev.cookie, name))
        pos += hdr + ev.len
    return result


# ---------------------------------------------------------------------------------------------
# Open files and the READ / WRITE fast path.

cdef uint64_t MAX_OFFSET = (<uint64_t>1 << 63) - 1


cdef struct Slot:
    int fd            # -1: free
    int pins          # fast-path requests using fd now
    uint32_t gen      # bumped on every reuse: a stale file handle never finds the new file
    bint closing      # removed while pinned: the last unpin closes fd
    bint written


cdef class FileTable:
    """Open files by FUSE file handle (`fh` = generation << 32 | slot + 1). `add(fd)` hands out
    a handle and owns the descriptor from then on; `remove(fh)` closes it (after any READ /
    WRITE still using it). `serve(req, out)` / `serve_dev(...)` answer READ and WRITE."""
    cdef Slot *slots
    cdef Py_ssize_t cap
    cdef Py_ssize_t hint
    cdef pthread_mutex_t lock
    cdef public bint enabled        # set once INIT is done
    cdef public bint writable       # WRITE served here (not on a read-only share)
    cdef public uint32_t max_io     # largest READ served here (max_write)

    def __cinit__(self):
        pthread_mutex_init(&self.lock, NULL)
        self.cap = 0
        self.slots = NULL
        self.hint = 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.cap):
            if self.slots[i].fd >= 0:
                close(self.slots[i].fd)
        free(self.slots)
        pthread_mutex_destroy(&self.lock)

    def add(self, int fd) -> int:
        cdef Py_ssize_t i, n
        cdef Slot *grown
        pthread_mutex_lock(&self.lock)
        for n in range(self.cap):
            i = (self.hint + n) % self.cap
            if self.slots[i].fd < 0:
                break
        else:
            n = self.cap * 2 if self.cap else 64
            grown = <Slot *>realloc_slots(self.slots, n)
            if grown == NULL:
                pthread_mutex_unlock(&self.lock)
                raise MemoryError()
            memset(grown + self.cap, 0, (n - self.cap) * sizeof(Slot))
            for i in range(self.cap, n):
                grown[i].fd = -1
            i = self.cap
            self.slots, self.cap = grown, n
        self.slots[i].fd = fd
        self.slots[i].pins = 0
        self.slots[i].closing = 0
        self.slots[i].written = 0
        self.slots[i].gen += 1
        self.hint = i + 1
        cdef uint64_t fh = (<uint64_t>self.slots[i].gen << 32) | <uint64_t>(i + 1)
        pthread_mutex_unlock(&self.lock)
        return fh

    def remove(self, uint64_t fh) -> bool:
        """Forget `fh` and close its descriptor (now, or when the last READ / WRITE using it
        ends). Returns whether the fast path wrote to it."""
        cdef int fd = -1
        cdef bint written = 0
        cdef Slot *sl
        pthread_mutex_lock(&self.lock)
        sl = self._slot(fh)
        if sl != NULL:
            written = sl.written
            if sl.pins:
                sl.closing = 1
            else:
                fd, sl.fd = sl.fd, -1
        pthread_mutex_unlock(&self.lock)
        if fd >= 0:
            close(fd)
        return written

    def written(self, uint64_t fh) -> bool:
        cdef Slot *sl
        pthread_mutex_lock(&self.lock)
        sl = self._slot(fh)
        cdef bint w = sl != NULL and sl.written
        pthread_mutex_unlock(&self.lock)
        return w

    cdef Slot *_slot(self, uint64_t fh) noexcept nogil:
        """With the lock held: the live slot of `fh`, or NULL."""
        cdef uint64_t i = ((fh << 32) >> 32) - 1
        if ((fh << 32) >> 32) == 0 or i >= <uint64_t>self.cap:
            return NULL
        cdef Slot *sl = &self.slots[i]
        if sl.fd < 0 or sl.closing or sl.gen != <uint32_t>(fh >> 32):
            return NULL
        return sl

    cdef int _pin(self, uint64_t fh, bint write) noexcept nogil:
        cdef int fd = -1
        pthread_mutex_lock(&self.lock)
        cdef Slot *sl = self._slot(fh)
        if sl != NULL:
            sl.pins += 1
            if write:
                sl.written = 1
            fd = sl.fd
        pthread_mutex_unlock(&self.lock)
        return fd

    cdef void _unpin(self, uint64_t fh) noexcept nogil:
        cdef int fd = -1
        cdef uint64_t i = ((fh << 32) >> 32) - 1
        pthread_mutex_lock(&self.lock)
        cdef Slot *sl = &self.slots[i]        # pinned: the slot exists and is not reused
        sl.pins -= 1
        if sl.pins == 0 and sl.closing:
            fd, sl.fd, sl.closing = sl.fd, -1, 0
        pthread_mutex_unlock(&self.lock)
        if fd >= 0:
            close(fd)

    cdef Py_ssize_t _serve(self, const uint8_t *req, Py_ssize_t n, uint8_t *out,
                           Py_ssize_t cap) noexcept nogil:
        """Answer one READ / WRITE into `out`; returns the reply length, or 0 when the request
        is for the Python handler (another opcode, an unknown handle, anything odd)."""
        cdef const fuse_in_header *h = <const fuse_in_header *>req
        cdef const fuse_read_in *rd
        cdef const fuse_write_in *wr
        cdef Py_ssize_t hdr = sizeof(fuse_in_header), ohdr = sizeof(fuse_out_header)
        cdef ssize_t r
        cdef int fd, err = 0
        if not self.enabled or n < hdr + <Py_ssize_t>sizeof(fuse_read_in) or h.len != n:
            return 0
        if h.opcode == FUSE_READ:
            rd = <const fuse_read_in *>(req + hdr)
            if (rd.size > self.max_io or <Py_ssize_t>rd.size > cap - ohdr
                    or rd.offset > MAX_OFFSET):
                return 0
            fd = self._pin(rd.fh, 0)
            if fd < 0:
                return 0
            r = pread(fd, out + ohdr, rd.size, <int64_t>rd.offset)
            if r < 0:
                err = errno
            self._unpin(rd.fh)
            return _reply_header(out, h.unique, err, ohdr + (r if r > 0 else 0))
        if h.opcode == FUSE_WRITE and self.writable:
            wr = <const fuse_write_in *>(req + hdr)
            if (<Py_ssize_t>wr.size != n - hdr - <Py_ssize_t>sizeof(fuse_write_in)
                    or wr.write_flags & FUSE_WRITE_KILL_SUIDGID or wr.offset > MAX_OFFSET
                    or wr.offset + wr.size > MAX_OFFSET or cap < ohdr + 8):
                return 0
            fd = self._pin(wr.fh, 1)
            if fd < 0:
                return 0
            r = pwrite(fd, req + hdr + sizeof(fuse_write_in), wr.size, <int64_t>wr.offset)
            if r < 0:
                err = errno
            self._unpin(wr.fh)
            if err:
                return _reply_header(out, h.unique, err, ohdr)
            memset(out + ohdr, 0, 8)
            (<fuse_write_out *>(out + ohdr)).size = <uint32_t>r
            return _reply_header(out, h.unique, 0, ohdr + 8)
        return 0

    def serve(self, req, out) -> int:
        """Answer a READ / WRITE request into `out`: the reply length, or 0 when the request
        is for the Python handler."""
        cdef const uint8_t[::1] rq = req
        cdef uint8_t[::1] o = out
        if rq.shape[0] == 0 or o.shape[0] == 0:
            return 0
        cdef const uint8_t *rp = &rq[0]
        cdef uint8_t *op = &o[0]
        with nogil:
            n = self._serve(rp, rq.shape[0], op, o.shape[0])
        return n

    def serve_dev(self, int devfd, buf, out) -> int:
        """Read requests from a /dev/fuse descriptor into `buf`, answering READ / WRITE without
        the GIL, until one is for the Python handler: returns its length (it is in `buf`),
        0 at end of file, or -errno when the read fails (EINTR, EAGAIN, ENOENT: retried)."""
        cdef uint8_t[::1] b = buf
        cdef uint8_t[::1] o = out
        cdef ssize_t n = 0
        cdef Py_ssize_t m
        if b.shape[0] == 0 or o.shape[0] == 0:
            raise ValueError("empty buffer")
        cdef uint8_t *bp = &b[0]
        cdef uint8_t *op = &o[0]
        cdef Py_ssize_t bn = b.shape[0], on = o.shape[0]
        with nogil:
            while True:
                n = read(devfd, bp, bn)
                if n < 0:
                    if errno == EINTR or errno == EAGAIN or errno == ENOENT:
                        continue
                    n = -errno
                    break
                if n == 0:
                    break
                m = self._serve(bp, n, op, on)
                if m == 0:
                    break
                write(devfd, op, m)     # ENOENT: the request was interrupted meanwhile
        return n


cdef inline Py_ssize_t _reply_header(uint8_t *out, uint64_t unique, int err,
                                     Py_ssize_t total) noexcept nogil:
    cdef fuse_out_header *o = <fuse_out_header *>out
    o.len = <uint32_t>total
    o.error = -err
    o.unique = unique
    return total


cdef inline void *realloc_slots(Slot *p, Py_ssize_t n) noexcept nogil:
    return realloc(p, n * sizeof(Slot))
