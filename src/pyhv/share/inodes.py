"""The inode table: every host inode the client holds is one O_PATH descriptor.

A nodeid is handed out once per host inode ((st_dev, st_ino) while we hold its descriptor,
so hard links share one) and never reused, so nodeid + generation 0 is unique for the life
of the mount. Lookups are one path component relative to the parent's descriptor through
openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS): a symlink is returned as itself, never
followed, and '..' cannot climb out; '..' at the share's root is the root.
"""

from __future__ import annotations

import errno
import os
import stat as st_
import threading
from dataclasses import dataclass, field

from hvcore import fsops as fs
from hvcore import fuseproto as fp

O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(eq=False)
class Inode:
    nodeid: int
    fd: int                       # O_PATH descriptor
    dev: int
    ino: int
    mode: int                     # S_IFMT bits only (the type never changes)
    nlookup: int = 0
    wd: int = -1                  # inotify watch on a directory (watch.py)
    stamp: tuple | None = None    # Stat.stamp after the server's own last change
    lock_fds: dict = field(default_factory=dict)   # POSIX lock owner -> OFD descriptor
    lock_pids: dict = field(default_factory=dict)  # POSIX lock owner -> client pid

    @property
    def proc_path(self) -> str:
        """Reopen / xattr path for this descriptor (follows only our own magic link)."""
        return f"/proc/self/fd/{self.fd}"

    @property
    def is_dir(self) -> bool:
        return st_.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return st_.S_ISLNK(self.mode)


class InodeTable:
    def __init__(self, root: str):
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        s = fs.lstat_at(fd, b"")
        self.root = Inode(fp.ROOT_ID, fd, s.dev, s.ino, st_.S_IFDIR, nlookup=1 << 62)
        self._by_id: dict[int, Inode] = {fp.ROOT_ID: self.root}
        self._by_key: dict[tuple[int, int], Inode] = {(s.dev, s.ino): self.root}
        self._next = fp.ROOT_ID + 1
        self._lock = threading.Lock()
        self.on_new_dir = None      # callable(Inode), set by the host watch
        self.on_drop = None         # callable(Inode)

    def get(self, nodeid: int) -> Inode:
        try:
            return self._by_id[nodeid]
        except KeyError:
            raise OSError(errno.ESTALE, f"unknown nodeid {nodeid}") from None

    def __len__(self) -> int:
        return len(self._by_id)

    def open_child(self, parent: Inode, name: bytes) -> int:
        """O_PATH descriptor of `name` in `parent`, never outside the share."""
        if name == b".":
            return os.dup(parent.fd)
        if name == b"..":
            if parent is self.root:
                return os.dup(self.root.fd)
            fd = os.open("..", O_PATH_FLAGS, dir_fd=parent.fd)
            if not self._inside(fd):
                os.close(fd)
                raise OSError(errno.EACCES, "'..' leads outside the share")
            return fd
        return fs.open_beneath(parent.fd, name, O_PATH_FLAGS)

    def _inside(self, fd: int) -> bool:
        """Whether a directory descriptor is the root or below it (walks '..' upwards)."""
        key = (self.root.dev, self.root.ino)
        cur = os.dup(fd)
        try:
            for _ in range(4096):
                s = os.stat(cur)
                if (s.st_dev, s.st_ino) == key:
                    return True
                up = os.open("..", O_PATH_FLAGS, dir_fd=cur)
                u = os.stat(up)
                os.close(cur)
                cur = up
                if (u.st_dev, u.st_ino) == (s.st_dev, s.st_ino):
                    return False      # reached the host's /
            return False
        finally:
            os.close(cur)

    def lookup(self, parent: Inode, name: bytes) -> tuple[Inode, fs.Stat]:
        """Resolve one component and count one lookup (the client will FORGET it)."""
        fd = self.open_child(parent, name)
        try:
            s = fs.lstat_at(fd, b"")
        except OSError:
            os.close(fd)
            raise
        return self.adopt(fd, s), s

    def adopt(self, fd: int, s: fs.Stat) -> Inode:
        """Take ownership of an O_PATH descriptor for a looked-up or new inode (+1 lookup)."""
        key = (s.dev, s.ino)
        new = None
        with self._lock:
            node = self._by_key.get(key)
            if node is None:
                node = Inode(self._next, fd, s.dev, s.ino, st_.S_IFMT(s.mode))
                self._next += 1
                self._by_id[node.nodeid] = node
                self._by_key[key] = node
                new = node
            node.nlookup += 1
        if new is None:
            os.close(fd)
        elif new.is_dir and self.on_new_dir is not None:
            self.on_new_dir(new)
        return node

    def forget(self, nodeid: int, count: int) -> None:
        with self._lock:
            node = self._by_id.get(nodeid)
            if node is None or node is self.root:
                return
            node.nlookup -= count
            if node.nlookup > 0:
                return
            del self._by_id[nodeid]
            if self._by_key.get((node.dev, node.ino)) is node:
                del self._by_key[(node.dev, node.ino)]
        self._close(node)

    def _close(self, node: Inode) -> None:
        if self.on_drop is not None:
            self.on_drop(node)
        for fd in node.lock_fds.values():
            os.close(fd)
        node.lock_fds.clear()
        os.close(node.fd)

    def find(self, dev: int, ino: int) -> Inode | None:
        return self._by_key.get((dev, ino))

    def close(self) -> None:
        with self._lock:
            nodes = list(self._by_id.values())
            self._by_id.clear()
            self._by_key.clear()
        for node in nodes:
            self._close(node)
