"""The FUSE request handler: one request buffer in, reply buffers out (see the package
docstring for the transport interface). Protocol-level requests (INIT, DESTROY, FORGET,
INTERRUPT) live here; the file system operations come from the mixins in meta / data /
locks, each a method `_op(unique, nodeid, args, ctx) -> list` looked up by opcode."""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable

from hvcore.fs import ops as fs
from hvcore.fs import proto as fp
from hvcore.fs.fastpath import FastPath
from hvcore.fs.files import FileTable
from hvcore.fs.watch import OwnChanges
from pyhv.share.data import DataOps
from pyhv.share.inodes import Inode, InodeTable
from pyhv.share.locks import LockOps
from pyhv.share.meta import MetaOps
from pyhv.share.options import ShareOptions

log = logging.getLogger("pyhv.share")

MIN_MINOR = 31
F = fp.INIT_FLAGS
# What pyhv offers; the reply carries the intersection with what the kernel offers.
OFFERED = (F["ASYNC_READ"] | F["POSIX_LOCKS"] | F["ATOMIC_O_TRUNC"] | F["BIG_WRITES"]
           | F["FLOCK_LOCKS"] | F["DO_READDIRPLUS"] | F["READDIRPLUS_AUTO"] | F["ASYNC_DIO"]
           | F["PARALLEL_DIROPS"] | F["MAX_PAGES"] | F["HANDLE_KILLPRIV_V2"]
           | F["CACHE_SYMLINKS"])
# Requests whose reply size the client chooses (the fast path's buffer must hold it).
SIZED = frozenset({fp.READ, fp.READDIR, fp.READDIRPLUS})
# Requests that change the share: refused with EROFS on a read-only share.
MODIFYING = frozenset({fp.SETATTR, fp.SYMLINK, fp.MKNOD, fp.MKDIR, fp.UNLINK, fp.RMDIR,
                       fp.RENAME, fp.RENAME2, fp.LINK, fp.WRITE, fp.CREATE, fp.SETXATTR,
                       fp.REMOVEXATTR, fp.FALLOCATE, fp.COPY_FILE_RANGE})


class Handle:
    """An open file or directory: a real descriptor (not O_PATH, owned by the FileTable) and
    the inode it is on."""

    __slots__ = ("fd", "inode")

    def __init__(self, fd: int, inode: Inode):
        self.fd = fd
        self.inode = inode


class FuseServer(MetaOps, DataOps, LockOps):
    """Passthrough file server for one host directory. Thread-safe `handle()`."""

    def __init__(self, options: ShareOptions):
        self.opts = options
        self.policy = options.policy
        self.idmap = options.idmap
        self.inodes = InodeTable(options.root, options.fd_cache)
        self.listing = threading.Lock()         # a listing is lseek + getdents on the fd
        # the open files' descriptors, by file handle; READ / WRITE are answered there in C
        self.files = FileTable()
        self.files.max_io = options.max_write
        self.files.writable = not options.readonly
        # LOOKUP, GETATTR, FORGET, OPEN, CREATE, FLUSH, RELEASE, UNLINK, directories in C
        self.fast = FastPath(self.inodes.c, self.files)
        # Set by the host watch: the server's own changes must not come back as invalidations.
        self.watching = False
        self.own = OwnChanges()         # (parent nodeid, name) the server changes, for the watch
        self.fast.own = self.own
        self._waiting: dict[int, threading.Event] = {}    # unique -> interrupted
        self.negotiated = 0
        self.proto_minor = 0
        self.notify: Callable[[list], None] | None = None
        # set by a transport that can serve FUSE over io_uring: called while INIT is being
        # answered, True when its queues are ready (the reply then offers io_uring)
        self.ring_offer: Callable[[], bool] | None = None
        self.stats_errors = 0
        self._ops: dict[int, Callable] = {}
        for name in dir(self):
            if name.startswith("_op_"):
                code = getattr(fp, name[4:].upper())
                self._ops[code] = getattr(self, name)

    # --- the transport interface -------------------------------------------------------------

    def handle(self, buf) -> list:
        """Serve one request; returns the reply buffers ([] when there is no reply)."""
        return self._handle_request(buf, True)

    def dispatch(self, buf) -> list:
        """`handle` for a request the fast path has declined already (the transports)."""
        return self._handle_request(buf, False)

    def _handle_request(self, buf, fast: bool) -> list:
        try:
            opcode, unique, nodeid, uid, gid, pid, args = fp.decode(buf)
        except fp.ProtocolError as e:
            self.stats_errors += 1
            log.warning("bad request: %s", e.strerror)
            return [fp.error_reply(e.unique, e.errno)] if e.unique else []
        except (TypeError, ValueError, BufferError) as e:
            log.warning("bad request buffer: %s", e)
            return []
        op = self._ops.get(opcode)
        if op is None or args is None:
            return [fp.error_reply(unique, errno.ENOSYS)]
        if not self.proto_minor and opcode != fp.INIT:
            return [fp.error_reply(unique, errno.EIO)]
        if self.opts.readonly and opcode in MODIFYING:
            return [fp.error_reply(unique, errno.EROFS)]
        if fast:
            size = 16 + min(args[2], self.opts.max_write) if opcode in SIZED else 0
            out = bytearray(max(512, size))
            n = self.fast.serve(buf, out)
            if n:
                return [memoryview(out)[:n]] if n > 0 else []   # else: Python answers it
        self.inodes.begin()
        try:
            return op(unique, nodeid, args, (uid, gid, pid))
        except OSError as e:
            return [fp.error_reply(unique, e.errno or errno.EIO)]
        except (OverflowError, ValueError) as e:       # absurd sizes / offsets
            log.warning("request %d (opcode %d): %s", unique, opcode, e)
            return [fp.error_reply(unique, errno.EINVAL)]
        except Exception:
            log.exception("request %d (opcode %d) failed", unique, opcode)
            return [fp.error_reply(unique, errno.EIO)]
        finally:
            self.inodes.end()

    def cancel_waits(self) -> None:
        """The connection is gone: end every lock wait (nobody reads their replies)."""
        for event in list(self._waiting.values()):
            event.set()

    def close(self) -> None:
        for fh in self.files.handles():
            self._close_handle(fh)
        self.inodes.close()

    def start_watching(self, inotify_fd: int, mask: int) -> None:
        """The host watch is on: new directories get watches, own changes are remembered."""
        self.watching = True
        self.fast.watching = True
        self.inodes.c.inotify_mask = mask
        self.inodes.c.inotify_fd = inotify_fd

    # --- helpers the operation mixins share ------------------------------------------------

    def _new_handle(self, fd: int, inode: Inode) -> int:
        slot = self.inodes.hold(inode)    # an open file keeps its inode's descriptor
        return self.files.add(fd, slot)   # which owns (and closes) the descriptor from now on

    def _close_handle(self, fh: int) -> None:
        """RELEASE(DIR): close the descriptor (after READ / WRITE still using it)."""
        held = self.files.remove(fh)
        if held is not None and held[1] >= 0:
            self.inodes.unhold(held[1])

    def _handle(self, fh: int) -> Handle:
        info = self.files.info(fh)
        if info is None:
            raise OSError(errno.EBADF, f"unknown file handle {fh}")
        nodeid, dev, ino, mode = self.inodes.c.slot_info(info[1])
        return Handle(info[0], Inode(self.inodes, nodeid, dev, ino, mode))

    def _expect(self, parent: Inode, name: bytes) -> None:
        """The host watch will see an event for this name: it is ours, not the host's."""
        if self.watching:
            self.own.add(parent.nodeid, name)

    def _stamp(self, node: Inode, fd: int | None = None, s: fs.Stat | None = None) -> None:
        """Remember the inode as our last change left it (the watch ignores that state)."""
        if self.watching:
            try:
                self.inodes.set_stamp(node, s or fs.lstat_at(node.fd if fd is None else fd, b""))
            except OSError:
                pass

    def _ids_out(self, s: fs.Stat, ctx: tuple) -> tuple[int, int]:
        if self.idmap.identity:
            return s.uid, s.gid
        return self.idmap.uid.to_guest(s.uid, ctx[0]), self.idmap.gid.to_guest(s.gid, ctx[1])

    def _entry(self, unique: int, node: Inode, s: fs.Stat, ctx: tuple) -> list:
        uid, gid = self._ids_out(s, ctx)
        p = self.policy
        return [fp.entry_reply(unique, node.nodeid, 0, s, uid, gid, p.entry_timeout,
                               p.attr_timeout)]

    def _attr(self, unique: int, s: fs.Stat, ctx: tuple) -> list:
        uid, gid = self._ids_out(s, ctx)
        return [fp.attr_reply(unique, s, uid, gid, self.policy.attr_timeout)]

    # --- protocol-level requests -------------------------------------------------------------

    def _op_init(self, unique, nodeid, args, ctx):
        major, minor, max_readahead, flags = args
        if major != 7:
            return [fp.error_reply(unique, errno.EPROTO)]
        if minor < MIN_MINOR:
            log.error("kernel FUSE protocol 7.%d is older than 7.%d", minor, MIN_MINOR)
            return [fp.error_reply(unique, errno.EPROTO)]
        want = OFFERED
        if self.opts.writeback and not self.opts.readonly:
            want |= F["WRITEBACK_CACHE"]
        # (no FUSE_AUTO_INVAL_DATA in auto: the kernel would drop the pages of every file
        # the client writes, its own mtime never being the host's; pyhv.share.options)
        if flags & F["OVER_IO_URING"] and self.ring_offer is not None and self.ring_offer():
            want |= F["OVER_IO_URING"] | F["INIT_EXT"]
        self.negotiated = flags & want
        self.proto_minor = min(minor, fp.KERNEL_MINOR)
        self._start_fast_path()
        max_pages = self.opts.max_write // 4096
        return [fp.init_reply(unique, self.proto_minor, max_readahead, self.negotiated,
                              64, 48, self.opts.max_write, 1, max_pages)]

    def _start_fast_path(self) -> None:
        """From INIT on, the hot requests are answered in C with this share's settings."""
        p, ids = self.policy, self.idmap
        self.fast.configure(p.entry_timeout, p.attr_timeout, p.open_flags, p.dir_open_flags,
                            self.opts.max_write, self.opts.readonly, self.watching,
                            bool(self.negotiated & F["WRITEBACK_CACHE"]), os.geteuid() == 0,
                            p.close_to_open)
        ok = True
        for axis, a in enumerate((ids.uid, ids.gid)):
            kind = 0 if a.identity else 1 if a.caller else 2
            ok = self.fast.set_ids(axis, kind, a.own, a.ranges) and ok
        self.files.enabled = True         # READ / WRITE answered in C from now on
        self.fast.enabled = ok            # the rest too, unless the id map is too long

    def _op_destroy(self, unique, nodeid, args, ctx):
        return [fp.error_reply(unique, 0)]

    def _op_forget(self, unique, nodeid, args, ctx):
        self.inodes.forget(nodeid, args[0])
        return []

    def _op_batch_forget(self, unique, nodeid, args, ctx):
        for node, count in args[0]:
            self.inodes.forget(node, count)
        return []

    def _op_interrupt(self, unique, nodeid, args, ctx):
        event = self._waiting.get(args[0])
        if event is not None:
            event.set()
        return []
