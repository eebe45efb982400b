"""Small pieces of the disk layer: zero detection, sizes, header round trips."""

from __future__ import annotations

import os
import struct

import pytest

from hvcore.qcow2 import nonzero_runs
from pyhv.disk import header as hdr
from pyhv.disk.cliutil import human, parse_size
from pyhv.disk.create import _refblock_bytes, parse_options
from pyhv.disk.errors import DiskError


def test_nonzero_runs_merges_granules():
    buf = bytearray(64 * 1024)
    buf[5000] = 1
    buf[9000] = 2
    buf[40000:41000] = b"\x01" * 1000
    assert nonzero_runs(buf, 4096) == [(4096, 12288), (36864, 45056)]
    assert nonzero_runs(bytes(10000), 512) == []
    assert nonzero_runs(b"\x00" * 100 + b"\x01", 64) == [(64, 101)]


@pytest.mark.parametrize("text,value", [("1G", 1 << 30), ("64k", 65536), ("512", 512),
                                        ("1.5M", 3 << 19), ("2T", 2 << 40)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_garbage():
    with pytest.raises(DiskError):
        parse_size("12q")


@pytest.mark.parametrize("size,text", [(0, "0 B"), (1 << 30, "1 GiB"), (200704, "196 KiB"),
                                       (3 << 29, "1.5 GiB")])
def test_human_sizes_like_qemu(size, text):
    assert human(size) == text


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refblock_widths(bits):
    data = _refblock_bytes(3, 4096 * 8 // bits, bits)
    assert len(data) == 4096
    if bits >= 8:
        assert data[:3 * bits // 8] == (1).to_bytes(bits // 8, "big") * 3
    else:   # entry i at bit i*bits of its byte, lowest first (QEMU's layout)
        per = 8 // bits
        values = [(data[i // per] >> (i % per * bits)) & ((1 << bits) - 1) for i in range(5)]
        assert values == [1, 1, 1, 0, 0]


def test_options_parse_and_refuse_unknown():
    assert parse_options("cluster_size=4k,compat=0.10") == {"cluster_size": "4k",
                                                            "compat": "0.10"}
    with pytest.raises(DiskError, match="Invalid parameter 'nope'"):
        parse_options("nope=1")


def test_header_round_trip_keeps_unknown_extensions_and_fields():
    h = hdr.Header(version=3, backing_file_offset=0, backing_file_size=0, cluster_bits=16,
                   size=1 << 30, crypt_method=0, l1_size=2, l1_table_offset=0x30000,
                   refcount_table_offset=0x10000, refcount_table_clusters=1, nb_snapshots=0,
                   snapshots_offset=0, header_length=120, extra=b"\x01" * 15)
    h.extensions = [(0x12345678, b"future"), (hdr.EXT_FEATURES, bytes(48))]
    h.set_backing("base.img", "raw")
    data = h.pack() + bytes(65536)
    back = hdr.parse(data, 1 << 20)
    assert back.extensions[0] == (hdr.EXT_BACKING_FORMAT, b"raw")
    assert (0x12345678, b"future") in back.extensions
    assert back.extra == b"\x01" * 15 and back.header_length == 120
    assert back.backing_file == "base.img" and back.backing_format == "raw"


def test_unknown_incompatible_bit_named_from_feature_table():
    h = hdr.Header(version=3, backing_file_offset=0, backing_file_size=0, cluster_bits=16,
                   size=1 << 20, crypt_method=0, l1_size=1, l1_table_offset=0x30000,
                   refcount_table_offset=0x10000, refcount_table_clusters=1, nb_snapshots=0,
                   snapshots_offset=0, header_length=104, incompatible=1 << 9)
    h.extensions = [(hdr.EXT_FEATURES, struct.pack(">BB46s", 0, 9, b"time travel"))]
    with pytest.raises(DiskError, match="Unsupported qcow2 feature\\(s\\): time travel"):
        hdr.parse(h.pack() + bytes(65536), 1 << 20)


def test_raw_extent_reader_and_piece_writer(tmp_path):
    from hvcore.qcow2_pipe import read_raw_extents, write_raw_pieces

    src = tmp_path / "s.raw"
    with open(src, "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(b"\x05" * 8192)
        f.seek(3 << 20)
        f.write(b"\x00" * 4096 + b"\x06" * 4096)
    buf = bytearray(64 * 1024)
    fd = os.open(src, os.O_RDONLY)
    try:
        pieces, pos = [], 0
        while pos < 4 << 20:
            pos, got = read_raw_extents(fd, pos, 4 << 20, buf)
            pieces += got
            if got:
                break
    finally:
        os.close(fd)
    assert pieces[0][0] == 1 << 20 and pieces[0][1] == 0
    dst = tmp_path / "d.raw"
    with open(dst, "wb") as f:
        f.truncate(4 << 20)
    fd = os.open(dst, os.O_RDWR)
    try:
        data = bytearray(16384)
        data[4096:8192] = b"\x07" * 4096
        write_raw_pieces(fd, data, [(0, 0, 16384)], 4 << 20, 4096)   # zeroes skipped
        with pytest.raises(ValueError):
            write_raw_pieces(fd, data, [(4 << 20, 0, 4096)], 4 << 20)
    finally:
        os.close(fd)
    assert dst.read_bytes()[:16384] == bytes(data)
    assert os.stat(dst).st_blocks * 512 < 64 * 1024       # only the 4 KiB of data landed


@pytest.mark.parametrize("kind", ["io_uring", "native"])
def test_aio_queue_raw_requests_and_misuse(tmp_path, kind):
    """The queue on a plain file: a count not divisible by the depth, a short buffer
    refused, a closed queue refused (never a crash)."""
    from hvcore.aio import AioQueue
    from hvcore.qcow2_pipe import raw_aio_requests

    try:
        q = AioQueue(kind, 3)
    except OSError as e:
        pytest.skip(f"{kind}: {e}")
    assert (q.kind, q.depth) == (kind, 3)
    path = tmp_path / "r.raw"
    path.write_bytes(bytes(1 << 20))
    fd = os.open(path, os.O_RDWR)
    try:
        buf = bytearray(b"\x07" * 4096)
        raw_aio_requests(q, fd, -1, buf, True, 10, 8192, 4096, 1 << 20, 0, False)
        data = path.read_bytes()
        for i in range(10):
            assert data[4096 + i * 8192:8192 + i * 8192] == b"\x07" * 4096
        assert data.count(7) == 10 * 4096
        with pytest.raises(ValueError):
            raw_aio_requests(q, fd, -1, bytearray(2 << 20), False, 1, 0, 0, 1 << 20, 0, False)
        q.close()
        q.close()
        with pytest.raises(ValueError):
            raw_aio_requests(q, fd, -1, buf, False, 1, 0, 0, 1 << 20, 0, False)
    finally:
        os.close(fd)
    with pytest.raises(ValueError):
        AioQueue("posix", 4)


def test_aio_queue_refusals_name_the_cause():
    import errno

    from hvcore.aio import _cause

    assert _cause("io_uring", errno.ENOSYS).endswith("(the kernel has no io_uring)")
    assert "ulimit -l" in _cause("io_uring", errno.ENOMEM)
    eperm = _cause("io_uring", errno.EPERM)
    assert eperm.startswith("io_uring_setup: Operation not permitted (")
    assert "io_uring_disabled" in eperm or "seccomp" in eperm
    assert _cause("native", errno.EAGAIN).endswith("(fs.aio-max-nr is reached)")
