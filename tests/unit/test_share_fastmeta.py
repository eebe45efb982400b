"""The C fast path (hvcore.fs.fastpath, reached through `FuseServer.handle`) answers exactly as the
Python handlers (`FuseServer.dispatch`) do: the same request sent both ways gets the same
reply bytes, for every server mode (file handles, a one-descriptor cache, descriptors only,
an id-mapped share) and for errors too."""

from __future__ import annotations

import os
import struct

import pytest

from hvcore.fs import proto as fp
from pyhv.share.idmap import IdMap
from pyhv.share.options import ShareOptions
from pyhv.share.server import FuseServer
from tests.helpers.share_proto import init_request, nodeid_of, reply, request

READ_IN = struct.Struct("=QQIIQII")
OPEN_IN = struct.Struct("=II")


@pytest.fixture
def tree(tmp_path):
    share = tmp_path / "share"
    (share / "dir" / "sub").mkdir(parents=True)
    (share / "file").write_text("inside")
    (share / "dir" / "a").write_text("a")
    os.symlink("../elsewhere", share / "link")
    os.mkfifo(share / "fifo")
    os.chown(share / "dir" / "a", 1234, 4321)
    return share


@pytest.fixture(params=["handles", "handles, 1 cached fd", "descriptors", "id map"])
def server(request, tree, monkeypatch):
    if request.param == "descriptors":
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
    idmap = IdMap(["0:1234:1", "1000:0:1"], ["0:4321:1"]) if request.param == "id map" \
        else IdMap()
    s = FuseServer(ShareOptions(str(tree), idmap=idmap,
                                fd_cache=1 if "1 cached" in request.param else 0))
    assert reply(s.handle(init_request()))[0] == 0
    yield s
    s.close()


def both(server, opcode, body=b"", nodeid=1, uid=1000, gid=1000):
    """(fast reply, Python reply) of the same request."""
    buf = request(opcode, body, nodeid=nodeid, uid=uid, gid=gid)
    out = bytearray(1 << 17)
    n = server.fast.serve(buf, out)
    assert n > 0, f"opcode {opcode} was not answered by the fast path"
    return bytes(out[:n]), b"".join(bytes(b) for b in server.dispatch(buf))


def test_lookup_and_getattr_match(server):
    for parent, name in ((1, b"file"), (1, b"dir"), (1, b"link"), (1, b"fifo")):
        fast, slow = both(server, fp.LOOKUP, name + b"\0", nodeid=parent)
        assert fast == slow                          # same node, same attributes
        nodeid = nodeid_of(reply([fast])[2])
        fast, slow = both(server, fp.GETATTR, bytes(16), nodeid=nodeid)
        assert fast == slow and reply([fast])[0] == 0
    _, _, payload = reply([both(server, fp.LOOKUP, b"dir\0")[0]])
    fast, slow = both(server, fp.LOOKUP, b"a\0", nodeid=nodeid_of(payload))
    assert fast == slow
    if server.opts.idmap.uid.ranges:                 # host 1234:4321 is guest 0:0
        assert struct.unpack_from("=II", fast, 16 + 40 + 68) == (0, 0)     # attr.uid, gid


def test_errors_match(server):
    for opcode, body, nodeid in ((fp.LOOKUP, b"missing\0", 1), (fp.GETATTR, bytes(16), 999),
                                 (fp.LOOKUP, b"x\0", 999), (fp.UNLINK, b"missing\0", 1),
                                 (fp.OPEN, OPEN_IN.pack(os.O_RDONLY, 0), 999)):
        fast, slow = both(server, opcode, body, nodeid)
        assert fast == slow and reply([fast])[0] < 0


def test_open_of_a_directory_or_symlink_matches(server):
    for name in (b"dir", b"link"):
        nodeid = nodeid_of(reply(server.handle(request(fp.LOOKUP, name + b"\0")))[2])
        fast, slow = both(server, fp.OPEN, OPEN_IN.pack(os.O_RDONLY, 0), nodeid)
        assert fast == slow and reply([fast])[0] < 0


@pytest.mark.parametrize("opcode", [fp.READDIR, fp.READDIRPLUS])
def test_listings_match(server, opcode):
    nodeid = nodeid_of(reply(server.handle(request(fp.LOOKUP, b"dir\0")))[2])
    for name in (b"a", b"sub"):                      # held: plain entries both ways
        server.handle(request(fp.LOOKUP, name + b"\0", nodeid=nodeid))
    _, _, payload = reply(server.handle(request(fp.OPENDIR, OPEN_IN.pack(0, 0), nodeid=nodeid)))
    fh = struct.unpack_from("=Q", payload)[0]
    for size in (4096, 200, 40):                     # whole, cut short, nothing fits
        fast, slow = both(server, opcode, READ_IN.pack(fh, 0, size, 0, 0, 0, 0), nodeid)
        assert fast == slow


def test_forget_drops_what_python_would(server):
    nodeid = nodeid_of(reply(server.handle(request(fp.LOOKUP, b"file\0")))[2])
    server.handle(request(fp.LOOKUP, b"file\0"))     # two lookups
    out = bytearray(512)
    assert server.fast.serve(request(fp.FORGET, struct.pack("=Q", 1), nodeid=nodeid), out) < 0
    assert reply(server.handle(request(fp.GETATTR, bytes(16), nodeid=nodeid)))[0] == 0
    batch = struct.pack("=II", 1, 0) + struct.pack("=QQ", nodeid, 1)
    assert server.fast.serve(request(fp.BATCH_FORGET, batch), out) < 0
    assert reply(server.handle(request(fp.GETATTR, bytes(16), nodeid=nodeid)))[0] < 0


def test_posix_locks_keep_flush_release_and_forget_in_python(server):
    """POSIX lock descriptors live in Python: while an inode has them, the fast path leaves
    FLUSH, RELEASE and its last FORGET to the Python handlers (which drop the locks)."""
    nodeid = nodeid_of(reply(server.handle(request(fp.LOOKUP, b"file\0")))[2])
    _, _, payload = reply(server.handle(request(fp.OPEN, OPEN_IN.pack(os.O_RDWR, 0),
                                                nodeid=nodeid)))
    fh = struct.unpack_from("=Q", payload)[0]
    lk = struct.pack("=QQQQIIII", fh, 77, 0, 10, 1, 5, 0, 0)      # F_WRLCK by owner 77
    assert reply(server.handle(request(fp.SETLK, lk, nodeid=nodeid)))[0] == 0
    out = bytearray(512)
    flush = request(fp.FLUSH, struct.pack("=QIIQ", fh, 0, 0, 77), nodeid=nodeid)
    assert server.fast.serve(flush, out) == 0
    forget = request(fp.FORGET, struct.pack("=Q", 1), nodeid=nodeid)
    assert server.fast.serve(forget, out) == 0
    assert reply(server.handle(flush))[0] == 0                      # Python drops the lock
    assert server.fast.serve(flush, out) > 0                        # and hands it back
    release = request(fp.RELEASE, struct.pack("=QIIQ", fh, 0, 0, 0), nodeid=nodeid)
    assert server.fast.serve(release, out) > 0
    assert server.fast.serve(forget, out) < 0
    assert reply(server.handle(request(fp.GETATTR, bytes(16), nodeid=nodeid)))[0] < 0
