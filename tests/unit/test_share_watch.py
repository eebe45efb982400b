"""The host watch in C (hvcore.fs.watch): the server's own creates and unlinks never come
back as invalidations, host-made ones do, each once."""

from __future__ import annotations

import os
import struct
import threading
import time

from hvcore.fs import proto as fp
from hvcore.fs.watch import OwnChanges
from pyhv.share.options import ShareOptions
from pyhv.share.server import FuseServer
from pyhv.share.watch import HostWatch
from tests.helpers.share_proto import init_request, nodeid_of, reply, request

CREATE_IN = "=IIII"
NOTIFY_INVAL_ENTRY = 3       # fuse_notify_code


def test_own_changes_match_once_and_in_any_order():
    own = OwnChanges()
    own.add(1, b"a")
    own.add(1, b"b")
    own.add(2, b"a")
    assert own.take(1, b"b")
    assert not own.take(1, b"b")            # once
    assert own.take(2, b"a") and own.take(1, b"a")
    assert not own.take(1, b"c")


def test_own_changes_keep_the_newest_when_full():
    own = OwnChanges()
    for i in range(1100):
        own.add(1, b"f%d" % i)
    assert not own.take(1, b"f0")           # the oldest expectations were dropped
    assert own.take(1, b"f1099")


def _served(tmp_path):
    server = FuseServer(ShareOptions(str(tmp_path)))
    sent: list[bytes] = []
    got = threading.Event()

    def notify(buffers):
        sent.append(b"".join(bytes(b) for b in buffers))
        got.set()

    server.notify = notify
    watch = HostWatch(server)
    server.handle(init_request())
    watch.start()
    return server, watch, sent, got


def test_own_creates_and_unlinks_are_not_echoed_host_ones_are(tmp_path):
    server, watch, sent, got = _served(tmp_path)
    try:
        for i in range(50):                 # through the C fast path, as the kernel sends them
            body = struct.pack(CREATE_IN, os.O_CREAT | os.O_WRONLY, 0o644, 0, 0) + b"f%d\0" % i
            err, _, payload = reply(server.handle(request(fp.CREATE, body, unique=10 + i)))
            assert err == 0
            fh = struct.unpack_from("=Q", payload, 128)[0]
            release = struct.pack("=QIIQ", fh, 0, 0, 0)
            node = nodeid_of(payload)
            assert reply(server.handle(request(fp.RELEASE, release, nodeid=node)))[0] == 0
        for i in range(0, 50, 2):
            assert reply(server.handle(request(fp.UNLINK, b"f%d\0" % i)))[0] == 0
        (tmp_path / "host-made").write_text("x")   # the only change that is not the server's
        assert got.wait(10)
        time.sleep(0.3)                     # anything echoed would have come by now
        entries = [m for m in sent if struct.unpack_from("=i", m, 4)[0] == NOTIFY_INVAL_ENTRY]
        assert len(entries) == 1 and entries[0].endswith(b"host-made\0"), sent
        assert len(sent) == 1               # and no INVAL_INODE for the files the server wrote
    finally:
        watch.stop()
        server.close()
