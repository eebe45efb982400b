"""hvcore.fs.files.FileTable: READ / WRITE answered in C from the request buffer. Anything it
does not answer (unknown or stale handles, odd sizes, other opcodes) is left to the Python
handler (it returns 0), and no input makes it read or write outside its buffers."""

from __future__ import annotations

import errno
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvcore.fs import proto as fp
from hvcore.fs.files import FileTable
from tests.helpers.share_proto import IN_HEADER, reply, request

IO_IN = struct.Struct("=QQIIQII")       # fuse_read_in / fuse_write_in (40 bytes)


@pytest.fixture
def table(tmp_path):
    t = FileTable()
    t.enabled, t.writable, t.max_io = True, True, 1 << 16
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    yield t, t.add(os.open(path, os.O_RDWR | os.O_CLOEXEC)), path


def serve(t, req: bytes, size: int = 1 << 17):
    out = bytearray(size)
    n = t.serve(req, out)
    return reply([out[:n]]) if n else None


def read_req(fh, offset, size, unique=5):
    return request(fp.READ, IO_IN.pack(fh, offset, size, 0, 0, 0, 0), unique=unique)


def write_req(fh, offset, data, flags=0, size=None):
    body = IO_IN.pack(fh, offset, len(data) if size is None else size, flags, 0, 0, 0)
    return request(fp.WRITE, body + data)


def test_read_and_write(table):
    t, fh, path = table
    assert serve(t, read_req(fh, 2, 5, unique=99)) == (0, 99, b"23456")
    assert serve(t, read_req(fh, 8, 100)) == (0, 5, b"89")
    assert not t.written(fh)
    err, _, payload = serve(t, write_req(fh, 10, b"abc"))
    assert (err, struct.unpack("=II", payload)[0]) == (0, 3)
    assert path.read_bytes() == b"0123456789abc" and t.written(fh)


def test_stale_and_unknown_handles_are_left_to_python(table):
    t, fh, path = table
    assert serve(t, read_req(fh + 1, 0, 4)) is None
    assert serve(t, read_req(0, 0, 4)) is None
    assert serve(t, read_req((7 << 32) | (fh & 0xFFFFFFFF), 0, 4)) is None   # wrong generation
    assert t.remove(fh) == (False, -1) and t.remove(fh) is None    # not written; gone
    assert serve(t, read_req(fh, 0, 4)) is None
    handles = [t.add(os.open(path, os.O_RDONLY | os.O_CLOEXEC)) for _ in range(64)]
    again = [h for h in handles if h & 0xFFFFFFFF == fh & 0xFFFFFFFF]
    assert len(again) == 1 and again[0] != fh                 # slot reused, new generation
    assert serve(t, read_req(fh, 0, 4)) is None
    assert serve(t, read_req(again[0], 0, 4)) == (0, 5, b"0123")


@pytest.mark.parametrize("req", [
    write_req(1, 0, b"abc", size=4),                              # size disagrees with the data
    write_req(1, 0, b"abc", flags=fp.WRITE_KILL_SUIDGID),         # setuid clearing: Python
    write_req(1, (1 << 63) - 2, b"abc"),                          # past the largest offset
    write_req(1, (1 << 64) - 1, b"abc"),
    read_req(1, 1 << 63, 4),
    read_req(1, 0, (1 << 16) + 1),                                # more than max_io
    read_req(1, 0, 1 << 20)[:60],                                 # truncated
    request(fp.GETATTR, bytes(40), nodeid=1),
])
def test_odd_requests_are_left_to_python(table, req):
    t, fh, path = table
    assert fh == (1 << 32) | 1
    assert serve(t, req) is None
    assert path.read_bytes() == b"0123456789"


def test_disabled_or_read_only(table):
    t, fh, path = table
    t.writable = False
    assert serve(t, write_req(fh, 0, b"x")) is None
    assert serve(t, read_req(fh, 0, 1)) == (0, 5, b"0")
    t.enabled = False
    assert serve(t, read_req(fh, 0, 1)) is None


def test_reply_buffer_too_small_and_io_errors(table, tmp_path):
    t, fh, _ = table
    assert serve(t, read_req(fh, 0, 8), size=20) is None         # 16 + 8 does not fit
    dfh = t.add(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    assert serve(t, read_req(dfh, 0, 8)) == (-errno.EISDIR, 5, b"")


@settings(max_examples=300, deadline=None)
@given(opcode=st.sampled_from([fp.READ, fp.WRITE, fp.GETATTR]), body=st.binary(max_size=120),
       fh=st.sampled_from([0, 1, (1 << 32) | 1, 1 << 63]))
def test_random_requests_never_crash(tmp_path_factory, opcode, body, fh):
    t = FileTable()
    t.enabled, t.writable, t.max_io = True, True, 64
    path = tmp_path_factory.mktemp("fast") / "f"
    path.write_bytes(b"x" * 100)
    t.add(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    body = struct.pack("=Q", fh) + body[8:]
    buf = IN_HEADER.pack(IN_HEADER.size + len(body), opcode, 1, 1, 0, 0, 0, 0, 0) + body
    out = bytearray(16 + 64)
    n = t.serve(buf, out)
    if n:
        assert 16 <= n <= len(out)
        err, unique, _ = reply([out[:n]])
        assert unique == 1 and err <= 0
    assert path.stat().st_size <= 100 + 64
