"""The inode table: every host inode the client holds, named by a file handle.

The table itself is C (`hvcore.fs.inodes.NodeTable`), so the fast path (`hvcore.fs.fastpath`)
answers LOOKUP, GETATTR, FORGET, OPEN, CREATE, ... without Python; this module is its Python
face for the handlers that stay in Python, and keeps what only Python uses (POSIX lock
descriptors).

As virtiofsd's `--inode-file-handles`: each inode keeps a file handle (name_to_handle_at) and
its O_PATH descriptor lives only in a bounded LRU cache, reopened with open_by_handle_at when
needed, so a client that knows more inodes than RLIMIT_NOFILE allows is served. Opening by
handle needs CAP_DAC_READ_SEARCH (root); otherwise, or on a file system without handles,
every inode keeps its O_PATH descriptor for as long as the client knows it (so a non-root
server can hold about RLIMIT_NOFILE inodes; `pyhv share serve` raises the soft limit to the
hard one).

A descriptor in use is pinned: `node.fd` pins it for the current request (`begin()` /
`end()` around each request; the cache never closes a pinned descriptor), and an open
file or directory holds its inode's descriptor until RELEASE (`hold` / `unhold`), so an
unlinked file that is still open keeps working.

A nodeid is handed out once per host inode ((st_dev, st_ino), and the same file handle, so
hard links share one and a reused inode number gets a new one) and never reused, so nodeid +
generation 0 is unique for the life of the mount. Lookups are one path component relative to
the parent's descriptor through openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS): a symlink is
returned as itself, never followed, and '..' cannot climb out; '..' at the share's root is the
root. A file handle only ever reopens the inode it was taken from (ESTALE once deleted).
"""

from __future__ import annotations

import errno
import os
import resource
import stat as st_
import threading

from hvcore.fs import lookup as fslookup
from hvcore.fs import ops as fs
from hvcore.fs import proto as fp
from hvcore.fs.inodes import NodeTable

O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
FD_CACHE_MIN, FD_CACHE_MAX = 32, 65536


def default_fd_cache() -> int:
    """A quarter of RLIMIT_NOFILE: the rest is for open files, /dev/fuse and the runtime."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return FD_CACHE_MAX
    return max(FD_CACHE_MIN, min(FD_CACHE_MAX, soft // 4))


class Locks:
    """POSIX lock state of one inode: owner -> OFD descriptor, owner -> client pid."""

    __slots__ = ("fds", "pids")

    def __init__(self):
        self.fds: dict[int, int] = {}
        self.pids: dict[int, int] = {}


class Inode:
    """One node of the C table, as the Python handlers see it (a view: cheap, not kept)."""

    __slots__ = ("nodeid", "dev", "ino", "mode", "table")

    def __init__(self, table: InodeTable, nodeid: int, dev: int, ino: int, mode: int):
        self.table = table
        self.nodeid = nodeid
        self.dev = dev
        self.ino = ino
        self.mode = mode              # S_IFMT bits only (the type never changes)

    @property
    def fd(self) -> int:
        """The O_PATH descriptor, pinned until the current request ends."""
        return self.table.pin(self)[0]

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

    @property
    def stamp(self) -> tuple | None:
        """Stat.stamp after the server's own last change (the host watch ignores it)."""
        return self.table.c.stamp(self.nodeid)

    @property
    def locks(self) -> Locks:
        return self.table.locks(self)


class InodeTable:
    def __init__(self, root: str, fd_cache: int = 0):
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        s = fs.lstat_at(fd, b"")
        self.capacity = fd_cache or default_fd_cache()
        mount = self._probe_handles(fd)
        self.use_handles = mount is not None
        self.c = NodeTable(fd, s.dev, s.ino, self.capacity, self.use_handles)
        if mount is not None:
            self.c.add_mount(*mount)
        self.root = Inode(self, fp.ROOT_ID, s.dev, s.ino, st_.S_IFDIR)
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._locks: dict[int, Locks] = {}     # nodeid -> POSIX lock state (while any)

    @staticmethod
    def _probe_handles(root_fd: int) -> tuple[int, int] | None:
        """(mount id, mount descriptor) when inodes can be named by handles here (root, a
        file system with handles), else None."""
        if os.geteuid() != 0:
            return None
        try:
            mount_id, handle = fs.handle_of(root_fd)
            mfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
        except OSError:
            return None
        try:
            os.close(fs.open_by_handle(mfd, handle, O_PATH_FLAGS))
        except OSError:
            os.close(mfd)
            return None       # no CAP_DAC_READ_SEARCH (a container), or no handles
        return mount_id, mfd

    # --- descriptors: pinned per request, held by open files ----------------------------------

    def begin(self) -> None:
        """Start a request on this thread: descriptors it pins are released by `end()`."""
        self._tls.pinned = []

    def end(self) -> None:
        pinned = self._tls.pinned
        self._tls.pinned = None
        for slot in pinned or ():
            self.c.unpin(slot)

    def pin(self, node: Inode) -> tuple[int, int]:
        """(fd, slot) of the node, pinned until the request ends."""
        pinned = getattr(self._tls, "pinned", None)
        if pinned is None:
            raise RuntimeError("an inode descriptor was used outside a request")
        fd, slot = self.c.pin(node.nodeid)
        pinned.append(slot)
        return fd, slot

    def hold(self, node: Inode) -> int:
        """Keep the inode's descriptor open until `unhold(slot)` (an open file): the slot."""
        slot = self.pin(node)[1]
        self.c.hold(slot)
        return slot

    def unhold(self, slot: int) -> None:
        self.c.unpin(slot)

    def locks(self, node: Inode) -> Locks:
        """The node's POSIX lock state; the fast path leaves FLUSH, RELEASE and the last
        FORGET of such a node to Python while it has any."""
        with self._lock:
            lk = self._locks.get(node.nodeid)
            if lk is None:
                lk = self._locks[node.nodeid] = Locks()
                self.c.set_pyheld(node.nodeid, True)
            return lk

    def existing_locks(self, node: Inode) -> Locks | None:
        return self._locks.get(node.nodeid)

    def drop_locks_if_unused(self, node: Inode) -> None:
        with self._lock:
            lk = self._locks.get(node.nodeid)
            if lk is not None and not lk.fds:
                del self._locks[node.nodeid]
                self.c.set_pyheld(node.nodeid, False)

    # --- the table ------------------------------------------------------------------------

    def get(self, nodeid: int) -> Inode:
        dev, ino, mode, _handle = self.c.info(nodeid)
        return Inode(self, nodeid, dev, ino, mode)

    def __len__(self) -> int:
        return len(self.c)

    def open_child(self, parent: Inode, name: bytes) -> int:
        """O_PATH descriptor of `name` in `parent`, never outside the share."""
        if name == b".":
            return os.dup(parent.fd)
        if name == b"..":
            if parent.nodeid == fp.ROOT_ID:
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
        if name == b"." or name == b"..":
            fd = self.open_child(parent, name)
            try:
                s = fs.lstat_at(fd, b"")
            except OSError:
                os.close(fd)
                raise
            return self.adopt(fd, s), s
        # open (RESOLVE_BENEATH), stat, handle and the table in one call without the GIL
        nodeid, s = fslookup.lookup_name(self.c, parent.nodeid, name)
        return Inode(self, nodeid, s.dev, s.ino, st_.S_IFMT(s.mode)), s

    def adopt(self, fd: int, s: fs.Stat) -> Inode:
        """Take ownership of an O_PATH descriptor for a looked-up or new inode (+1 lookup)."""
        nodeid = fslookup.adopt_fd(self.c, fd, s)
        return Inode(self, nodeid, s.dev, s.ino, st_.S_IFMT(s.mode))

    def set_stamp(self, node: Inode, s: fs.Stat) -> None:
        self.c.set_stamp(node.nodeid, s)

    def forget(self, nodeid: int, count: int) -> None:
        if self.c.forget(nodeid, count):
            with self._lock:
                lk = self._locks.pop(nodeid, None)
            if lk is not None:
                for lfd in lk.fds.values():
                    os.close(lfd)

    def find(self, dev: int, ino: int) -> Inode | None:
        nodeid = self.c.find(dev, ino)
        if not nodeid:
            return None
        try:
            return self.get(nodeid)
        except OSError:
            return None           # forgotten meanwhile

    def close(self) -> None:
        with self._lock:
            locks, self._locks = list(self._locks.values()), {}
        for lk in locks:
            for lfd in lk.fds.values():
                os.close(lfd)
        self.c.close()

    def cached_fds(self) -> int:
        """How many inode descriptors are open now (root and fd-mode inodes included)."""
        return self.c.cached_fds()
