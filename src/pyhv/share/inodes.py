"""The inode table: every host inode the client holds, named by a file handle.

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
from collections import OrderedDict

from hvcore import fsops as fs
from hvcore import fuseproto as fp

O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
FD_CACHE_MIN, FD_CACHE_MAX = 32, 65536


def default_fd_cache() -> int:
    """A quarter of RLIMIT_NOFILE: the rest is for open files, /dev/fuse and the runtime."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return FD_CACHE_MAX
    return max(FD_CACHE_MIN, min(FD_CACHE_MAX, soft // 4))


class Inode:
    __slots__ = ("nodeid", "_fd", "dev", "ino", "mode", "handle", "mount_fd", "pins",
                 "table", "nlookup", "wd", "stamp", "lock_fds", "lock_pids")

    def __init__(self, nodeid: int, fd: int, dev: int, ino: int, mode: int,
                 handle: bytes | None = None, mount_fd: int = -1, table=None,
                 nlookup: int = 0):
        self.nodeid = nodeid
        self._fd = fd                 # O_PATH descriptor, -1 while not cached
        self.dev = dev
        self.ino = ino
        self.mode = mode              # S_IFMT bits only (the type never changes)
        self.handle = handle          # None: the descriptor is held for the inode's life
        self.mount_fd = mount_fd      # for open_by_handle
        self.pins = 0
        self.table = table
        self.nlookup = nlookup
        self.wd = -1                  # inotify watch on a directory (watch.py)
        self.stamp: tuple | None = None   # Stat.stamp after the server's own last change
        self.lock_fds: dict = {}      # POSIX lock owner -> OFD descriptor
        self.lock_pids: dict = {}     # POSIX lock owner -> client pid

    @property
    def fd(self) -> int:
        """The O_PATH descriptor, pinned until the current request ends."""
        if self.handle is None:
            return self._fd
        return self.table.pin(self)

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
    def __init__(self, root: str, fd_cache: int = 0):
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        s = fs.lstat_at(fd, b"")
        self.root = Inode(fp.ROOT_ID, fd, s.dev, s.ino, st_.S_IFDIR, nlookup=1 << 62)
        self._by_id: dict[int, Inode] = {fp.ROOT_ID: self.root}
        self._by_key: dict[tuple[int, int], Inode] = {(s.dev, s.ino): self.root}
        self._next = fp.ROOT_ID + 1
        self._lock = threading.Lock()
        self._lru: OrderedDict[Inode, None] = OrderedDict()   # cached handle-inode fds
        self._mounts: dict[int, int] = {}                     # mount id -> mount descriptor
        self._tls = threading.local()
        self.capacity = fd_cache or default_fd_cache()
        self.use_handles = self._probe_handles(fd)
        self.on_new_dir = None      # callable(Inode), set by the host watch
        self.on_drop = None         # callable(Inode)

    def _probe_handles(self, root_fd: int) -> bool:
        """Whether inodes can be named by handles here (root, a file system with handles)."""
        if os.geteuid() != 0:
            return False
        try:
            mount_id, handle = fs.handle_of(root_fd)
            mfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
        except OSError:
            return False
        try:
            os.close(fs.open_by_handle(mfd, handle, O_PATH_FLAGS))
        except OSError:
            os.close(mfd)
            return False      # no CAP_DAC_READ_SEARCH (a container), or no handles
        self._mounts[mount_id] = mfd
        return True

    # --- descriptors of handle inodes: pinned per request, cached in a bounded LRU --------

    def begin(self) -> None:
        """Start a request on this thread: descriptors it pins are released by `end()`."""
        self._tls.pinned = []

    def end(self) -> None:
        pinned = self._tls.pinned
        self._tls.pinned = None
        if pinned:
            self._unpin(pinned)

    def pin(self, node: Inode) -> int:
        pinned = getattr(self._tls, "pinned", None)
        if pinned is None:
            raise RuntimeError("an inode descriptor was used outside a request")
        evicted = None
        with self._lock:
            fd = node._fd
            if fd >= 0:
                node.pins += 1
                pinned.append(node)
                if node in self._lru:
                    self._lru.move_to_end(node)
                elif node.nodeid in self._by_id:      # held open, evicted meanwhile
                    self._lru[node] = None
                    evicted = self._evict()
        if fd >= 0:
            if evicted:
                self._close_fds(evicted)
            return fd
        fd = fs.open_by_handle(node.mount_fd, node.handle, O_PATH_FLAGS)
        with self._lock:
            if node._fd >= 0:            # another thread reopened it meanwhile
                extra, fd = fd, node._fd
            else:
                extra = -1
                node._fd = fd
                if node.nodeid in self._by_id:
                    self._lru[node] = None
            node.pins += 1
            pinned.append(node)
            evicted = self._evict()
        if extra >= 0:
            os.close(extra)
        self._close_fds(evicted)
        return fd

    def hold(self, node: Inode) -> None:
        """Keep the inode's descriptor open until `unhold` (an open file or directory)."""
        if node.handle is not None:
            node.fd                         # noqa: B018 (opens it, pinned for this request)
            with self._lock:
                node.pins += 1

    def unhold(self, node: Inode) -> None:
        if node.handle is not None:
            self._unpin([node])

    def _unpin(self, nodes: list) -> None:
        close = []
        with self._lock:
            for node in nodes:
                node.pins -= 1
                if node.pins == 0 and node._fd >= 0 and node not in self._lru:
                    close.append(node._fd)      # evicted or forgotten while pinned
                    node._fd = -1
        self._close_fds(close)

    def _evict(self) -> list:
        """With the lock held: take descriptors over capacity out of the cache (LRU first);
        returns those to close (pinned ones close when their last pin goes)."""
        out = []
        while len(self._lru) > self.capacity:
            node, _ = self._lru.popitem(last=False)
            if node.pins == 0 and node._fd >= 0:
                out.append(node._fd)
                node._fd = -1
        return out

    @staticmethod
    def _close_fds(fds: list) -> None:
        for fd in fds:
            os.close(fd)

    def _mount_fd(self, mount_id: int, fd: int, s) -> int:
        """A descriptor on the mount a new inode is on (-1: none, keep the inode's fd)."""
        mfd = self._mounts.get(mount_id)
        if mfd is not None or not st_.S_ISDIR(s.mode):
            return -1 if mfd is None else mfd
        mfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        with self._lock:
            kept = self._mounts.setdefault(mount_id, mfd)
        if kept != mfd:
            os.close(mfd)
        return kept

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
        if name == b"." or name == b"..":
            fd = self.open_child(parent, name)
            try:
                s = fs.lstat_at(fd, b"")
            except OSError:
                os.close(fd)
                raise
            return self.adopt(fd, s), s
        # open (RESOLVE_BENEATH), stat and file handle in one call without the GIL
        fd, s, mount_id, handle = fs.lookup_at(parent.fd, name, O_PATH_FLAGS, self.use_handles)
        return self.adopt(fd, s, (mount_id, handle)), s

    def adopt(self, fd: int, s: fs.Stat, ident: tuple | None = None) -> Inode:
        """Take ownership of an O_PATH descriptor for a looked-up or new inode (+1 lookup);
        `ident` is its (mount id, file handle) when the caller has them already."""
        key = (s.dev, s.ino)
        handle, mount_fd = None, -1
        if self.use_handles:
            try:
                mount_id, handle = fs.handle_of(fd) if ident is None else ident
                if handle is not None:
                    mount_fd = self._mount_fd(mount_id, fd, s)
            except OSError:
                handle = None            # a file system without handles: keep the fd
            if mount_fd < 0:
                handle = None
        new, close, evicted = None, fd, []
        with self._lock:
            node = self._by_key.get(key)
            if (node is not None and node.handle is not None and handle is not None
                    and node.handle != handle):
                node = None              # the inode number was reused: a new inode
            if node is None:
                node = Inode(self._next, fd, s.dev, s.ino, st_.S_IFMT(s.mode), handle,
                             mount_fd, self)
                self._next += 1
                self._by_id[node.nodeid] = node
                self._by_key[key] = node
                new, close = node, -1
                if handle is not None:
                    self._lru[node] = None
                    evicted = self._evict()
            elif node.handle is not None and node._fd < 0:
                node._fd, close = fd, -1         # cache the descriptor we have
                self._lru[node] = None
                evicted = self._evict()
            node.nlookup += 1
        if close >= 0:
            os.close(close)
        self._close_fds(evicted)
        if new is not None and new.is_dir and self.on_new_dir is not None:
            self.on_new_dir(new)
        return node

    def forget(self, nodeid: int, count: int) -> None:
        close = -1
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
            self._lru.pop(node, None)
            if node.pins == 0 and node._fd >= 0:
                close, node._fd = node._fd, -1
        self._close(node, close)

    def _close(self, node: Inode, fd: int) -> None:
        if self.on_drop is not None:
            self.on_drop(node)
        for lfd in node.lock_fds.values():
            os.close(lfd)
        node.lock_fds.clear()
        if fd >= 0:
            os.close(fd)

    def find(self, dev: int, ino: int) -> Inode | None:
        return self._by_key.get((dev, ino))

    def close(self) -> None:
        with self._lock:
            nodes = list(self._by_id.values())
            self._by_id.clear()
            self._by_key.clear()
            self._lru.clear()
            mounts = list(self._mounts.values())
            self._mounts.clear()
        for node in nodes:
            fd, node._fd = node._fd, -1
            self._close(node, fd)
        self._close_fds(mounts)

    def cached_fds(self) -> int:
        """How many inode descriptors are open now (root and fd-mode inodes included)."""
        with self._lock:
            return sum(1 for n in self._by_id.values() if n._fd >= 0)
