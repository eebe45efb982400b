# cython: language_level=3
"""File system calls the share server needs and Python's os module lacks or does per entry.

Lookups that cannot leave their directory (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS),
stat with nanosecond times (`Stat`, whose struct the reply encoders in `fs.proto` read),
renameat2, fchownat on O_PATH descriptors, fallocate, file handles (name_to_handle_at /
open_by_handle_at), directory listings packed as fuse_dirent records straight from
getdents64 (inotify records are read in C by `fs.watch`). Every call releases the GIL
around the syscall and raises OSError with the errno text after taking it back.

The tables the fast paths serve from live in `fs.files` (open files) and `fs.inodes` (inodes);
`fs.fastpath` answers requests from them.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport errno, EINVAL, ENOSYS
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset, strlen
from posix.time cimport timespec
from posix.unistd cimport lseek, close
from posix.fcntl cimport O_CREAT

from hvcore.includes.fuse cimport FUSE_NAME_OFFSET, FUSE_NAME_OFFSET_DIRENTPLUS
from hvcore.fs.dirent cimport align8, put_dirent
from hvcore.includes.dirent cimport dirent64, getdents64
from hvcore.includes.openat2 cimport (open_how, syscall, SYS_openat2, RESOLVE_BENEATH,
                                      RESOLVE_NO_SYMLINKS, RESOLVE_NO_MAGICLINKS)
from hvcore.includes.stat cimport UTIME_NOW, UTIME_OMIT, fstatat, utimensat
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
                put_dirent(out + used, d, namelen, rec)
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
# Lookups that stay inside their directory, ownership and space calls, file handles.

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


def chown_fd(int fd, uint32_t uid, uint32_t gid) -> None:
    """fchownat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW): works on O_PATH descriptors and
    changes a symlink itself. -1 (0xffffffff) leaves that id unchanged."""
    cdef int rc
    with nogil:
        rc = fchownat(fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)
    if rc < 0:
        raise OSError(errno, _os.strerror(errno))


def utimes_fd(int fd, int64_t atime_ns, int64_t mtime_ns) -> None:
    """utimensat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW): the times of the inode an
    (O_PATH) descriptor is on, a symlink's own included (as `touch -h` sets them). A time
    of -1 is left as it is, -2 is now."""
    cdef timespec ts[2]
    cdef int rc, i
    cdef int64_t t
    for i in range(2):
        t = atime_ns if i == 0 else mtime_ns
        ts[i].tv_sec = t // 1000000000 if t >= 0 else 0
        ts[i].tv_nsec = t % 1000000000 if t >= 0 else (UTIME_OMIT if t == -1 else UTIME_NOW)
    with nogil:
        rc = utimensat(fd, "", ts, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)
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
