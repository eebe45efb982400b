"""Names and attributes: LOOKUP, GETATTR, SETATTR, MKNOD, MKDIR, SYMLINK, LINK, UNLINK, RMDIR,
RENAME(2), READLINK, STATFS, ACCESS, xattrs and directory listings. Every name is one path
component (checked by the decoder) resolved relative to its parent's O_PATH descriptor."""

from __future__ import annotations

import errno
import os
import stat as st_

from hvcore.fs import ops as fs
from hvcore.fs import proto as fp
from pyhv.share.idmap import UNCHANGED

FA = fp.FATTR
RENAME_FLAGS = 1 | 2        # RENAME_NOREPLACE | RENAME_EXCHANGE (no WHITEOUT)
UTIME_NOW = (1 << 30) - 1


def kill_suidgid(fd_or_path) -> None:
    """Clear setuid, and setgid when group-executable, as the kernel does on write/truncate."""
    mode = os.stat(fd_or_path).st_mode
    new = mode & ~st_.S_ISUID
    if mode & st_.S_IXGRP:
        new &= ~st_.S_ISGID
    if new != mode:
        os.chmod(fd_or_path, st_.S_IMODE(new))


def decode_rdev(rdev: int) -> int:
    """The client's 32-bit new_encode_dev form -> a host dev_t."""
    return os.makedev((rdev & 0xFFF00) >> 8, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00))


class MetaOps:
    # --- lookups and attributes ----------------------------------------------------------

    def _op_lookup(self, unique, nodeid, args, ctx):
        node, s = self.inodes.lookup(self.inodes.get(nodeid), args[0])
        return self._entry(unique, node, s, ctx)

    def _op_getattr(self, unique, nodeid, args, ctx):
        node = self.inodes.get(nodeid)
        return self._attr(unique, fs.lstat_at(node.fd, b""), ctx)

    def _op_setattr(self, unique, nodeid, args, ctx):
        valid, fh, size, _owner, atime, atimens, mtime, mtimens, mode, uid, gid = args
        node = self.inodes.get(nodeid)
        info = self.files.info(fh) if valid & FA["FH"] else None
        fd = info[0] if info is not None else None
        path = node.proc_path
        if valid & FA["MODE"]:
            if node.is_symlink:
                raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
            os.chmod(fd if fd is not None else path, st_.S_IMODE(mode))
        if valid & (FA["UID"] | FA["GID"]):
            hu = self.idmap.uid.to_host(uid) if valid & FA["UID"] else UNCHANGED
            hg = self.idmap.gid.to_host(gid) if valid & FA["GID"] else UNCHANGED
            fs.chown_fd(node.fd, hu, hg)     # the host kernel clears setuid/setgid itself
        if valid & FA["SIZE"]:
            if node.is_dir:
                raise OSError(errno.EISDIR, "truncate of a directory")
            if node.is_symlink:
                raise OSError(errno.EINVAL, "truncate of a symlink")
            os.truncate(fd if fd is not None else path, size)
            if valid & FA["KILL_SUIDGID"]:
                kill_suidgid(fd if fd is not None else path)
        if valid & (FA["ATIME"] | FA["MTIME"]):
            self._utimes(node, valid, atime, atimens, mtime, mtimens)
        s = fs.lstat_at(node.fd, b"")
        self._stamp(node, s=s)
        return self._attr(unique, s, ctx)

    def _utimes(self, node, valid, atime, atimens, mtime, mtimens):
        """The times asked for (a symlink's own too); those not asked for stay."""
        def when(field: str, sec: int, nsec: int) -> int:
            if not valid & FA[field]:
                return -1                                   # unchanged
            return -2 if valid & FA[field + "_NOW"] else sec * 1_000_000_000 + nsec
        fs.utimes_fd(node.fd, when("ATIME", atime, atimens), when("MTIME", mtime, mtimens))

    def _op_readlink(self, unique, nodeid, args, ctx):
        node = self.inodes.get(nodeid)
        if not node.is_symlink:
            raise OSError(errno.EINVAL, "not a symlink")
        target = os.readlink(b"", dir_fd=node.fd)      # readlinkat(fd, "") on O_PATH
        return [fp.header(unique, len(target)), target]

    def _op_statfs(self, unique, nodeid, args, ctx):
        v = os.statvfs(self.inodes.get(nodeid).fd)
        return [fp.statfs_reply(unique, v.f_blocks, v.f_bfree, v.f_bavail, v.f_files,
                                v.f_ffree, v.f_bsize, v.f_namemax, v.f_frsize)]

    def _op_access(self, unique, nodeid, args, ctx):
        mask = args[0]
        s = fs.lstat_at(self.inodes.get(nodeid).fd, b"")
        if mask & os.W_OK and self.opts.readonly:
            raise OSError(errno.EROFS, "read-only share")
        uid, gid = self._ids_out(s, ctx)
        if ctx[0] == 0:
            if mask & os.X_OK and not (s.mode & 0o111 or st_.S_ISDIR(s.mode)):
                raise OSError(errno.EACCES, "not executable")
            return [fp.error_reply(unique, 0)]
        shift = 6 if ctx[0] == uid else 3 if ctx[1] == gid else 0
        if (mask & 7) & ~((s.mode >> shift) & 7):
            raise OSError(errno.EACCES, "permission denied")
        return [fp.error_reply(unique, 0)]

    # --- new names --------------------------------------------------------------------------

    def _new_entry(self, unique, parent, name, ctx, mode=0):
        """Adopt a name just created in `parent`, owned by the caller (mapped to the host)."""
        fd = self.inodes.open_child(parent, name)
        try:
            self._chown_created(fd, parent, ctx, mode)
            s = fs.lstat_at(fd, b"")
        except OSError:
            os.close(fd)
            raise
        node = self.inodes.adopt(fd, s)
        self._stamp(node, s=s)
        return self._entry(unique, node, s, ctx)

    def _chown_created(self, fd, parent, ctx, mode) -> None:
        """A root server creates as root: hand the new inode to the caller's (mapped) ids."""
        if os.geteuid() != 0:
            return
        hu = self.idmap.uid.to_host(ctx[0])
        hg = self.idmap.gid.to_host(ctx[1])
        if hu in (0, UNCHANGED) and hg in (0, UNCHANGED):
            return                          # created as root already
        if fs.lstat_at(parent.fd, b"").mode & st_.S_ISGID:
            hg = UNCHANGED                  # setgid directory: its group wins
        fs.chown_fd(fd, hu, hg)
        if mode & 0o6000 and not st_.S_ISDIR(mode) and not st_.S_ISLNK(mode):
            os.chmod(f"/proc/self/fd/{fd}", st_.S_IMODE(mode))   # chown cleared them

    def _op_mknod(self, unique, nodeid, args, ctx):
        mode, rdev, _umask, name = args
        kind = st_.S_IFMT(mode)
        if kind in (st_.S_IFCHR, st_.S_IFBLK) and not self.opts.allow_devices:
            raise OSError(errno.EPERM, "device nodes need --allow-devices")
        if kind not in (st_.S_IFREG, st_.S_IFIFO, st_.S_IFSOCK, st_.S_IFCHR, st_.S_IFBLK, 0):
            raise OSError(errno.EINVAL, f"mknod of type {kind:#o}")
        parent = self.inodes.get(nodeid)
        self._expect(parent, name)
        os.mknod(name, mode, decode_rdev(rdev), dir_fd=parent.fd)
        return self._new_entry(unique, parent, name, ctx, mode)

    def _op_mkdir(self, unique, nodeid, args, ctx):
        mode, _umask, name = args
        parent = self.inodes.get(nodeid)
        self._expect(parent, name)
        os.mkdir(name, st_.S_IMODE(mode), dir_fd=parent.fd)
        return self._new_entry(unique, parent, name, ctx, st_.S_IFDIR)

    def _op_symlink(self, unique, nodeid, args, ctx):
        name, target = args
        parent = self.inodes.get(nodeid)
        self._expect(parent, name)
        os.symlink(target, name, dir_fd=parent.fd)
        return self._new_entry(unique, parent, name, ctx)

    def _op_link(self, unique, nodeid, args, ctx):
        oldnodeid, name = args
        old, parent = self.inodes.get(oldnodeid), self.inodes.get(nodeid)
        if old.is_dir:
            raise OSError(errno.EPERM, "hard link to a directory")
        self._expect(parent, name)
        os.link(old.proc_path, name, dst_dir_fd=parent.fd, follow_symlinks=True)
        node, s = self.inodes.lookup(parent, name)
        return self._entry(unique, node, s, ctx)

    def _op_unlink(self, unique, nodeid, args, ctx):
        parent = self.inodes.get(nodeid)
        self._expect(parent, args[0])
        os.unlink(args[0], dir_fd=parent.fd)
        return [fp.error_reply(unique, 0)]

    def _op_rmdir(self, unique, nodeid, args, ctx):
        parent = self.inodes.get(nodeid)
        self._expect(parent, args[0])
        os.rmdir(args[0], dir_fd=parent.fd)
        return [fp.error_reply(unique, 0)]

    def _op_rename(self, unique, nodeid, args, ctx):
        newdir, flags, old, new = args
        if flags & ~RENAME_FLAGS:
            raise OSError(errno.EINVAL, f"rename flags {flags:#x}")
        src, dst = self.inodes.get(nodeid), self.inodes.get(newdir)
        self._expect(src, old)
        self._expect(dst, new)
        fs.rename_at(src.fd, old, dst.fd, new, flags)
        return [fp.error_reply(unique, 0)]

    _op_rename2 = _op_rename

    # --- extended attributes ------------------------------------------------------------------

    def _xattr_path(self, nodeid):
        node = self.inodes.get(nodeid)
        if node.is_symlink or not (node.is_dir or st_.S_ISREG(node.mode)):
            return None        # xattrs of the magic link would be /proc's, not the file's
        return node.proc_path

    def _op_getxattr(self, unique, nodeid, args, ctx):
        size, name = args
        path = self._xattr_path(nodeid)
        if path is None:
            raise OSError(errno.ENODATA, "no xattrs on this file type")
        value = os.getxattr(path, name)
        if size == 0:
            return [fp.xattr_size_reply(unique, len(value))]
        if len(value) > size:
            raise OSError(errno.ERANGE, "xattr value larger than the buffer")
        return [fp.header(unique, len(value)), value]

    def _op_listxattr(self, unique, nodeid, args, ctx):
        path = self._xattr_path(nodeid)
        names = os.listxattr(path) if path is not None else []
        data = b"".join(os.fsencode(n) + b"\0" for n in names)
        if args[0] == 0:
            return [fp.xattr_size_reply(unique, len(data))]
        if len(data) > args[0]:
            raise OSError(errno.ERANGE, "xattr list larger than the buffer")
        return [fp.header(unique, len(data)), data]

    def _op_setxattr(self, unique, nodeid, args, ctx):
        name, flags, value = args
        path = self._xattr_path(nodeid)
        if path is None:
            raise OSError(errno.EPERM, "no xattrs on this file type")
        os.setxattr(path, name, value, flags)
        return [fp.error_reply(unique, 0)]

    def _op_removexattr(self, unique, nodeid, args, ctx):
        path = self._xattr_path(nodeid)
        if path is None:
            raise OSError(errno.ENODATA, "no xattrs on this file type")
        os.removexattr(path, args[0])
        return [fp.error_reply(unique, 0)]

    # --- directories ----------------------------------------------------------------------

    def _op_opendir(self, unique, nodeid, args, ctx):
        node = self.inodes.get(nodeid)
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=node.fd)
        return [fp.open_reply(unique, self._new_handle(fd, node),
                              self.policy.dir_open_flags)]

    def _op_readdir(self, unique, nodeid, args, ctx):
        fh, offset, size = args[0], args[1], args[2]
        h = self._handle(fh)
        with self.listing:
            data = fs.read_dir(h.fd, offset, min(size, self.opts.max_write))
        return [fp.header(unique, len(data)), data]

    def _op_readdirplus(self, unique, nodeid, args, ctx):
        fh, offset, size = args[0], args[1], args[2]
        h = self._handle(fh)
        out = fp.DirentPlus()
        p = self.policy
        with self.listing:
            entries = fs.list_dir(h.fd, offset, min(size, self.opts.max_write))
        known, dev = self.inodes.c.find, h.inode.dev
        for name, ino, dtype, off in entries:
            # nodeid 0: a plain entry, no attributes. For '.' and '..', and for inodes the
            # client already holds (it looked them up; `git status` lstats every file before
            # it reads the directories): a lookup here would only repeat that work.
            if name == b"." or name == b".." or known(dev, ino):
                out.add(name, ino, dtype, off, 0, None, 0, 0, 0.0, 0.0)
                continue
            try:
                node, s = self.inodes.lookup(h.inode, name)
            except OSError:
                continue          # gone since getdents
            uid, gid = self._ids_out(s, ctx)
            out.add(name, s.ino, dtype, off, node.nodeid, s, uid, gid, p.entry_timeout,
                    p.attr_timeout)
        data = out.data()
        return [fp.header(unique, len(data)), data]

    def _op_releasedir(self, unique, nodeid, args, ctx):
        self._close_handle(args[0])
        return [fp.error_reply(unique, 0)]

    def _op_fsyncdir(self, unique, nodeid, args, ctx):
        os.fsync(self._handle(args[0]).fd)
        return [fp.error_reply(unique, 0)]
