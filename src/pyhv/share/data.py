"""File data: OPEN, CREATE, READ, WRITE, FLUSH, FSYNC, RELEASE, FALLOCATE, LSEEK,
COPY_FILE_RANGE. Files are opened by reopening the inode's O_PATH descriptor through
/proc/self/fd (never by name), so a rename race cannot redirect an open."""

from __future__ import annotations

import errno
import os
import stat as st_

from hvcore.fs import ops as fs
from hvcore.fs import proto as fp
from pyhv.share.meta import kill_suidgid

# Flags the client may pass that make no sense on a reopen (or would follow our magic link).
DROP_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_DIRECT
MAX_OFFSET = (1 << 63) - 1
SEEK_DATA, SEEK_HOLE = 3, 4


class DataOps:
    def _open_flags(self, flags: int) -> int:
        flags = (flags & ~DROP_FLAGS) | os.O_CLOEXEC
        if self.opts.readonly and (flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC):
            raise OSError(errno.EROFS, "read-only share")
        if self.negotiated & fp.INIT_FLAGS["WRITEBACK_CACHE"]:
            # the kernel reads pages around partial writes and appends itself
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            flags &= ~os.O_APPEND
        return flags

    def _op_open(self, unique, nodeid, args, ctx):
        flags, open_flags = args
        node = self.inodes.get(nodeid)
        if node.is_dir:
            raise OSError(errno.EISDIR, "open of a directory")
        if node.is_symlink:
            raise OSError(errno.ELOOP, "open of a symlink")     # never followed here
        fd = os.open(node.proc_path, self._open_flags(flags))
        keep = 0
        try:
            if open_flags & fp.OPEN_KILL_SUIDGID and flags & os.O_TRUNC:
                kill_suidgid(fd)
            if flags & os.O_TRUNC:
                self._stamp(node, fd)
            elif self.policy.close_to_open and self.inodes.c.keep_cache(
                    node.nodeid, fs.lstat_at(fd, b"")):
                keep = fp.FOPEN["KEEP_CACHE"]       # (pyhv.share.options: close-to-open)
        except OSError:
            os.close(fd)
            raise
        return [fp.open_reply(unique, self._new_handle(fd, node),
                              self.policy.open_flags | keep)]

    def _op_create(self, unique, nodeid, args, ctx):
        flags, mode, _umask, _open_flags, name = args
        parent = self.inodes.get(nodeid)
        flags = self._open_flags(flags) | os.O_CREAT | (flags & os.O_EXCL)
        self._expect(parent, name)
        fd = fs.open_beneath(parent.fd, name, flags, st_.S_IMODE(mode))
        try:
            pfd = os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
        except OSError:
            os.close(fd)
            raise
        try:
            self._chown_created(pfd, parent, ctx, mode)
            s = fs.lstat_at(pfd, b"")
        except OSError:
            os.close(pfd)
            os.close(fd)
            raise
        node = self.inodes.adopt(pfd, s)
        self._stamp(node, s=s)
        fh = self._new_handle(fd, node)
        uid, gid = self._ids_out(s, ctx)
        p = self.policy
        return [fp.create_reply(unique, node.nodeid, 0, s, uid, gid, p.entry_timeout,
                                p.attr_timeout, fh, p.open_flags)]

    def _op_read(self, unique, nodeid, args, ctx):
        fh, offset, size = args[0], args[1], args[2]
        if size > self.opts.max_write or offset > MAX_OFFSET:
            raise OSError(errno.EINVAL, f"read of {size} bytes at {offset}")
        data = os.pread(self._handle(fh).fd, size, offset)
        return [fp.header(unique, len(data)), data]

    def _op_write(self, unique, nodeid, args, ctx):
        fh, offset, write_flags, _owner, _flags, data = args
        if offset > MAX_OFFSET or offset + len(data) > MAX_OFFSET:
            raise OSError(errno.EFBIG, f"write at {offset}")
        h = self._handle(fh)
        if write_flags & fp.WRITE_KILL_SUIDGID:
            kill_suidgid(h.fd)
        n = os.pwrite(h.fd, data, offset)
        self.files.mark_written(fh)     # stamped at RELEASE, before the close the watch sees
        return [fp.write_reply(unique, n)]

    def _op_flush(self, unique, nodeid, args, ctx):
        fh, lock_owner = args
        h = self._handle(fh)
        self._drop_posix_locks(h.inode, lock_owner)
        if self.files.written(fh):          # the close: the next open may come before
            self._stamp(h.inode, h.fd)      # RELEASE, which the kernel sends async
        return [fp.error_reply(unique, 0)]

    def _op_release(self, unique, nodeid, args, ctx):
        fh, _flags, release_flags, lock_owner = args
        try:
            h = self._handle(fh)
        except OSError:
            return [fp.error_reply(unique, 0)]
        if release_flags & fp.RELEASE_FLUSH:
            self._drop_posix_locks(h.inode, lock_owner)
        if self.files.written(fh):
            self._stamp(h.inode, h.fd)
        self._close_handle(fh)             # closing also drops its flock locks
        return [fp.error_reply(unique, 0)]

    def _op_fsync(self, unique, nodeid, args, ctx):
        fh, flags = args
        fd = self._handle(fh).fd
        os.fdatasync(fd) if flags & fp.FSYNC_FDATASYNC else os.fsync(fd)
        return [fp.error_reply(unique, 0)]

    def _op_fallocate(self, unique, nodeid, args, ctx):
        fh, offset, length, mode = args
        if offset > MAX_OFFSET or length > MAX_OFFSET or length == 0:
            raise OSError(errno.EINVAL, f"fallocate {offset}+{length}")
        h = self._handle(fh)
        fs.fallocate_fd(h.fd, mode, offset, length)
        self._stamp(h.inode, h.fd)
        return [fp.error_reply(unique, 0)]

    def _op_lseek(self, unique, nodeid, args, ctx):
        fh, offset, whence = args
        if offset > MAX_OFFSET:
            raise OSError(errno.ENXIO, f"seek to {offset}")
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, SEEK_DATA, SEEK_HOLE):
            raise OSError(errno.EINVAL, f"whence {whence}")
        return [fp.lseek_reply(unique, os.lseek(self._handle(fh).fd, offset, whence))]

    def _op_copy_file_range(self, unique, nodeid, args, ctx):
        fh_in, off_in, _nodeid_out, fh_out, off_out, length, flags = args
        if flags:
            raise OSError(errno.EINVAL, f"copy_file_range flags {flags:#x}")
        if max(off_in, off_out) > MAX_OFFSET:
            raise OSError(errno.EINVAL, "copy_file_range offset")
        src, dst = self._handle(fh_in), self._handle(fh_out)
        n = os.copy_file_range(src.fd, dst.fd, min(length, 1 << 30), off_in, off_out)
        self._stamp(dst.inode, dst.fd)
        return [fp.write_reply(unique, n)]
