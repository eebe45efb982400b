"""GETLK / SETLK / SETLKW (POSIX record locks and flock) and INTERRUPT of a waiting lock.

POSIX locks belong to a lock owner (a client process), not to a file handle: each (inode,
owner) gets its own open file description and the locks are OFD locks on it, so two owners
conflict, one owner's descriptors share its locks, and FLUSH (close) drops them all. flock
locks belong to the open file, so they go on the handle's own descriptor. Waiting (SETLKW)
polls with back-off instead of blocking a thread in the kernel, so INTERRUPT can end it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading

from hvcore.fs import proto as fp

FLOCK = struct.Struct("=hhxxxxqqixxxx")     # struct flock on x86-64 / aarch64 (32 bytes)
OFFSET_MAX = (1 << 63) - 1
BUSY = (errno.EAGAIN, errno.EACCES)
_owner_lock = threading.Lock()


def _flock_arg(ltype: int, start: int, end: int) -> bytes:
    if start > OFFSET_MAX or end < start:
        raise OSError(errno.EINVAL, f"lock range {start}..{end}")
    length = 0 if end >= OFFSET_MAX else end - start + 1
    return FLOCK.pack(ltype, os.SEEK_SET, start, length, 0)


class LockOps:
    def _lock_fd(self, node, owner: int) -> int:
        locks = node.locks
        fd = locks.fds.get(owner)
        if fd is not None:
            return fd
        if node.is_symlink or node.is_dir:
            raise OSError(errno.EINVAL, "POSIX lock on a symlink or directory")
        try:
            fd = os.open(node.proc_path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            fd = os.open(node.proc_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        with _owner_lock:
            kept = locks.fds.setdefault(owner, fd)
        if kept != fd:
            os.close(fd)
        return kept

    def _drop_posix_locks(self, node, owner: int) -> None:
        locks = self.inodes.existing_locks(node)
        if locks is None:
            return
        with _owner_lock:
            fd = locks.fds.pop(owner, None)
            locks.pids.pop(owner, None)
        if fd is not None:
            os.close(fd)          # closing the description drops every lock it holds
        self.inodes.drop_locks_if_unused(node)

    def _op_getlk(self, unique, nodeid, args, ctx):
        fh, owner, start, end, ltype, _pid, lk_flags = args
        node = self.inodes.get(nodeid)
        if lk_flags & fp.LK_FLOCK:
            raise OSError(errno.EINVAL, "GETLK of a flock lock")
        res = fcntl.fcntl(self._lock_fd(node, owner), fcntl.F_OFD_GETLK,
                          _flock_arg(ltype, start, end))
        rtype, _whence, rstart, rlen, _ = FLOCK.unpack(res)
        if rtype == fcntl.F_UNLCK:
            return [fp.lk_reply(unique, 0, 0, fcntl.F_UNLCK, 0)]
        others = [p for o, p in node.locks.pids.items() if o != owner]
        pid = others[0] if len(others) == 1 else 0
        rend = OFFSET_MAX if rlen == 0 else rstart + rlen - 1
        return [fp.lk_reply(unique, rstart, rend, rtype, pid)]

    def _op_setlk(self, unique, nodeid, args, ctx):
        return self._setlk(unique, nodeid, args, wait=False)

    def _op_setlkw(self, unique, nodeid, args, ctx):
        return self._setlk(unique, nodeid, args, wait=True)

    def _setlk(self, unique, nodeid, args, wait: bool):
        fh, owner, start, end, ltype, pid, lk_flags = args
        node = self.inodes.get(nodeid)
        if ltype not in (fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK):
            raise OSError(errno.EINVAL, f"lock type {ltype}")
        if lk_flags & fp.LK_FLOCK:
            fd = self._handle(fh).fd
            op = {fcntl.F_RDLCK: fcntl.LOCK_SH, fcntl.F_WRLCK: fcntl.LOCK_EX}.get(ltype,
                                                                                fcntl.LOCK_UN)

            def attempt():
                fcntl.flock(fd, op | (fcntl.LOCK_NB if op != fcntl.LOCK_UN else 0))
        else:
            held = self.inodes.existing_locks(node)
            if ltype == fcntl.F_UNLCK and (held is None or owner not in held.fds):
                return [fp.error_reply(unique, 0)]
            arg = _flock_arg(ltype, start, end)
            fd = self._lock_fd(node, owner)

            def attempt():
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg)
                if ltype != fcntl.F_UNLCK:
                    node.locks.pids[owner] = pid
        if wait:
            self._wait_for(unique, attempt)
        else:
            attempt()
        return [fp.error_reply(unique, 0)]

    def _wait_for(self, unique: int, attempt) -> None:
        event = threading.Event()
        self._waiting[unique] = event
        try:
            delay = 0.001
            while True:
                try:
                    attempt()
                    return
                except OSError as e:
                    if e.errno not in BUSY:
                        raise
                if event.wait(delay):
                    raise OSError(errno.EINTR, "interrupted")
                delay = min(delay * 2, 0.05)
        finally:
            self._waiting.pop(unique, None)
