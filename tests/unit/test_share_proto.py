"""hvcore.fs.proto: request decoding is bounds-checked, replies have the kernel's layout."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvcore.fs import ops as fs
from hvcore.fs import proto as fp
from tests.helpers import share_protoref as protoref
from tests.helpers.share_proto import IN_HEADER, request


@pytest.fixture(params=["cython", "python"])
def decode(request):
    """Every decoder case runs over hvcore.fs.proto and its pure-Python twin."""
    return fp.decode if request.param == "cython" else protoref.decode


def test_decode_header_and_lookup_name(decode):
    op, unique, nodeid, uid, gid, pid, args = decode(
        request(fp.LOOKUP, b"hello\0", nodeid=5, unique=99, uid=1000, gid=100, pid=42))
    assert (op, unique, nodeid, uid, gid, pid, args) == (fp.LOOKUP, 99, 5, 1000, 100, 42,
                                                         (b"hello",))


@pytest.mark.parametrize("body, err", [
    (b"a/b\0", errno.EINVAL), (b"abc", errno.EINVAL), (b"\0", errno.EINVAL),
    (b"x" * 256 + b"\0", errno.ENAMETOOLONG), (b"", errno.EINVAL),
])
def test_bad_lookup_names(body, err, decode):
    with pytest.raises(fp.ProtocolError) as e:
        decode(request(fp.LOOKUP, body, unique=5))
    assert e.value.errno == err and e.value.unique == 5


@pytest.mark.parametrize("opcode", [fp.MKDIR, fp.CREATE, fp.MKNOD])
def test_new_names_cannot_be_dot_or_dotdot(opcode, decode):
    fixed = {fp.MKDIR: 8, fp.CREATE: 16, fp.MKNOD: 16}[opcode]
    for name in (b".", b".."):
        with pytest.raises(fp.ProtocolError):
            decode(request(opcode, bytes(fixed) + name + b"\0"))


def test_truncated_and_inconsistent_requests(decode):
    with pytest.raises(fp.ProtocolError) as e:
        decode(b"\1\2\3")
    assert e.value.unique == 0
    with pytest.raises(fp.ProtocolError):        # header length disagrees with the buffer
        decode(request(fp.GETATTR, bytes(16), length=1000))
    with pytest.raises(fp.ProtocolError):        # getattr_in cut short
        decode(request(fp.GETATTR, bytes(8)))
    write_in = struct.pack("=QQIIQII", 1, 0, 4096, 0, 0, 0, 0)
    with pytest.raises(fp.ProtocolError):        # write data shorter than its size field
        decode(request(fp.WRITE, write_in + b"x" * 10))
    with pytest.raises(fp.ProtocolError):        # batch forget claiming 2**32-1 entries
        decode(request(fp.BATCH_FORGET, struct.pack("=II", 0xFFFFFFFF, 0)))


def test_unknown_opcode_decodes_to_none(decode):
    assert decode(request(9999))[6] is None


def test_write_data_is_a_view_of_the_request(decode):
    data = b"0123456789"
    buf = request(fp.WRITE, struct.pack("=QQIIQII", 3, 100, len(data), 0, 0, 0, 0) + data)
    args = decode(buf)[6]
    assert args[:2] == (3, 100) and bytes(args[5]) == data


def test_notify_layouts():
    n = fp.notify_inval_entry(7, b"name")
    assert struct.unpack_from("=IiQQII", n) == (len(n), 3, 0, 7, 4, 0) and n.endswith(b"name\0")
    n = fp.notify_inval_inode(9, 0, -1)
    assert struct.unpack("=IiQQqq", n) == (40, 2, 0, 9, 0, -1)


def test_read_dir_packs_fuse_dirents(tmp_path):
    import os
    for i in range(50):
        (tmp_path / f"file{i:03d}").write_text("x")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        names, offset = [], 0
        while True:
            data = fs.read_dir(fd, offset, 512)        # small pages: many continuations
            if not data:
                break
            pos = 0
            while pos < len(data):
                ino, off, namelen, _type = struct.unpack_from("=QQII", data, pos)
                names.append(data[pos + 24:pos + 24 + namelen].decode())
                offset = off
                pos += (24 + namelen + 7) & ~7
    finally:
        os.close(fd)
    assert sorted(names) == sorted([".", ".."] + [f"file{i:03d}" for i in range(50)])


@settings(max_examples=300, deadline=None)
@given(opcode=st.integers(0, 60), body=st.binary(max_size=200))
def test_decode_never_crashes(opcode, body):
    buf = IN_HEADER.pack(IN_HEADER.size + len(body), opcode, 1, 1, 0, 0, 0, 0, 0) + body
    try:
        fp.decode(buf)
    except fp.ProtocolError as e:
        assert e.errno in (errno.EINVAL, errno.ENAMETOOLONG, errno.E2BIG, errno.ERANGE)


def _same(buf: bytes):
    """Both decoders: the same tuple, or the same errno and unique."""
    results = []
    for dec in (fp.decode, protoref.decode):
        try:
            out = dec(buf)
            results.append(("ok", out[:6], None if out[6] is None else tuple(
                bytes(a) if isinstance(a, memoryview) else a for a in out[6])))
        except fp.ProtocolError as e:
            results.append(("error", e.errno, e.unique))
    assert results[0] == results[1], (buf, results)


@settings(max_examples=1500, deadline=None)
@given(opcode=st.sampled_from(sorted(set(range(0, 52)) | {9999})),
       body=st.one_of(st.binary(max_size=120),
                      st.builds(lambda fixed, name, more: fixed + name + more,
                                st.binary(min_size=0, max_size=48),
                                st.sampled_from([b"a\0", b".\0", b"..\0", b"a/b\0",
                                                 b"x" * 256 + b"\0", b"\0", b"n"]),
                                st.binary(max_size=16))),
       length_delta=st.sampled_from([0, 0, 0, 1, -1]))
def test_python_twin_agrees_with_the_cython_decoder(opcode, body, length_delta):
    total = IN_HEADER.size + len(body)
    _same(IN_HEADER.pack(total + length_delta, opcode, 9, 1, 0, 0, 0, 0, 0) + body)
