"""Host changes reach the client: inotify watches on the directories the client has looked
up, turned into FUSE notifications (cache modes auto and always).

A name created, deleted or moved in a watched directory -> INVAL_ENTRY (the client drops the
cached name, so the next access looks it up again); a file written (IN_MODIFY, and
IN_CLOSE_WRITE), or its attributes changed -> INVAL_INODE (cached attributes and pages
dropped), so a host program that keeps a file open while it writes shows its writes too.
The server's own changes are recognised (names recorded before the change; writes while
the server has the file open written through; the inode's (ctime, mtime, size) after our
last change) and not echoed back, so client caches survive the client's own work.
Events are read and matched in C (`hvcore.fs.watch`, no GIL: the client's own creates and
unlinks cost no Python); this thread wakes only for host-made changes and sends them,
never from inside a request (a notification about a directory whose lock a request holds
would deadlock).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

from hvcore.fs import proto as fp
from hvcore.fs.watch import Watcher, add_watch

log = logging.getLogger("pyhv.share")
_libc = ctypes.CDLL(None, use_errno=True)

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_IGNORED, IN_Q_OVERFLOW = 0x400, 0x800, 0x8000, 0x4000
IN_ONLYDIR, IN_DONT_FOLLOW, IN_EXCL_UNLINK = 0x1000000, 0x2000000, 0x4000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
NAME_EVENTS = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
DATA_EVENTS = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE
MASK = NAME_EVENTS | DATA_EVENTS | IN_ONLYDIR | IN_EXCL_UNLINK


class HostWatch:
    def __init__(self, server):
        self.server = server
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, daemon=True, name="host-watch")
        # the inode table (C) adds a watch to every new directory and removes it on FORGET
        server.start_watching(self.fd, MASK)
        self._watcher = Watcher(server.inodes.c, server.own, self.fd, self._stop_r)
        if add_watch(server.inodes.c, fp.ROOT_ID) < 0:
            log.warning("host watch: cannot watch the share's root (some host changes show "
                        "after the cache timeout)")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        if self._thread.is_alive():
            self._thread.join(5)
        self.server.inodes.c.inotify_fd = -1
        for fd in (self.fd, self._stop_r, self._stop_w):
            os.close(fd)

    def _run(self) -> None:
        while True:
            try:
                changes = self._watcher.wait()
            except OSError as e:
                log.warning("host watch: %s", e)
                return
            if changes is None:
                return
            notify = self.server.notify
            if notify is None:
                continue
            entries, inodes = changes
            for parent_id, name in entries:
                notify([fp.notify_inval_entry(parent_id, name)])
            for nodeid in inodes:
                notify([fp.notify_inval_inode(nodeid, 0, 0)])
