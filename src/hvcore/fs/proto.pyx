# cython: language_level=3
"""FUSE wire protocol (include/uapi/linux/fuse.h): request decoding and reply encoding.

`decode(buf)` turns one request buffer into `(opcode, unique, nodeid, uid, gid, pid, args)`
where `args` is a tuple laid out per opcode (see `_decode_args`); every byte is read through
a bounds-checked reader, so a truncated or inconsistent request raises `ProtocolError` (an
OSError carrying EINVAL, ENAMETOOLONG, ... and the request's `unique` when it was readable)
and never reads past the buffer. Encoders build whole replies (`*_reply`, header included)
or, for data replies, the 16-byte `header()` to send before the data.

Attributes are encoded from `hvcore.fs.ops.Stat` (fstatat with nanosecond times) with the
layout in `hvcore.fs.attr`, which the C fast path (`hvcore.fs.fastpath`) writes too; the system
calls themselves (lookups, listings, handles, ...) live in `hvcore.fs.ops`.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.errno cimport EINVAL, ENAMETOOLONG, E2BIG, ERANGE
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memchr, memcpy, memset

from hvcore.includes.fuse cimport *
from hvcore.fs.attr cimport fill_attr_st, split_time
from hvcore.fs.dirent cimport align8
from hvcore.fs.ops cimport Stat

KERNEL_MINOR = FUSE_KERNEL_MINOR_VERSION
ROOT_ID = FUSE_ROOT_ID
MIN_READ_BUFFER = FUSE_MIN_READ_BUFFER
DEV_IOC_CLONE = FUSE_DEV_IOC_CLONE
NAME_MAX = 255
PATH_MAX = 4096
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536

# Opcodes, notify codes and flag bits under their header names without the FUSE_ prefix.
LOOKUP, FORGET, GETATTR, SETATTR = FUSE_LOOKUP, FUSE_FORGET, FUSE_GETATTR, FUSE_SETATTR
READLINK, SYMLINK, MKNOD, MKDIR = FUSE_READLINK, FUSE_SYMLINK, FUSE_MKNOD, FUSE_MKDIR
UNLINK, RMDIR, RENAME, LINK = FUSE_UNLINK, FUSE_RMDIR, FUSE_RENAME, FUSE_LINK
OPEN, READ, WRITE, STATFS = FUSE_OPEN, FUSE_READ, FUSE_WRITE, FUSE_STATFS
RELEASE, FSYNC, SETXATTR, GETXATTR = FUSE_RELEASE, FUSE_FSYNC, FUSE_SETXATTR, FUSE_GETXATTR
LISTXATTR, REMOVEXATTR, FLUSH, INIT = FUSE_LISTXATTR, FUSE_REMOVEXATTR, FUSE_FLUSH, FUSE_INIT
OPENDIR, READDIR, RELEASEDIR = FUSE_OPENDIR, FUSE_READDIR, FUSE_RELEASEDIR
FSYNCDIR, GETLK, SETLK, SETLKW = FUSE_FSYNCDIR, FUSE_GETLK, FUSE_SETLK, FUSE_SETLKW
ACCESS, CREATE, INTERRUPT, DESTROY = FUSE_ACCESS, FUSE_CREATE, FUSE_INTERRUPT, FUSE_DESTROY
BATCH_FORGET, FALLOCATE, READDIRPLUS = FUSE_BATCH_FORGET, FUSE_FALLOCATE, FUSE_READDIRPLUS
RENAME2, LSEEK, COPY_FILE_RANGE = FUSE_RENAME2, FUSE_LSEEK, FUSE_COPY_FILE_RANGE
SYNCFS = FUSE_SYNCFS

FATTR = {"MODE": FATTR_MODE, "UID": FATTR_UID, "GID": FATTR_GID, "SIZE": FATTR_SIZE,
         "ATIME": FATTR_ATIME, "MTIME": FATTR_MTIME, "FH": FATTR_FH,
         "ATIME_NOW": FATTR_ATIME_NOW, "MTIME_NOW": FATTR_MTIME_NOW,
         "LOCKOWNER": FATTR_LOCKOWNER, "CTIME": FATTR_CTIME, "KILL_SUIDGID": FATTR_KILL_SUIDGID}
FOPEN = {"DIRECT_IO": FOPEN_DIRECT_IO, "KEEP_CACHE": FOPEN_KEEP_CACHE,
         "NONSEEKABLE": FOPEN_NONSEEKABLE, "CACHE_DIR": FOPEN_CACHE_DIR}
INIT_FLAGS = {
    "ASYNC_READ": FUSE_ASYNC_READ, "POSIX_LOCKS": FUSE_POSIX_LOCKS,
    "ATOMIC_O_TRUNC": FUSE_ATOMIC_O_TRUNC, "EXPORT_SUPPORT": FUSE_EXPORT_SUPPORT,
    "BIG_WRITES": FUSE_BIG_WRITES, "DONT_MASK": FUSE_DONT_MASK, "FLOCK_LOCKS": FUSE_FLOCK_LOCKS,
    "AUTO_INVAL_DATA": FUSE_AUTO_INVAL_DATA, "DO_READDIRPLUS": FUSE_DO_READDIRPLUS,
    "READDIRPLUS_AUTO": FUSE_READDIRPLUS_AUTO, "ASYNC_DIO": FUSE_ASYNC_DIO,
    "WRITEBACK_CACHE": FUSE_WRITEBACK_CACHE, "PARALLEL_DIROPS": FUSE_PARALLEL_DIROPS,
    "HANDLE_KILLPRIV": FUSE_HANDLE_KILLPRIV, "MAX_PAGES": FUSE_MAX_PAGES,
    "CACHE_SYMLINKS": FUSE_CACHE_SYMLINKS, "EXPLICIT_INVAL_DATA": FUSE_EXPLICIT_INVAL_DATA,
    "HANDLE_KILLPRIV_V2": FUSE_HANDLE_KILLPRIV_V2, "SETXATTR_EXT": FUSE_SETXATTR_EXT,
    "INIT_EXT": FUSE_INIT_EXT,
    "OVER_IO_URING": 1 << 41,      # 7.42 (Linux 6.14); newer than the build's linux/fuse.h
}
RELEASE_FLUSH, RELEASE_FLOCK_UNLOCK = FUSE_RELEASE_FLUSH, FUSE_RELEASE_FLOCK_UNLOCK
GETATTR_FH, LK_FLOCK, FSYNC_FDATASYNC = FUSE_GETATTR_FH, FUSE_LK_FLOCK, FUSE_FSYNC_FDATASYNC
WRITE_KILL_SUIDGID, OPEN_KILL_SUIDGID = FUSE_WRITE_KILL_SUIDGID, FUSE_OPEN_KILL_SUIDGID


class ProtocolError(OSError):
    """A malformed request. `errno` is what the reply carries; `unique` is 0 when the header
    itself was unreadable (then no reply can be addressed)."""

    def __init__(self, err, message, unique=0):
        super().__init__(err, message)
        self.unique = unique


# ---------------------------------------------------------------------------------------------
# Bounded reader (py-pgproto frb style): every read of request bytes is checked.

cdef struct Reader:
    const uint8_t *p
    Py_ssize_t n
    Py_ssize_t pos
    uint64_t unique


cdef const void *take(Reader *r, Py_ssize_t n, str what) except NULL:
    if n < 0 or r.n - r.pos < n:
        raise ProtocolError(EINVAL, f"request truncated: {what} needs {n} bytes, "
                                    f"{r.n - r.pos} left", r.unique)
    cdef const void *p = r.p + r.pos
    r.pos += n
    return p


# name kinds: any NUL-terminated string, a new path component, a looked-up component
DEF STR_ANY = 0
DEF STR_NEW = 1
DEF STR_LOOKUP = 2


cdef bytes take_str(Reader *r, int kind, Py_ssize_t limit, str what):
    cdef const uint8_t *p = r.p + r.pos
    cdef Py_ssize_t left = r.n - r.pos
    cdef const uint8_t *end = <const uint8_t *>memchr(p, 0, left) if left > 0 else NULL
    if end == NULL:
        raise ProtocolError(EINVAL, f"{what} is not NUL-terminated", r.unique)
    cdef Py_ssize_t length = end - p
    if length == 0:
        raise ProtocolError(EINVAL, f"{what} is empty", r.unique)
    if length > limit:
        raise ProtocolError(ENAMETOOLONG if kind != STR_ANY or what != "xattr name" else ERANGE,
                            f"{what} is {length} bytes, more than {limit}", r.unique)
    if kind != STR_ANY:
        if memchr(p, b'/', length) != NULL:
            raise ProtocolError(EINVAL, f"{what} contains '/'", r.unique)
        if kind == STR_NEW and p[0] == b'.' and (length == 1 or (length == 2 and p[1] == b'.')):
            raise ProtocolError(EINVAL, f"{what} is '.' or '..'", r.unique)
    r.pos += length + 1
    return PyBytes_FromStringAndSize(<const char *>p, length)


cdef tuple _decode_args(Reader *r, uint32_t opcode, bint setxattr_ext, object buf):
    cdef const fuse_setattr_in *sa
    cdef const fuse_read_in *rd
    cdef const fuse_write_in *wr
    cdef const fuse_lk_in *lk
    cdef const fuse_copy_file_range_in *cf
    cdef const fuse_init_in *ini
    cdef const fuse_setxattr_in *sx
    cdef const fuse_forget_one *one
    cdef uint32_t count, i, flags2
    cdef Py_ssize_t start
    if opcode == FUSE_LOOKUP:
        return (take_str(r, STR_LOOKUP, NAME_MAX, "name"),)
    if opcode in (FUSE_UNLINK, FUSE_RMDIR):
        return (take_str(r, STR_NEW, NAME_MAX, "name"),)
    if opcode == FUSE_GETATTR:
        g = <const fuse_getattr_in *>take(r, sizeof(fuse_getattr_in), "getattr_in")
        return (g.getattr_flags, g.fh)
    if opcode in (FUSE_READ, FUSE_READDIR, FUSE_READDIRPLUS):
        rd = <const fuse_read_in *>take(r, sizeof(fuse_read_in), "read_in")
        return (rd.fh, rd.offset, rd.size, rd.read_flags, rd.lock_owner, rd.flags)
    if opcode == FUSE_WRITE:
        wr = <const fuse_write_in *>take(r, sizeof(fuse_write_in), "write_in")
        start = r.pos
        take(r, wr.size, "write data")
        return (wr.fh, wr.offset, wr.write_flags, wr.lock_owner, wr.flags,
                memoryview(buf)[start:start + wr.size])
    if opcode in (FUSE_OPEN, FUSE_OPENDIR):
        o = <const fuse_open_in *>take(r, sizeof(fuse_open_in), "open_in")
        return (o.flags, o.open_flags)
    if opcode in (FUSE_RELEASE, FUSE_RELEASEDIR):
        rl = <const fuse_release_in *>take(r, sizeof(fuse_release_in), "release_in")
        return (rl.fh, rl.flags, rl.release_flags, rl.lock_owner)
    if opcode == FUSE_FORGET:
        return ((<const fuse_forget_in *>take(r, sizeof(fuse_forget_in), "forget_in")).nlookup,)
    if opcode == FUSE_BATCH_FORGET:
        count = (<const fuse_batch_forget_in *>take(r, 8, "batch_forget_in")).count
        if <uint64_t>count * sizeof(fuse_forget_one) > <uint64_t>(r.n - r.pos):
            raise ProtocolError(EINVAL, f"batch forget of {count} entries is truncated",
                                r.unique)
        items = []
        for i in range(count):
            one = <const fuse_forget_one *>take(r, sizeof(fuse_forget_one), "forget_one")
            items.append((one.nodeid, one.nlookup))
        return (items,)
    if opcode == FUSE_CREATE:
        c = <const fuse_create_in *>take(r, sizeof(fuse_create_in), "create_in")
        return (c.flags, c.mode, c.umask, c.open_flags, take_str(r, STR_NEW, NAME_MAX, "name"))
    if opcode == FUSE_FLUSH:
        f = <const fuse_flush_in *>take(r, sizeof(fuse_flush_in), "flush_in")
        return (f.fh, f.lock_owner)
    if opcode == FUSE_SETATTR:
        sa = <const fuse_setattr_in *>take(r, sizeof(fuse_setattr_in), "setattr_in")
        return (sa.valid, sa.fh, sa.size, sa.lock_owner, sa.atime, sa.atimensec,
                sa.mtime, sa.mtimensec, sa.mode, sa.uid, sa.gid)
    if opcode in (FUSE_READLINK, FUSE_STATFS, FUSE_DESTROY, FUSE_SYNCFS):
        return ()
    if opcode == FUSE_SYMLINK:
        name = take_str(r, STR_NEW, NAME_MAX, "name")
        return (name, take_str(r, STR_ANY, PATH_MAX - 1, "symlink target"))
    if opcode == FUSE_MKNOD:
        mk = <const fuse_mknod_in *>take(r, sizeof(fuse_mknod_in), "mknod_in")
        return (mk.mode, mk.rdev, mk.umask, take_str(r, STR_NEW, NAME_MAX, "name"))
    if opcode == FUSE_MKDIR:
        md = <const fuse_mkdir_in *>take(r, sizeof(fuse_mkdir_in), "mkdir_in")
        return (md.mode, md.umask, take_str(r, STR_NEW, NAME_MAX, "name"))
    if opcode == FUSE_RENAME:
        rn = <const fuse_rename_in *>take(r, sizeof(fuse_rename_in), "rename_in")
        old = take_str(r, STR_NEW, NAME_MAX, "old name")
        return (rn.newdir, 0, old, take_str(r, STR_NEW, NAME_MAX, "new name"))
    if opcode == FUSE_RENAME2:
        rn2 = <const fuse_rename2_in *>take(r, sizeof(fuse_rename2_in), "rename2_in")
        old = take_str(r, STR_NEW, NAME_MAX, "old name")
        return (rn2.newdir, rn2.flags, old, take_str(r, STR_NEW, NAME_MAX, "new name"))
    if opcode == FUSE_LINK:
        ln = <const fuse_link_in *>take(r, sizeof(fuse_link_in), "link_in")
        return (ln.oldnodeid, take_str(r, STR_NEW, NAME_MAX, "name"))
    if opcode in (FUSE_FSYNC, FUSE_FSYNCDIR):
        fs = <const fuse_fsync_in *>take(r, sizeof(fuse_fsync_in), "fsync_in")
        return (fs.fh, fs.fsync_flags)
    if opcode == FUSE_SETXATTR:
        sx = <const fuse_setxattr_in *>take(
            r, sizeof(fuse_setxattr_in) if setxattr_ext else FUSE_COMPAT_SETXATTR_IN_SIZE,
            "setxattr_in")
        size, flags = sx.size, sx.flags
        name = take_str(r, STR_ANY, XATTR_NAME_MAX, "xattr name")
        if size > XATTR_SIZE_MAX:
            raise ProtocolError(E2BIG, f"xattr value of {size} bytes", r.unique)
        start = r.pos
        take(r, size, "xattr value")
        return (name, flags, bytes(memoryview(buf)[start:start + size]))
    if opcode == FUSE_GETXATTR:
        gx = <const fuse_getxattr_in *>take(r, sizeof(fuse_getxattr_in), "getxattr_in")
        return (gx.size, take_str(r, STR_ANY, XATTR_NAME_MAX, "xattr name"))
    if opcode == FUSE_LISTXATTR:
        return ((<const fuse_getxattr_in *>take(r, sizeof(fuse_getxattr_in), "getxattr_in")).size,)
    if opcode == FUSE_REMOVEXATTR:
        return (take_str(r, STR_ANY, XATTR_NAME_MAX, "xattr name"),)
    if opcode in (FUSE_GETLK, FUSE_SETLK, FUSE_SETLKW):
        lk = <const fuse_lk_in *>take(r, sizeof(fuse_lk_in), "lk_in")
        return (lk.fh, lk.owner, lk.lk.start, lk.lk.end, lk.lk.type, lk.lk.pid, lk.lk_flags)
    if opcode == FUSE_ACCESS:
        return ((<const fuse_access_in *>take(r, sizeof(fuse_access_in), "access_in")).mask,)
    if opcode == FUSE_INIT:
        ini = <const fuse_init_in *>take(r, 16, "init_in")
        flags2 = 0
        if ini.flags & FUSE_INIT_EXT and r.n - r.pos >= 4:
            flags2 = ini.flags2
        return (ini.major, ini.minor, ini.max_readahead, ini.flags | (<uint64_t>flags2 << 32))
    if opcode == FUSE_INTERRUPT:
        return ((<const fuse_interrupt_in *>take(r, sizeof(fuse_interrupt_in),
                                               "interrupt_in")).unique,)
    if opcode == FUSE_FALLOCATE:
        fa = <const fuse_fallocate_in *>take(r, sizeof(fuse_fallocate_in), "fallocate_in")
        return (fa.fh, fa.offset, fa.length, fa.mode)
    if opcode == FUSE_LSEEK:
        ls = <const fuse_lseek_in *>take(r, sizeof(fuse_lseek_in), "lseek_in")
        return (ls.fh, ls.offset, ls.whence)
    if opcode == FUSE_COPY_FILE_RANGE:
        cf = <const fuse_copy_file_range_in *>take(r, sizeof(fuse_copy_file_range_in),
                                                   "copy_file_range_in")
        return (cf.fh_in, cf.off_in, cf.nodeid_out, cf.fh_out, cf.off_out, cf.len, cf.flags)
    return None


def decode(buf, bint setxattr_ext=False):
    """One request -> (opcode, unique, nodeid, uid, gid, pid, args); args is None for an
    opcode this module does not know (the server answers ENOSYS). Raises ProtocolError."""
    cdef const uint8_t[::1] view = buf
    cdef Reader r
    r.n = view.shape[0]
    r.pos = 0
    r.unique = 0
    if r.n < <Py_ssize_t>sizeof(fuse_in_header):
        raise ProtocolError(EINVAL, f"request of {r.n} bytes is shorter than its header")
    r.p = &view[0]
    cdef const fuse_in_header *h = <const fuse_in_header *>take(&r, sizeof(fuse_in_header),
                                                              "in_header")
    r.unique = h.unique
    if h.len != r.n:
        raise ProtocolError(EINVAL, f"header says {h.len} bytes, request has {r.n}", h.unique)
    args = _decode_args(&r, h.opcode, setxattr_ext, buf)
    return (h.opcode, h.unique, h.nodeid, h.uid, h.gid, h.pid, args)


# ---------------------------------------------------------------------------------------------
# Replies

cdef inline void put_header(void *p, uint64_t unique, int error, size_t total) noexcept nogil:
    cdef fuse_out_header *h = <fuse_out_header *>p
    h.len = <uint32_t>total
    h.error = error
    h.unique = unique


cdef inline bytes new_reply(uint64_t unique, size_t payload, char **body):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, sizeof(fuse_out_header) + payload)
    cdef char *p = PyBytes_AS_STRING(out)
    memset(p, 0, sizeof(fuse_out_header) + payload)
    put_header(p, unique, 0, sizeof(fuse_out_header) + payload)
    body[0] = p + sizeof(fuse_out_header)
    return out


def header(uint64_t unique, Py_ssize_t payload_len) -> bytes:
    """The out header of a successful reply whose payload (data) is sent after it."""
    cdef char *body
    out = new_reply(unique, 0, &body)
    put_header(PyBytes_AS_STRING(out), unique, 0, sizeof(fuse_out_header) + payload_len)
    return out


def error_reply(uint64_t unique, int err) -> bytes:
    """A reply carrying -err (err > 0)."""
    cdef char *body
    out = new_reply(unique, 0, &body)
    (<fuse_out_header *>PyBytes_AS_STRING(out)).error = -err
    return out


cdef inline void fill_attr(fuse_attr *a, Stat s, uint32_t uid, uint32_t gid) noexcept:
    fill_attr_st(a, &s.st, uid, gid)      # one layout for Python replies and the fast path


cdef void fill_entry(fuse_entry_out *e, uint64_t nodeid, uint64_t generation, Stat s,
                     uint32_t uid, uint32_t gid, double entry_timeout,
                     double attr_timeout) noexcept:
    e.nodeid = nodeid
    e.generation = generation
    split_time(entry_timeout, &e.entry_valid, &e.entry_valid_nsec)
    split_time(attr_timeout, &e.attr_valid, &e.attr_valid_nsec)
    fill_attr(&e.attr, s, uid, gid)


def entry_reply(uint64_t unique, uint64_t nodeid, uint64_t generation, Stat s not None,
                uint32_t uid, uint32_t gid, double entry_timeout, double attr_timeout) -> bytes:
    """LOOKUP / MKNOD / MKDIR / SYMLINK / LINK reply (fuse_entry_out)."""
    cdef char *body
    out = new_reply(unique, sizeof(fuse_entry_out), &body)
    fill_entry(<fuse_entry_out *>body, nodeid, generation, s, uid, gid, entry_timeout,
               attr_timeout)
    return out


def create_reply(uint64_t unique, uint64_t nodeid, uint64_t generation, Stat s not None,
                 uint32_t uid, uint32_t gid, double entry_timeout, double attr_timeout,
                 uint64_t fh, uint32_t open_flags) -> bytes:
    """CREATE reply: fuse_entry_out then fuse_open_out."""
    cdef char *body
    out = new_reply(unique, sizeof(fuse_entry_out) + sizeof(fuse_open_out), &body)
    fill_entry(<fuse_entry_out *>body, nodeid, generation, s, uid, gid, entry_timeout,
               attr_timeout)
    cdef fuse_open_out *o = <fuse_open_out *>(body + sizeof(fuse_entry_out))
    o.fh = fh
    o.open_flags = open_flags
    return out


def attr_reply(uint64_t unique, Stat s not None, uint32_t uid, uint32_t gid,
               double attr_timeout) -> bytes:
    """GETATTR / SETATTR reply (fuse_attr_out)."""
    cdef char *body
    out = new_reply(unique, sizeof(fuse_attr_out), &body)
    cdef fuse_attr_out *a = <fuse_attr_out *>body
    split_time(attr_timeout, &a.attr_valid, &a.attr_valid_nsec)
    fill_attr(&a.attr, s, uid, gid)
    return out


def open_reply(uint64_t unique, uint64_t fh, uint32_t open_flags) -> bytes:
    cdef char *body
    out = new_reply(unique, sizeof(fuse_open_out), &body)
    (<fuse_open_out *>body).fh = fh
    (<fuse_open_out *>body).open_flags = open_flags
    return out


def write_reply(uint64_t unique, uint32_t size) -> bytes:
    cdef char *body
    out = new_reply(unique, sizeof(fuse_write_out), &body)
    (<fuse_write_out *>body).size = size
    return out


def xattr_size_reply(uint64_t unique, uint32_t size) -> bytes:
    """GETXATTR / LISTXATTR with size 0: how big the value or list is."""
    cdef char *body
    out = new_reply(unique, sizeof(fuse_getxattr_out), &body)
    (<fuse_getxattr_out *>body).size = size
    return out


def lseek_reply(uint64_t unique, uint64_t offset) -> bytes:
    cdef char *body
    out = new_reply(unique, sizeof(fuse_lseek_out), &body)
    (<fuse_lseek_out *>body).offset = offset
    return out


def lk_reply(uint64_t unique, uint64_t start, uint64_t end, uint32_t type,
             uint32_t pid) -> bytes:
    cdef char *body
    out = new_reply(unique, sizeof(fuse_lk_out), &body)
    cdef fuse_lk_out *l = <fuse_lk_out *>body
    l.lk.start, l.lk.end, l.lk.type, l.lk.pid = start, end, type, pid
    return out


def statfs_reply(uint64_t unique, uint64_t blocks, uint64_t bfree, uint64_t bavail,
                 uint64_t files, uint64_t ffree, uint32_t bsize, uint32_t namelen,
                 uint32_t frsize) -> bytes:
    cdef char *body
    out = new_reply(unique, sizeof(fuse_statfs_out), &body)
    cdef fuse_kstatfs *k = &(<fuse_statfs_out *>body).st
    k.blocks, k.bfree, k.bavail, k.files, k.ffree = blocks, bfree, bavail, files, ffree
    k.bsize, k.namelen, k.frsize = bsize, namelen, frsize
    return out


def init_reply(uint64_t unique, uint32_t minor, uint32_t max_readahead, uint64_t flags,
               uint32_t max_background, uint32_t congestion_threshold, uint32_t max_write,
               uint32_t time_gran, uint32_t max_pages) -> bytes:
    """INIT reply; flags bits 32..63 go to flags2 (FUSE_INIT_EXT)."""
    cdef char *body
    out = new_reply(unique, sizeof(fuse_init_out), &body)
    cdef fuse_init_out *o = <fuse_init_out *>body
    o.major = FUSE_KERNEL_VERSION
    o.minor = minor
    o.max_readahead = max_readahead
    o.flags = <uint32_t>flags
    o.flags2 = <uint32_t>(flags >> 32)
    o.max_background = <uint16_t>max_background
    o.congestion_threshold = <uint16_t>congestion_threshold
    o.max_write = max_write
    o.time_gran = time_gran
    o.max_pages = <uint16_t>max_pages
    return out


cdef bytes notify(int code, size_t payload, char **body):
    out = new_reply(0, payload, body)
    (<fuse_out_header *>PyBytes_AS_STRING(out)).error = code
    return out


def notify_inval_inode(uint64_t nodeid, int64_t offset, int64_t length) -> bytes:
    """Drop cached attributes and data [offset, offset+length) (length 0: all) of nodeid."""
    cdef char *body
    out = notify(FUSE_NOTIFY_INVAL_INODE, sizeof(fuse_notify_inval_inode_out), &body)
    cdef fuse_notify_inval_inode_out *n = <fuse_notify_inval_inode_out *>body
    n.ino, n.off, n.len = nodeid, offset, length
    return out


def notify_inval_entry(uint64_t parent, bytes name not None) -> bytes:
    """Drop the cached name `name` in directory `parent`."""
    cdef char *body
    cdef Py_ssize_t n = len(name)
    out = notify(FUSE_NOTIFY_INVAL_ENTRY, sizeof(fuse_notify_inval_entry_out) + n + 1, &body)
    cdef fuse_notify_inval_entry_out *e = <fuse_notify_inval_entry_out *>body
    e.parent, e.namelen, e.flags = parent, <uint32_t>n, 0
    memcpy(body + sizeof(fuse_notify_inval_entry_out), <const char *>name, n)
    return out


def notify_delete(uint64_t parent, uint64_t child, bytes name not None) -> bytes:
    """Tell the client `name` in `parent` (inode `child`) is gone."""
    cdef char *body
    cdef Py_ssize_t n = len(name)
    out = notify(FUSE_NOTIFY_DELETE, sizeof(fuse_notify_delete_out) + n + 1, &body)
    cdef fuse_notify_delete_out *d = <fuse_notify_delete_out *>body
    d.parent, d.child, d.namelen = parent, child, <uint32_t>n
    memcpy(body + sizeof(fuse_notify_delete_out), <const char *>name, n)
    return out


# ---------------------------------------------------------------------------------------------
# READDIRPLUS payloads (the entries come from fs.ops.list_dir).



cdef class DirentPlus:
    """Builds a READDIRPLUS payload: `add()` one entry (nodeid 0 and stat None for entries
    the client must not instantiate, such as '.' and '..'), then `data()`."""
    cdef bytearray buf

    def __cinit__(self):
        self.buf = bytearray()

    def add(self, bytes name not None, uint64_t ino, uint32_t dtype, uint64_t off,
            uint64_t nodeid, Stat s, uint32_t uid, uint32_t gid, double entry_timeout,
            double attr_timeout):
        cdef size_t namelen = len(name)
        cdef size_t rec = align8(FUSE_NAME_OFFSET_DIRENTPLUS + namelen)
        cdef Py_ssize_t start = len(self.buf)
        self.buf.extend(bytes(rec))
        cdef char *p = <char *>self.buf + start
        cdef fuse_direntplus *e = <fuse_direntplus *>p
        if s is not None and nodeid:
            fill_entry(&e.entry_out, nodeid, 0, s, uid, gid, entry_timeout, attr_timeout)
        e.dirent.ino = ino
        e.dirent.off = off
        e.dirent.namelen = <uint32_t>namelen
        e.dirent.type = dtype
        memcpy(p + FUSE_NAME_OFFSET_DIRENTPLUS, <const char *>name, namelen)

    def data(self) -> bytearray:
        return self.buf
