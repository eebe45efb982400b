"""virtio-fs (virtio 1.x section 5.11): the share's FUSE request handler served from
virtqueues, a third transport beside `/dev/fuse` and FUSE over io_uring. Queue 0 is the
high-priority queue (FORGET, INTERRUPT), queues 1..N carry requests. A chain's readable
buffers hold one request (in header and arguments, WRITE's data after them), its writable
buffers take the reply (out header, then data).

Linux's virtio-fs has no notification queue, so the host watch's invalidations cannot be
pushed: a guest sees host changes when its entry and attribute timeouts run out (`auto`:
1 s) and, for data, at the next open (`auto`'s close-to-open); `always` keeps what it has
for its long timeout. The server therefore runs without the watch here."""

from __future__ import annotations

import errno
import logging
import struct

from hvcore.fs import proto as fp
from hvcore.fs.virtiofs import FuseQueue
from hvcore.virtio.queue import SplitQueue
from pyhv.share.server import FuseServer
from pyhv.virtio.device import Device

log = logging.getLogger("pyhv.share")

TAG_BYTES = 36
OUT_HEADER = 16


class FsDevice(Device):
    """`server` as a virtio-fs device named `tag` with `queues` request queues."""

    frontend_reads_config = False

    def __init__(self, server: FuseServer, tag: str, queues: int = 1):
        raw = tag.encode()
        if not raw or len(raw) > TAG_BYTES:
            raise ValueError(f"a virtio-fs tag has 1 to {TAG_BYTES} bytes: {tag!r}")
        self.server, self.tag = server, raw
        self.num_queues = 1 + queues

    def config(self) -> bytes:
        """struct virtio_fs_config: tag[36], num_request_queues."""
        return self.tag.ljust(TAG_BYTES, b"\0") + struct.pack("<I", self.num_queues - 1)

    def handler(self, index: int):
        return self.serve

    def taker(self, index: int, queue: SplitQueue):
        """Chains the C fast path answers never reach Python (hvcore.fs.virtiofs)."""
        return FuseQueue(queue, self.server.fast).next

    def serve(self, head: int, readable: list[memoryview], writable: list[memoryview]) -> int:
        """One request the C path (`taker`) left to Python; the bytes of reply written (0
        for a request without a reply)."""
        if len(readable) == 1 and len(writable) == 1:
            replies = self.server.dispatch(readable[0])     # (the fast path declined it)
        else:
            request = readable[0] if len(readable) == 1 else b"".join(readable)
            replies = self.server.handle(request)
        if not replies:
            return 0
        size = sum(len(r) for r in replies)
        room = sum(len(w) for w in writable)
        if size > room:
            # (a well-behaved driver gives room for the reply it asked for)
            unique = struct.unpack_from("<Q", bytes(replies[0][:OUT_HEADER]), 8)[0]
            log.warning("reply of %d bytes for %d of room (request %d)", size, room, unique)
            if room < OUT_HEADER:
                return 0
            replies, size = [fp.error_reply(unique, errno.EIO)], OUT_HEADER
        _scatter(replies, writable)
        return size


def _scatter(replies: list, writable: list[memoryview]) -> None:
    """Copy the reply pieces into the writable buffers, in order."""
    k, at = 0, 0
    for piece in replies:
        piece = memoryview(piece).cast("B")
        while len(piece):
            room = len(writable[k]) - at
            if room == 0:
                k, at = k + 1, 0
                continue
            n = min(room, len(piece))
            writable[k][at:at + n] = piece[:n]
            piece, at = piece[n:], at + n
