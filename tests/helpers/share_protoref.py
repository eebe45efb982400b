"""A pure-Python reference twin of `hvcore.fs.proto.decode` (as msgpack's `fallback.py`):
the same request layouts (include/uapi/linux/fuse.h) read with `struct`, the same tuples out,
the same `ProtocolError` errnos for malformed input. The unit tests run every decoder case
over both and compare them on random input; the server uses the Cython one."""

from __future__ import annotations

import errno
import struct

from hvcore.fs import proto as fp
from hvcore.fs.proto import ProtocolError

IN_HEADER = struct.Struct("=IIQQIIIHH")
NAME_MAX, PATH_MAX = fp.NAME_MAX, fp.PATH_MAX
XATTR_NAME_MAX, XATTR_SIZE_MAX = fp.XATTR_NAME_MAX, fp.XATTR_SIZE_MAX
ANY, NEW, LOOKUP = 0, 1, 2      # string kinds, as in fs.proto

# Fixed-size request structs: (layout, name in error messages)
GETATTR_IN = struct.Struct("=IIQ")
IO_IN = struct.Struct("=QQIIQII")                 # fuse_read_in, fuse_write_in
OPEN_IN = struct.Struct("=II")
RELEASE_IN = struct.Struct("=QIIQ")
U64 = struct.Struct("=Q")
U32 = struct.Struct("=I")
BATCH_FORGET_IN = struct.Struct("=II")
FORGET_ONE = struct.Struct("=QQ")
CREATE_IN = struct.Struct("=IIII")
FLUSH_IN = struct.Struct("=QIIQ")
SETATTR_IN = struct.Struct("=IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("=IIII")
MKDIR_IN = struct.Struct("=II")
RENAME2_IN = struct.Struct("=QII")
FSYNC_IN = struct.Struct("=QII")
SETXATTR_IN = struct.Struct("=IIII")
SETXATTR_IN_COMPAT = struct.Struct("=II")
GETXATTR_IN = struct.Struct("=II")
LK_IN = struct.Struct("=QQQQIIII")
ACCESS_IN = struct.Struct("=II")
INIT_IN = struct.Struct("=IIII")
FALLOCATE_IN = struct.Struct("=QQQII")
LSEEK_IN = struct.Struct("=QQII")
COPY_FILE_RANGE_IN = struct.Struct("=QQQQQQQ")


class Reader:
    """Bounded reader over one request: every take is checked against what is left."""

    __slots__ = ("buf", "pos", "unique")

    def __init__(self, buf: memoryview, unique: int = 0):
        self.buf, self.pos, self.unique = buf, 0, unique

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> int:
        """Start offset of the next `n` bytes (consumed)."""
        if n < 0 or self.left() < n:
            raise ProtocolError(errno.EINVAL, f"request truncated: {what} needs {n} bytes, "
                                              f"{self.left()} left", self.unique)
        start = self.pos
        self.pos += n
        return start

    def unpack(self, s: struct.Struct, what: str, size: int | None = None) -> tuple:
        return s.unpack_from(self.buf, self.take(s.size if size is None else size, what))

    def string(self, kind: int, limit: int, what: str) -> bytes:
        rest = self.buf[self.pos:].tobytes()
        end = rest.find(b"\0")
        if end < 0:
            raise ProtocolError(errno.EINVAL, f"{what} is not NUL-terminated", self.unique)
        if end == 0:
            raise ProtocolError(errno.EINVAL, f"{what} is empty", self.unique)
        if end > limit:
            err = errno.ERANGE if kind == ANY and what == "xattr name" else errno.ENAMETOOLONG
            raise ProtocolError(err, f"{what} is {end} bytes, more than {limit}", self.unique)
        name = rest[:end]
        if kind != ANY:
            if b"/" in name:
                raise ProtocolError(errno.EINVAL, f"{what} contains '/'", self.unique)
            if kind == NEW and name in (b".", b".."):
                raise ProtocolError(errno.EINVAL, f"{what} is '.' or '..'", self.unique)
        self.pos += end + 1
        return name


def _args(r: Reader, op: int, setxattr_ext: bool, buf: memoryview):   # noqa: C901 (a table)
    if op == fp.LOOKUP:
        return (r.string(LOOKUP, NAME_MAX, "name"),)
    if op in (fp.UNLINK, fp.RMDIR):
        return (r.string(NEW, NAME_MAX, "name"),)
    if op == fp.GETATTR:
        flags, _, fh = r.unpack(GETATTR_IN, "getattr_in")
        return (flags, fh)
    if op in (fp.READ, fp.READDIR, fp.READDIRPLUS):
        return r.unpack(IO_IN, "read_in")[:6]
    if op == fp.WRITE:
        fh, offset, size, write_flags, owner, flags, _ = r.unpack(IO_IN, "write_in")
        start = r.take(size, "write data")
        return (fh, offset, write_flags, owner, flags, buf[start:start + size])
    if op in (fp.OPEN, fp.OPENDIR):
        return r.unpack(OPEN_IN, "open_in")
    if op in (fp.RELEASE, fp.RELEASEDIR):
        return r.unpack(RELEASE_IN, "release_in")
    if op == fp.FORGET:
        return r.unpack(U64, "forget_in")
    if op == fp.BATCH_FORGET:
        count = r.unpack(BATCH_FORGET_IN, "batch_forget_in", 8)[0]
        if count * FORGET_ONE.size > r.left():
            raise ProtocolError(errno.EINVAL, f"batch forget of {count} entries is truncated",
                                r.unique)
        start = r.take(count * FORGET_ONE.size, "forget_one")
        return (list(FORGET_ONE.iter_unpack(buf[start:start + count * FORGET_ONE.size])),)
    if op == fp.CREATE:
        flags, mode, umask, open_flags = r.unpack(CREATE_IN, "create_in")
        return (flags, mode, umask, open_flags, r.string(NEW, NAME_MAX, "name"))
    if op == fp.FLUSH:
        fh, _, _, owner = r.unpack(FLUSH_IN, "flush_in")
        return (fh, owner)
    if op == fp.SETATTR:
        (valid, _, fh, size, owner, atime, mtime, _ctime, atimens, mtimens, _ctimens, mode,
         _, uid, gid, _) = r.unpack(SETATTR_IN, "setattr_in")
        return (valid, fh, size, owner, atime, atimens, mtime, mtimens, mode, uid, gid)
    if op in (fp.READLINK, fp.STATFS, fp.DESTROY, fp.SYNCFS):
        return ()
    if op == fp.SYMLINK:
        name = r.string(NEW, NAME_MAX, "name")
        return (name, r.string(ANY, PATH_MAX - 1, "symlink target"))
    if op == fp.MKNOD:
        mode, rdev, umask, _ = r.unpack(MKNOD_IN, "mknod_in")
        return (mode, rdev, umask, r.string(NEW, NAME_MAX, "name"))
    if op == fp.MKDIR:
        mode, umask = r.unpack(MKDIR_IN, "mkdir_in")
        return (mode, umask, r.string(NEW, NAME_MAX, "name"))
    if op in (fp.RENAME, fp.RENAME2):
        if op == fp.RENAME:
            newdir, flags = r.unpack(U64, "rename_in")[0], 0
        else:
            newdir, flags, _ = r.unpack(RENAME2_IN, "rename2_in")
        old = r.string(NEW, NAME_MAX, "old name")
        return (newdir, flags, old, r.string(NEW, NAME_MAX, "new name"))
    if op == fp.LINK:
        old = r.unpack(U64, "link_in")[0]
        return (old, r.string(NEW, NAME_MAX, "name"))
    if op in (fp.FSYNC, fp.FSYNCDIR):
        return r.unpack(FSYNC_IN, "fsync_in")[:2]
    if op == fp.SETXATTR:
        size, flags = r.unpack(SETXATTR_IN if setxattr_ext else SETXATTR_IN_COMPAT,
                               "setxattr_in")[:2]
        name = r.string(ANY, XATTR_NAME_MAX, "xattr name")
        if size > XATTR_SIZE_MAX:
            raise ProtocolError(errno.E2BIG, f"xattr value of {size} bytes", r.unique)
        start = r.take(size, "xattr value")
        return (name, flags, bytes(buf[start:start + size]))
    if op == fp.GETXATTR:
        size = r.unpack(GETXATTR_IN, "getxattr_in")[0]
        return (size, r.string(ANY, XATTR_NAME_MAX, "xattr name"))
    if op == fp.LISTXATTR:
        return (r.unpack(GETXATTR_IN, "getxattr_in")[0],)
    if op == fp.REMOVEXATTR:
        return (r.string(ANY, XATTR_NAME_MAX, "xattr name"),)
    if op in (fp.GETLK, fp.SETLK, fp.SETLKW):
        fh, owner, start, end, ltype, pid, lk_flags, _ = r.unpack(LK_IN, "lk_in")
        return (fh, owner, start, end, ltype, pid, lk_flags)
    if op == fp.ACCESS:
        return (r.unpack(ACCESS_IN, "access_in")[0],)
    if op == fp.INIT:
        major, minor, readahead, flags = r.unpack(INIT_IN, "init_in")
        flags2 = 0
        if flags & fp.INIT_FLAGS["INIT_EXT"] and r.left() >= 4:
            flags2 = U32.unpack_from(buf, r.pos)[0]
        return (major, minor, readahead, flags | flags2 << 32)
    if op == fp.INTERRUPT:
        return r.unpack(U64, "interrupt_in")
    if op == fp.FALLOCATE:
        return r.unpack(FALLOCATE_IN, "fallocate_in")[:4]
    if op == fp.LSEEK:
        return r.unpack(LSEEK_IN, "lseek_in")[:3]
    if op == fp.COPY_FILE_RANGE:
        return r.unpack(COPY_FILE_RANGE_IN, "copy_file_range_in")
    return None


def decode(buf, setxattr_ext: bool = False) -> tuple:
    """Same contract as `hvcore.fs.proto.decode`."""
    view = memoryview(buf).cast("B")
    if len(view) < IN_HEADER.size:
        raise ProtocolError(errno.EINVAL,
                            f"request of {len(view)} bytes is shorter than its header")
    length, opcode, unique, nodeid, uid, gid, pid, _, _ = IN_HEADER.unpack_from(view)
    if length != len(view):
        raise ProtocolError(errno.EINVAL, f"header says {length} bytes, request has "
                                          f"{len(view)}", unique)
    r = Reader(view, unique)
    r.take(IN_HEADER.size, "in_header")
    return (opcode, unique, nodeid, uid, gid, pid, _args(r, opcode, setxattr_ext, view))
