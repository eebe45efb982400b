"""hvcore.fs.ring on its own: bad arguments, and a queue the kernel refuses (a descriptor that
is no FUSE device) ends with the kernel's errno instead of hanging or crashing."""

from __future__ import annotations

import errno
import os

import pytest

from hvcore.fs.ring import FuseRing
from hvcore.fs.ring import serve as serve_ring
from pyhv.share.options import ShareOptions
from pyhv.share.server import FuseServer


def io_uring_reason() -> str | None:
    try:
        FuseRing(-1, 0, 1, 8192).close()
    except OSError as e:
        return f"io_uring unavailable here: {e}"
    return None


pytestmark = pytest.mark.skipif(io_uring_reason() is not None, reason=io_uring_reason() or "")


def test_bad_depth_is_refused():
    with pytest.raises(ValueError, match="depth"):
        FuseRing(-1, 0, 0, 8192)
    with pytest.raises(ValueError, match="depth"):
        FuseRing(-1, 0, 5000, 8192)


def test_a_refused_queue_ends_with_the_kernels_errno(tmp_path):
    """REGISTER on a descriptor without io_uring commands (a pipe): the queue ends at once
    with that error (serve_ring returns -1), as it does when a kernel refuses the ring;
    pyhv then keeps to /dev/fuse."""
    fd, other = os.pipe()
    ring = FuseRing(fd, 0, 2, 8192)
    try:
        server = FuseServer(ShareOptions(str(tmp_path)))
        ring.register()
        assert serve_ring(server.fast, ring) == -1
        server.close()
        assert ring.ended
        assert ring.error in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EBADF)
        assert ring.served == 0
    finally:
        ring.close()
        os.close(fd)
        os.close(other)


def test_answers_to_entries_that_do_not_exist_are_refused():
    ring = FuseRing(-1, 0, 2, 8192)
    try:
        with pytest.raises(ValueError, match="no request"):
            ring.request()
        reply = bytes(16)
        with pytest.raises(ValueError, match="no such entry"):
            ring.reply(2, [reply])
        with pytest.raises(ValueError, match="shorter"):
            ring.reply(0, [b"x"])
        ring.close()
        with pytest.raises(ValueError, match="ended"):
            ring.post(0, [reply])
    finally:
        ring.close()
