"""FuseServer.handle fed raw requests (no kernel): malformed input gets an error reply and
the server keeps serving; nothing outside the shared directory is ever reached."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvcore.fs import proto as fp
from pyhv.share.options import ShareOptions
from pyhv.share.server import FuseServer
from tests.helpers.share_proto import IN_HEADER, init_request, nodeid_of, reply, request

OPEN_IN = struct.Struct("=II")
READ_IN = struct.Struct("=QQIIQII")


@pytest.fixture
def tree(tmp_path):
    """share/ with a file, a dir, symlinks pointing out; outside/ next to it holds a secret."""
    share, outside = tmp_path / "share", tmp_path / "outside"
    share.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("SECRET")
    (share / "file").write_text("inside")
    (share / "dir").mkdir()
    os.symlink(str(outside / "secret"), share / "abs-link")
    os.symlink("../outside/secret", share / "rel-link")
    os.symlink("../outside", share / "dir-link")
    return share, outside


@pytest.fixture(params=["handles", "handles, 1 cached fd", "descriptors"])
def server(request, tree, monkeypatch):
    """The server as root runs it (inodes as file handles, a descriptor cache), with a cache of
    one descriptor (every use reopens by handle), and as a non-root server keeps them
    (descriptors only: no CAP_DAC_READ_SEARCH)."""
    if request.param == "descriptors":
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
    s = FuseServer(ShareOptions(str(tree[0]), fd_cache=1 if "1 cached" in request.param else 0))
    if os.getuid() == 0:
        assert s.inodes.use_handles == (request.param != "descriptors")
    err, _, _ = reply(s.handle(init_request()))
    assert err == 0
    yield s
    s.close()


def call(server, opcode, body=b"", nodeid=1, **kw):
    return reply(server.handle(request(opcode, body, nodeid=nodeid, **kw)))


def lookup(server, name: bytes, parent=1):
    err, _, payload = call(server, fp.LOOKUP, name + b"\0", nodeid=parent)
    return err, (nodeid_of(payload) if err == 0 else None)


def read_file(server, nodeid) -> tuple[int, bytes]:
    err, _, payload = call(server, fp.OPEN, OPEN_IN.pack(os.O_RDONLY, 0), nodeid=nodeid)
    if err:
        return err, b""
    fh = struct.unpack_from("=Q", payload)[0]
    err, _, data = call(server, fp.READ, READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0), nodeid=nodeid)
    return err, data


def test_requests_before_init_fail(tree):
    s = FuseServer(ShareOptions(str(tree[0])))
    assert reply(s.handle(request(fp.GETATTR, bytes(16))))[0] == -errno.EIO
    s.close()


def test_init_refuses_old_protocols(tree):
    s = FuseServer(ShareOptions(str(tree[0])))
    assert reply(s.handle(init_request(minor=30)))[0] == -errno.EPROTO
    s.close()


@pytest.mark.parametrize("buf, expect", [
    (b"", None), (b"\x01" * 10, None),
    (request(fp.GETATTR, bytes(16), length=5000), -errno.EINVAL),
    (request(9999), -errno.ENOSYS), (request(37, bytes(16)), -errno.ENOSYS),   # BMAP
    (request(fp.LOOKUP, b"a/b\0"), -errno.EINVAL), (request(fp.LOOKUP, b"ab"), -errno.EINVAL),
    (request(fp.LOOKUP, b"a\0b\0"), -errno.ENOENT),     # the name ends at the first NUL
    (request(fp.LOOKUP, b"x" * 300 + b"\0"), -errno.ENAMETOOLONG),
    (request(fp.GETATTR, bytes(16), nodeid=12345), -errno.ESTALE),
    (request(fp.READ, READ_IN.pack(999, 0, 10, 0, 0, 0, 0)), -errno.EBADF),
    (request(fp.MKDIR, struct.pack("=II", 0o755, 0) + b"..\0"), -errno.EINVAL),
    (request(fp.SETXATTR, struct.pack("=II", 1 << 20, 0) + b"user.x\0"), -errno.E2BIG),
    (request(fp.WRITE, READ_IN.pack(1, 0, 1 << 30, 0, 0, 0, 0) + b"abc"), -errno.EINVAL),
    (request(fp.BATCH_FORGET, struct.pack("=II", 0xFFFFFFFF, 0)), -errno.EINVAL),
])
def test_bad_requests_get_error_replies(server, buf, expect):
    out = server.handle(buf)
    if expect is None:
        assert out == []
    else:
        assert reply(out)[0] == expect
    assert reply(server.handle(request(fp.GETATTR, bytes(16))))[0] == 0   # still serving


def test_absurd_sizes_and_offsets(server):
    _, nodeid = lookup(server, b"file")
    err, _, payload = call(server, fp.OPEN, OPEN_IN.pack(os.O_RDWR, 0), nodeid=nodeid)
    fh = struct.unpack_from("=Q", payload)[0]
    for size, offset in ((0xFFFFFFFF, 0), (10, 1 << 64 - 1), (10, (1 << 63) + 5)):
        err, _, _ = call(server, fp.READ, READ_IN.pack(fh, offset, size, 0, 0, 0, 0),
                         nodeid=nodeid)
        assert err == -errno.EINVAL
    body = READ_IN.pack(fh, (1 << 64) - 2, 3, 0, 0, 0, 0) + b"abc"
    assert call(server, fp.WRITE, body, nodeid=nodeid)[0] == -errno.EFBIG
    lseek = struct.pack("=QQII", fh, (1 << 64) - 1, 3, 0)
    assert call(server, fp.LSEEK, lseek, nodeid=nodeid)[0] == -errno.ENXIO
    falloc = struct.pack("=QQQII", fh, 1 << 63, 1 << 63, 0, 0)
    assert call(server, fp.FALLOCATE, falloc, nodeid=nodeid)[0] == -errno.EINVAL


def test_dotdot_at_root_stays_at_root(server):
    assert lookup(server, b"..") == (0, 1)
    _, d = lookup(server, b"dir")
    assert lookup(server, b"..", parent=d) == (0, 1)
    assert lookup(server, b".", parent=d) == (0, d)


def test_symlinks_are_returned_never_followed(server, tree):
    for name in (b"abs-link", b"rel-link"):
        err, node = lookup(server, name)
        assert err == 0
        err, _, target = call(server, fp.READLINK, nodeid=node)
        assert err == 0 and target == os.readlink(tree[0] / name.decode()).encode()
        assert read_file(server, node) == (-errno.ELOOP, b"")
        attr_body = struct.pack("=IIQQQQQQQIIIIIIII", fp.FATTR["SIZE"], 0, 0, 0, 0, 0, 0, 0,
                                0, 0, 0, 0, 0, 0, 0, 0, 0)
        assert call(server, fp.SETATTR, attr_body, nodeid=node)[0] == -errno.EINVAL
    _, dirlink = lookup(server, b"dir-link")
    assert lookup(server, b"secret", parent=dirlink)[0] == -errno.ENOTDIR
    mk = struct.pack("=II", 0o755, 0) + b"created\0"
    assert call(server, fp.MKDIR, mk, nodeid=dirlink)[0] != 0
    assert call(server, fp.OPENDIR, OPEN_IN.pack(0, 0), nodeid=dirlink)[0] != 0
    assert sorted(os.listdir(tree[1])) == ["secret"]


def test_create_through_a_dangling_or_outward_symlink_fails(server, tree):
    os.symlink(str(tree[1] / "new-file"), tree[0] / "dangling")
    create = struct.pack("=IIII", os.O_WRONLY | os.O_CREAT, 0o644, 0, 0) + b"dangling\0"
    assert call(server, fp.CREATE, create)[0] == -errno.ELOOP
    assert not (tree[1] / "new-file").exists()


def test_hard_link_of_a_symlink_links_the_symlink(server, tree):
    _, node = lookup(server, b"abs-link")
    assert call(server, fp.LINK, struct.pack("=Q", node) + b"copy\0")[0] == 0
    assert os.path.islink(tree[0] / "copy")
    assert os.stat(tree[1] / "secret").st_nlink == 1


def test_link_from_unknown_nodeid_is_refused(server, tree):
    assert call(server, fp.LINK, struct.pack("=Q", 999) + b"x\0")[0] == -errno.ESTALE


def test_forget_drops_descriptors(server):
    before = len(os.listdir("/proc/self/fd"))
    err, node = lookup(server, b"file")
    lookup(server, b"file")
    assert server.handle(request(fp.FORGET, struct.pack("=Q", 2), nodeid=node)) == []
    assert len(os.listdir("/proc/self/fd")) == before
    assert call(server, fp.GETATTR, bytes(16), nodeid=node)[0] == -errno.ESTALE


def test_readonly_share_refuses_changes(tree):
    s = FuseServer(ShareOptions(str(tree[0]), readonly=True))
    reply(s.handle(init_request()))
    mk = struct.pack("=II", 0o755, 0) + b"new\0"
    assert reply(s.handle(request(fp.MKDIR, mk)))[0] == -errno.EROFS
    _, node = lookup(s, b"file")
    err, _, _ = reply(s.handle(request(fp.OPEN, OPEN_IN.pack(os.O_WRONLY, 0), nodeid=node)))
    assert err == -errno.EROFS
    assert read_file(s, node) == (0, b"inside")
    s.close()


def test_device_nodes_need_allow_devices(server, tree):
    mknod = struct.pack("=IIII", 0o20644, (1 << 8) | 3, 0, 0) + b"null\0"   # char 1:3
    assert call(server, fp.MKNOD, mknod)[0] == -errno.EPERM
    assert not (tree[0] / "null").exists()


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opcode=st.sampled_from(sorted(set(range(1, 52)) - {fp.INIT, fp.DESTROY})),
       nodeid=st.sampled_from([1, 2, 3, 0, 2**64 - 1]), body=st.binary(max_size=120))
def test_random_requests_never_crash_or_escape(server, tree, opcode, nodeid, body):
    buf = IN_HEADER.pack(IN_HEADER.size + len(body), opcode, 77, nodeid, 0, 0, 1, 0, 0) + body
    out = server.handle(buf)
    if out:
        err, unique, _ = reply(out)
        assert unique == 77 and err <= 0
    assert sorted(os.listdir(tree[1])) == ["secret"]
    assert (tree[1] / "secret").read_text() == "SECRET"
    assert Path(tree[1]).stat().st_nlink == 2


def test_more_inodes_than_cached_descriptors(tree):
    """Root names inodes by file handles: the client may know far more inodes than the
    descriptor cache holds, and each still answers (reopened by handle)."""
    if os.geteuid() != 0:
        pytest.skip("open_by_handle_at needs CAP_DAC_READ_SEARCH (root)")
    share = tree[0]
    for i in range(300):
        (share / f"n{i}").write_text(str(i))
    s = FuseServer(ShareOptions(str(share), fd_cache=16))
    try:
        reply(s.handle(init_request()))
        nodes = [lookup(s, f"n{i}".encode()) for i in range(300)]
        assert all(err == 0 for err, _ in nodes)
        assert s.inodes.cached_fds() <= 16 + 1          # + the root's own descriptor
        for i, (_, node) in enumerate(nodes):
            err, _, payload = call(s, fp.OPEN, OPEN_IN.pack(os.O_RDONLY, 0), nodeid=node)
            fh = struct.unpack_from("=Q", payload)[0]
            read = READ_IN.pack(fh, 0, 100, 0, 0, 0, 0)
            assert call(s, fp.READ, read, nodeid=node)[::2] == (0, str(i).encode())
            assert call(s, fp.RELEASE, struct.pack("=QIIQ", fh, 0, 0, 0), nodeid=node)[0] == 0
            assert call(s, fp.GETATTR, bytes(16), nodeid=node)[0] == 0
        assert s.inodes.cached_fds() <= 16 + 1
    finally:
        s.close()


def test_open_file_survives_unlink_and_eviction(tree):
    """An open file holds its inode's descriptor: after the host unlinks it (the handle is
    stale now) and the cache turned over, the open file still reads and stats."""
    if os.geteuid() != 0:
        pytest.skip("open_by_handle_at needs CAP_DAC_READ_SEARCH (root)")
    share = tree[0]
    for i in range(40):
        (share / f"n{i}").write_text(str(i))
    s = FuseServer(ShareOptions(str(share), fd_cache=4))
    try:
        reply(s.handle(init_request()))
        _, node = lookup(s, b"file")
        err, _, payload = call(s, fp.OPEN, OPEN_IN.pack(os.O_RDONLY, 0), nodeid=node)
        fh = struct.unpack_from("=Q", payload)[0]
        os.unlink(share / "file")
        for i in range(40):
            lookup(s, f"n{i}".encode())
        err, _, data = call(s, fp.READ, READ_IN.pack(fh, 0, 100, 0, 0, 0, 0), nodeid=node)
        assert (err, data) == (0, b"inside")
        assert call(s, fp.GETATTR, bytes(16), nodeid=node)[0] == 0
        assert call(s, fp.RELEASE, struct.pack("=QIIQ", fh, 0, 0, 0), nodeid=node)[0] == 0
        assert lookup(s, b"file")[0] == -errno.ENOENT
    finally:
        s.close()


def test_read_and_write_go_through_the_c_fast_path(server, tree):
    """After INIT, READ / WRITE on an open file are answered by fsops.FileTable."""
    assert server.files.enabled
    _, node = lookup(server, b"file")
    err, _, payload = call(server, fp.OPEN, OPEN_IN.pack(os.O_RDWR, 0), nodeid=node)
    fh = struct.unpack_from("=Q", payload)[0]
    req = request(fp.WRITE, READ_IN.pack(fh, 6, 4, 0, 0, 0, 0) + b"-now")
    out = bytearray(256)
    assert server.files.serve(req, out) == 24 and server.files.written(fh)
    req = request(fp.READ, READ_IN.pack(fh, 0, 100, 0, 0, 0, 0))
    n = server.files.serve(req, out)
    assert reply([out[:n]])[::2] == (0, b"inside-now")
    assert (tree[0] / "file").read_text() == "inside-now"


def test_readdirplus_skips_inodes_the_client_holds(server, tree):
    """READDIRPLUS looks up (and returns attributes for) only names whose inode the client
    does not hold yet; the others are plain entries (nodeid 0), as '.' and '..' are."""
    _, file_node = lookup(server, b"file")
    err, _, payload = call(server, fp.OPENDIR, OPEN_IN.pack(os.O_RDONLY, 0))
    fh = struct.unpack_from("=Q", payload)[0]
    err, _, data = call(server, fp.READDIRPLUS, READ_IN.pack(fh, 0, 65536, 0, 0, 0, 0))
    assert err == 0
    nodeids, pos = {}, 0
    while pos < len(data):
        nodeid = struct.unpack_from("=Q", data, pos)[0]
        _ino, _off, namelen, _type = struct.unpack_from("=QQII", data, pos + 128)
        nodeids[data[pos + 152:pos + 152 + namelen]] = nodeid
        pos += (152 + namelen + 7) & ~7
    assert nodeids[b"."] == nodeids[b".."] == 0
    assert nodeids[b"file"] == 0                       # already held: not looked up again
    assert nodeids[b"dir"] not in (0, file_node)        # new: looked up, with attributes
    assert call(server, fp.GETATTR, bytes(16), nodeid=nodeids[b"dir"])[0] == 0


@pytest.mark.parametrize("path", ["handle", "dispatch"])
def test_cache_auto_keeps_an_unchanged_file(server, tree, path):
    """--cache auto (the default): OPEN says FOPEN_KEEP_CACHE when the file is as the client's
    last open found it, never after a host change (`pyhv.share.options`); `handle` answers
    OPEN in C, `dispatch` in Python."""
    serve = getattr(server, path)
    _, node = lookup(server, b"file")

    def keeps() -> bool:
        err, _, payload = reply(serve(request(fp.OPEN, OPEN_IN.pack(os.O_RDONLY, 0),
                                              nodeid=node)))
        assert err == 0
        fh, flags = struct.unpack_from("=QI", payload)
        assert call(server, fp.RELEASE, struct.pack("=QIIQ", fh, 0, 0, 0), nodeid=node)[0] == 0
        return bool(flags & fp.FOPEN["KEEP_CACHE"])

    assert not keeps()                          # nothing cached yet
    assert keeps()
    (tree[0] / "file").write_text("changed on the host")
    assert not keeps()
    assert keeps()
    os.utime(tree[0] / "file", ns=(1, 1))       # only the mtime (and ctime) move
    assert not keeps()
    assert keeps()
