"""The /dev/fuse transport: mount, a pool of reader threads on cloned descriptors, unmount.

Each reader owns a descriptor cloned with FUSE_DEV_IOC_CLONE and reads requests in C
(`hvcore.fs.devfuse.serve`, through `hvcore.fs.fastpath`), which answers the hot requests
(LOOKUP, GETATTR, FORGET, OPEN, CREATE, READ, WRITE, FLUSH, RELEASE, UNLINK) itself
without the GIL (a large READ is spliced from the file through the reader's pipe); any
other request goes to `FuseServer.dispatch`, and its reply is written with one writev.
Readers take turns reading (leader/followers) so a client's requests one after another
are served by one awake thread. When every
reader but one is busy (a slow read, a lock wait) another is started, up to `max_threads`, so
one slow request never blocks the others. Readers end when the kernel ends the connection (ENODEV on
unmount). Root mounts with mount(2); a normal user goes through fusermount3.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
import time

from hvcore.fs import devfuse as dev
from hvcore.fs import proto as fp
from pyhv.errors import PyhvError
from pyhv.share import ring

log = logging.getLogger("pyhv.share")

MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
# Errors a reply write may meet that only mean "nobody waits for this reply any more".
GONE = (errno.ENOENT, errno.EINTR)
# A reader's splice pipe: 128 KiB readahead READs and more (1 MiB is the unprivileged limit).
SPLICE_PIPE = 1 << 20


def _device(mountpoint: str) -> str | None:
    """The device ("0:N") of the newest mount at `mountpoint` (mountinfo): the connection is
    /sys/fs/fuse/connections/N, the readahead setting /sys/class/bdi/0:N/read_ahead_kb."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint:
                found = fields[2]
    return found


def _splice_pipe() -> tuple[int, int, int]:
    """A reader's pipe for READ replies spliced from the file (header + pages): (read end,
    write end, capacity), or (-1, -1, 0) when there is none (the reply is then copied)."""
    try:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return -1, -1, 0
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, SPLICE_PIPE)
    except OSError:
        pass                                # the default size still serves smaller reads
    return r, w, fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)


class DevFuse:
    def __init__(self, server, mountpoint: str, *, readonly: bool = False,
                 allow_devices: bool = False, max_threads: int = 16, fsname: str = "pyhv",
                 io_uring: bool = True):
        self.server = server
        self.mountpoint = os.path.abspath(mountpoint)
        self.readonly = readonly
        self.allow_devices = allow_devices
        self.max_threads = max_threads
        self.fsname = fsname
        self.bufsize = max(server.opts.max_write + 4096, fp.MIN_READ_BUFFER)
        self.fd = -1
        self.conn = None               # /sys/fs/fuse/connections/<N>
        self.dev = None                # "0:N"
        self._readahead_set = False
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._stopping = False
        self._can_clone = True
        self.io_uring = io_uring
        self.rings: ring.RingQueues | None = None
        self._rings_started = False

    # --- mount / unmount ---------------------------------------------------------------------

    def _options(self) -> str:
        opts = ["default_permissions"]
        if os.geteuid() == 0:
            opts.append("allow_other")
        return ",".join(opts)

    def mount(self) -> None:
        if not os.path.isdir(self.mountpoint):
            raise PyhvError(f"mount point {self.mountpoint} is not a directory")
        if self.io_uring and ring.enable():         # before mount(2): INIT offers it or not
            self.server.ring_offer = self._offer_rings
        if os.geteuid() == 0:
            self._mount_root()
        else:
            self._mount_fusermount()
        self.dev = _device(self.mountpoint)        # never stat the mount before INIT
        if self.dev:
            self.conn = f"/sys/fs/fuse/connections/{self.dev.split(':')[1]}"
        self.server.notify = self.send

    def _mount_root(self) -> None:
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        data = (f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,{self._options()}")
        flags = MS_NOSUID | (0 if self.allow_devices else MS_NODEV)
        flags |= MS_RDONLY if self.readonly else 0
        rc = _libc.mount(self.fsname.encode(), self.mountpoint.encode(), b"fuse.pyhv", flags,
                         data.encode())
        if rc != 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            self.fd = -1
            raise PyhvError(f"mount {self.mountpoint}: {os.strerror(err)}")

    def _mount_fusermount(self) -> None:
        tool = shutil.which("fusermount3")
        if tool is None:
            raise PyhvError("fusermount3 not found (install the fuse3 package), or run as root")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        opts = self._options() + f",fsname={self.fsname},subtype=pyhv"
        opts += ",ro" if self.readonly else ""
        with ours, theirs:
            proc = subprocess.Popen(
                [tool, "-o", opts, "--", self.mountpoint], pass_fds=(theirs.fileno(),),
                env=dict(os.environ, _FUSE_COMMFD=str(theirs.fileno())),
                stderr=subprocess.PIPE, text=True)
            theirs.close()
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
            _out, err = proc.communicate()
        if proc.returncode != 0 or not fds:
            raise PyhvError(f"fusermount3: {err.strip() or 'no /dev/fuse descriptor'}")
        self.fd = fds[0]
        os.set_inheritable(self.fd, False)

    def unmount(self) -> None:
        """Lazy unmount: the kernel ends the connection once the mount is no longer busy."""
        self._stopping = True
        if os.geteuid() == 0:
            if _libc.umount2(self.mountpoint.encode(), MNT_DETACH) != 0:
                err = ctypes.get_errno()
                if err not in (errno.EINVAL, errno.ENOENT):
                    log.warning("umount %s: %s", self.mountpoint, os.strerror(err))
        else:
            subprocess.run(["fusermount3", "-u", "-z", "--", self.mountpoint],
                           capture_output=True)

    def abort(self) -> None:
        """End the connection now (pending requests fail with ECONNABORTED, lock waits end)."""
        self.server.cancel_waits()
        if self.conn and not os.path.isdir(self.conn) and os.geteuid() == 0:
            _libc.mount(b"fusectl", b"/sys/fs/fuse/connections", b"fusectl", 0, None)
        if self.conn:
            try:
                with open(f"{self.conn}/abort", "w") as f:
                    f.write("1")
            except OSError:
                pass

    # --- serving -------------------------------------------------------------------------

    def start(self) -> None:
        """One reader per CPU from the start (at least two): the hot requests are served in
        C without the GIL, so concurrent clients (git's parallel lstat) are served in
        parallel; more readers come when requests wait in Python."""
        self._spawn(self.fd)
        for _ in range(min(self.max_threads, max(2, os.cpu_count() or 1)) - 1):
            self._spawn()

    def _clone(self) -> int:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(fd, fp.DEV_IOC_CLONE, struct.pack("I", self.fd))
        return fd

    def _spawn(self, fd: int | None = None) -> None:
        with self._lock:
            if len(self._threads) >= self.max_threads or self._stopping:
                return
            self._idle += 1
            t = threading.Thread(target=self._reader, args=(fd,), daemon=True,
                                 name=f"fuse-reader-{len(self._threads)}")
            self._threads.append(t)
        t.start()

    def _reader(self, fd: int | None) -> None:
        own = fd is None and self._can_clone
        try:
            if own:
                fd = self._clone()
        except OSError as e:
            # a user without access to /dev/fuse (fusermount3 opened it): share the one
            # descriptor, as libfuse does without clone_fd
            self._can_clone = False
            own = False
            log.debug("cannot clone /dev/fuse (%s): readers share its descriptor", e)
        if fd is None:
            fd = self.fd
        buf = bytearray(self.bufsize)
        out = bytearray(self.bufsize)       # READ / WRITE replies, written in C
        view = memoryview(buf)
        handle = self.server.dispatch
        fast = self.server.fast
        pipe_r, pipe_w, pipe_cap = _splice_pipe()
        turn = False                        # this reader holds the reading turn (fs.fastpath)
        try:
            while True:
                # the hot requests answered inside, no GIL (large READs spliced through the pipe)
                n = dev.serve(fast, fd, buf, out, pipe_r, pipe_w, pipe_cap, turn)
                turn = n > 0 and dev.keeps_turn(view[:n])
                if n < 0:
                    if -n != errno.ENODEV:
                        log.warning("read /dev/fuse: %s", os.strerror(-n))
                    return
                if n == 0:
                    return
                with self._lock:
                    self._idle -= 1
                    grow = self._idle == 0
                if grow:
                    self._spawn()
                replies = handle(view[:n])
                if replies:
                    try:
                        os.writev(fd, replies)
                    except OSError as e:
                        if e.errno not in GONE:
                            log.warning("reply: %s", e)
                if self.rings is not None and not self._rings_started and self.server.negotiated:
                    self._start_rings()
                if not self._readahead_set and self.server.proto_minor:
                    self._set_readahead()
                with self._lock:
                    self._idle += 1
        finally:
            if turn:
                dev.release_turn(fast)
            view.release()
            if own:
                os.close(fd)
            for p in (pipe_r, pipe_w):
                if p >= 0:
                    os.close(p)

    def _offer_rings(self) -> bool:
        """INIT is being answered and the kernel offers FUSE over io_uring: make the queues."""
        self.rings = ring.RingQueues(self.server, self.fd, max(self.server.opts.max_write, 8192),
                                     self.max_threads)
        return self.rings.prepare()

    def _start_rings(self) -> None:
        """The INIT reply is written: register the queues if INIT took io_uring."""
        self._rings_started = True
        if self.server.negotiated & fp.INIT_FLAGS["OVER_IO_URING"]:
            self.rings.start()
            log.debug("serving over io_uring: %d queues", self.rings.count)
        else:
            self.rings.close()

    def _set_readahead(self) -> None:
        """Once INIT is answered: let readahead fill a whole request (max_write, 1 MiB)
        instead of the kernel's 128 KiB default, which INIT can only lower. Sequential
        reads then cost a quarter as many requests (about 1.2-1.3x the MB/s here). Root
        only (sysfs); others keep the default."""
        self._readahead_set = True
        if not self.dev:
            return
        path = f"/sys/class/bdi/{self.dev}/read_ahead_kb"
        want = self.server.opts.max_write >> 10
        try:
            with open(path, "r+") as f:
                if int(f.read()) < want:
                    f.seek(0)
                    f.write(str(want))
        except (OSError, ValueError) as e:
            log.debug("readahead of %s left as it is: %s", self.mountpoint, e)

    def send(self, buffers: list) -> None:
        """Unsolicited notification (cache invalidation) to the kernel."""
        try:
            os.writev(self.fd, buffers)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.ENOTCONN):
                log.debug("notify: %s", e)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every reader has ended (the mount is gone); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                alive = [t for t in self._threads if t.is_alive()]
            if self.rings is not None:
                alive += self.rings.alive()
            if not alive:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            alive[0].join(0.2 if left is None else min(left, 0.2))

    def close(self) -> None:
        self.server.cancel_waits()
        if self.rings is not None:
            self.rings.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
