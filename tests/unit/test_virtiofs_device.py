"""The share as a vhost-user-fs device, driven by a synthetic frontend: FUSE requests in
descriptor chains as Linux's virtio-fs builds them, and a hostile guest's (random opcodes
and lengths, truncated headers, names with '/' or NUL, '..' at the root): every chain is
answered or returned, nothing is created outside the shared directory, the device goes on."""

from __future__ import annotations

import os
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvcore.memory import GuestMemory
from pyhv.share.options import ShareOptions
from pyhv.share.server import FuseServer
from pyhv.share.virtiofs import FsDevice
from pyhv.virtio import vhost_user as vu
from tests.helpers.vhost_user_frontend import Frontend
from tests.helpers.virtio_driver import Driver

IN_HEADER = struct.Struct("<IIQQIIIHH")            # fuse_in_header (40 bytes)
LOOKUP, MKDIR, INIT, GETATTR = 1, 9, 26, 3


@pytest.fixture(scope="module")
def share(tmp_path_factory):
    """(socket, shared dir, its parent): one backend for the module."""
    top = tmp_path_factory.mktemp("vfs")
    root = top / "shared"
    root.mkdir()
    (root / "file.txt").write_text("contents")
    server = FuseServer(ShareOptions(str(root)))
    backend = vu.Backend(FsDevice(server, "fuzz"), str(top / "fs.sock"))
    threading.Thread(target=_serve, args=(backend,), daemon=True).start()
    yield str(top / "fs.sock"), root, top
    backend.close()


def _serve(backend):
    try:
        backend.serve_forever()
    except OSError:
        pass


class Fs:
    """A virtio-fs driver on request queue 1."""

    def __init__(self, sock: str):
        self.mem = GuestMemory([(0, 8 << 20)])
        self.front = Frontend(sock, self.mem)
        self.front.handshake()
        self.drv = Driver(self.mem, 0x1000, 64, data=0x100000)
        self.front.start(1, self.drv)
        self.unique = 0

    def send(self, request: bytes, room: int = 4096) -> bytes | None:
        """The reply, or None when the chain came back without one."""
        d = self.drv
        d.data = d.data_start
        req = d.alloc(len(request), request)
        out = d.alloc(room)
        head = d.chain([(req, len(request), False), (out, room, True)])
        d.publish(head)
        self.front.kick(1)
        assert self.front.wait_call(1), "no interrupt"
        (used,) = d.take_used()
        assert used[0] == head
        return self.mem.read(out, used[1]) if used[1] else None

    def request(self, opcode: int, nodeid: int, body: bytes) -> tuple[int, bytes]:
        self.unique += 1
        reply = self.send(IN_HEADER.pack(40 + len(body), opcode, self.unique, nodeid, 0, 0,
                                         1, 0, 0) + body)
        length, error, unique = struct.unpack_from("<IiQ", reply)
        assert unique == self.unique and length == len(reply)
        return error, reply[16:]

    def init(self) -> None:
        error, _ = self.request(INIT, 0, struct.pack("<IIIII44x", 7, 38, 1 << 17, 0, 0))
        assert error == 0


def test_init_lookup_getattr(share):
    fs = Fs(share[0])
    fs.init()
    error, entry = fs.request(LOOKUP, 1, b"file.txt\0")
    assert error == 0
    nodeid = struct.unpack_from("<Q", entry)[0]
    error, attr = fs.request(GETATTR, nodeid, bytes(16))
    assert error == 0 and struct.unpack_from("<Q", attr, 24)[0] == len("contents")  # size
    assert fs.request(LOOKUP, 1, b"missing\0")[0] == -2                           # ENOENT
    fs.front.close()


def test_tag_and_queues_in_the_config_space():
    device = FsDevice(FuseServer(ShareOptions("/")), "my-tag", queues=3)
    cfg = device.config()
    assert cfg[:36].rstrip(b"\0") == b"my-tag" and struct.unpack("<I", cfg[36:]) == (3,)
    assert device.num_queues == 4
    with pytest.raises(ValueError, match="1 to 36 bytes"):
        FsDevice(FuseServer(ShareOptions("/")), "x" * 37)


def test_names_that_would_leave_the_share_are_refused(share):
    _sock, root, top = share
    fs = Fs(share[0])
    fs.init()
    for name in (b"..", b"../escape", b"a/b", b"/etc"):
        error, _ = fs.request(MKDIR, 1, struct.pack("<II", 0o755, 0) + name + b"\0")
        assert error < 0, name
    # a name ends at its NUL: "x\0y" is "x", made inside the share
    assert fs.request(MKDIR, 1, struct.pack("<II", 0o755, 0) + b"x\0y\0")[0] == 0
    assert (root / "x").is_dir()
    (root / "x").rmdir()
    assert sorted(p.name for p in top.iterdir()) == ["fs.sock", "shared"]
    assert fs.request(LOOKUP, 1, b"..\0")[0] in (0, -2)       # the root's parent is itself
    fs.front.close()


requests = st.builds(
    lambda length, opcode, nodeid, body, cut: (
        IN_HEADER.pack(length, opcode, 7, nodeid, 0, 0, 1, 0, 0) + body)[:cut],
    st.one_of(st.integers(0, 200), st.integers(0, 2**32 - 1)),
    st.one_of(st.integers(1, 52), st.integers(0, 2**32 - 1)),
    st.sampled_from([0, 1, 2, 2**64 - 1, 12345]),
    st.binary(max_size=120).map(lambda b: b.replace(b"/", b"/..")),
    st.integers(1, 200))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=st.lists(requests, min_size=1, max_size=8))
def test_hostile_requests_get_errors_and_leave_nothing_outside(share, reqs):
    _sock, root, top = share
    fs = Fs(share[0])
    fs.init()
    for raw in reqs:
        reply = fs.send(raw)
        if reply is not None:
            length, error, _unique = struct.unpack_from("<IiQ", reply)
            assert length == len(reply) and error <= 0
    assert sorted(p.name for p in top.iterdir()) == ["fs.sock", "shared"]
    error, _ = fs.request(LOOKUP, 1, b"file.txt\0")            # the device goes on
    assert error == 0
    fs.front.close()
    for p in root.iterdir():                                    # (what the fuzz made)
        if p.name != "file.txt":
            if p.is_dir() and not p.is_symlink():
                os.system(f"rm -rf '{p}'")  # noqa: S605 - a test directory
            else:
                p.unlink()


def _split(fs: Fs, opcode: int, nodeid: int, args: bytes, data: bytes = b"",
           out_args: int = 0, pages: int = 0) -> tuple[bytes, bytes, int]:
    """A request as Linux's virtio-fs lays it out: the header, the arguments and the data
    pages each in their own buffers, and likewise the reply. (reply header, reply
    arguments and data, bytes written)."""
    d = fs.drv
    d.data = d.data_start
    fs.unique += 1
    head_in = IN_HEADER.pack(40 + len(args) + len(data), opcode, fs.unique, nodeid, 0, 0, 1,
                             0, 0)
    bufs = [(d.alloc(40, head_in), 40, False), (d.alloc(len(args), args), len(args), False)]
    for at in range(0, len(data), 4096):
        piece = data[at:at + 4096]
        bufs.append((d.alloc(len(piece), piece), len(piece), False))
    out_h = d.alloc(16)
    bufs.append((out_h, 16, True))
    if out_args:
        bufs.append((d.alloc(out_args), out_args, True))
    page_bufs = [d.alloc(4096) for _ in range(pages)]
    bufs += [(p, 4096, True) for p in page_bufs]
    head = d.chain(bufs)
    d.publish(head)
    fs.front.kick(1)
    assert fs.front.wait_call(1)
    (used,) = d.take_used()
    reply = fs.mem.read(out_h, 16)
    rest = b"".join(fs.mem.read(a, n) for a, n, w in bufs[bufs.index((out_h, 16, True)) + 1:])
    return reply, rest, used[1]


def test_linux_layout_lookup_read_write_readdir(share):
    """Header, arguments and data pages in separate buffers: answered in C (the
    requests are gathered, replies scattered, READ and WRITE data moved with
    preadv/pwritev straight to and from the pages)."""
    _sock, root, _top = share
    fs = Fs(share[0])
    fs.init()
    reply, entry, n = _split(fs, LOOKUP, 1, b"file.txt\0", out_args=128)
    assert struct.unpack_from("<i", reply, 4)[0] == 0 and n == 144
    nodeid = struct.unpack_from("<Q", entry)[0]
    reply, opened, _ = _split(fs, 14, nodeid, struct.pack("<II", os.O_RDWR, 0), out_args=16)
    fh = struct.unpack_from("<Q", opened)[0]
    data = os.urandom(8192 + 100)
    reply, written, n = _split(fs, 16, nodeid, struct.pack("<QQIIQII", fh, 4096, len(data), 0,
                                                            0, 0, 0), data=data, out_args=8)
    assert struct.unpack_from("<I", written)[0] == len(data) and n == 24
    assert (root / "file.txt").read_bytes()[4096:] == data
    reply, got, n = _split(fs, 15, nodeid, struct.pack("<QQIIQII", fh, 4096, 3 * 4096, 0, 0,
                                                        0, 0), pages=3)
    assert n == 16 + len(data) and got[:len(data)] == data
    reply, listing, n = _split(fs, 28, 1, struct.pack("<QQIIQII", 0, 0, 4096, 0, 0, 0, 0),
                               pages=1)
    assert struct.unpack_from("<i", reply, 4)[0] < 0       # (no directory handle: EBADF)
    fs.front.close()
