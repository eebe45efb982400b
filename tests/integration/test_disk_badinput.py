"""Malformed images: a clear one-line error, no crash, no write where the format does not
allow one, and the process keeps running (every case runs in this test process)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyhv.disk
from hvcore.qcow2 import Qcow2Error
from pyhv.disk.errors import DiskError
from tests.helpers.disk_qemu import qemu_img, qemu_io

EXPECTED = (DiskError, Qcow2Error)
CS = 65536


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    """16 MiB image, 64 KiB clusters: header 0, refcount table 0x10000, block 0x20000,
    L1 0x30000, first L2 0x40000, data after; one compressed cluster."""
    d = tmp_path_factory.mktemp("good")
    raw = d / "src.raw"
    raw.write_bytes(b"\x11" * CS * 4 + bytes(CS * 60) + b"abc" * 30000)
    img = d / "g.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, img)
    qemu_io(img, "write -P 7 2M 200k")
    return img.read_bytes()


def mutate(data: bytes, offset: int, value: bytes) -> bytes:
    b = bytearray(data)
    b[offset:offset + len(value)] = value
    return bytes(b)


READ_SPAN = 16 << 20


def exercise(path, expect_error: str | None = None) -> list[str]:
    """Open, read everything, write a little; only our clear one-line errors may come out,
    and cluster 0 (header) changes only through a header rewrite of known fields."""
    before = path.read_bytes()
    errors: list[str] = []

    def attempt(fn) -> None:
        try:
            fn()
        except EXPECTED as e:
            assert "\n" not in str(e)
            errors.append(str(e))

    def run() -> None:
        with pyhv.disk.open(str(path), "qcow2") as disk:
            # a flipped size field can make a sparse disk of terabytes: read its start and
            # its end, never a buffer of its whole size
            buf = bytearray(min(disk.size, READ_SPAN))
            attempt(lambda: disk.read(0, buf))
            attempt(lambda: disk.read(disk.size - len(buf), buf))
            attempt(lambda: disk.write(0, b"\x99" * 5000))
            attempt(lambda: disk.write(2 << 20, b"\x98" * 70000))
            attempt(disk.flush)

    attempt(run)
    after = path.read_bytes()
    if errors:
        assert after[:104] == before[:104] or after[:4] == b"QFI\xfb"
    if expect_error:
        assert any(expect_error in e for e in errors), errors
    return errors


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


CASES = {
    "bad-magic": (0, b"QFI\x00", "Image is not in qcow2 format"),
    "version-9": (4, struct.pack(">I", 9), "Unsupported qcow2 version 9"),
    "cluster-bits-30": (20, struct.pack(">I", 30), "cluster size"),
    "cluster-bits-8": (20, struct.pack(">I", 8), "cluster size"),
    "absurd-size": (24, be64(1 << 63), "too large"),
    "l1-too-small": (36, struct.pack(">I", 0), "L1 table is too small"),
    "l1-huge": (36, struct.pack(">I", 1 << 30), "L1 table too large"),
    "l1-outside": (40, be64(1 << 40), "L1 table"),
    "l1-unaligned": (40, be64(0x30008), "L1 table offset"),
    "rt-overlaps-l1": (48, be64(0x30000), "overlaps"),
    "rt-outside": (48, be64(1 << 40), "refcount table"),
    "rt-clusters-0": (56, struct.pack(">I", 0), "Reference count table too large"),
    "unknown-incompat": (72, be64(1 << 40), "Unsupported qcow2 feature"),
    "crypt": (32, struct.pack(">I", 1), "encrypted"),
    "refcount-order-7": (96, struct.pack(">I", 7), "Reference count entry width"),
    "snapshots-outside": (60, struct.pack(">IQ", 1, 1 << 40), "snapshot"),
    "backing-name-long": (8, be64(0x200) + struct.pack(">I", 5000), "backing file name"),
    "l2-outside": (0x30000, be64((1 << 63) | (1 << 44)), "past the end of the file"),
    "l2-unaligned": (0x30000, be64((1 << 63) | 0x40200), "not cluster aligned"),
    "l2-into-refcount-table": (0x30000, be64((1 << 63) | 0x10000), "overlaps"),
    "l2-into-header": (0x30000, be64((1 << 63) | 0x0), None),
    "data-into-l1": (0x40000 + 8 * 32, be64((1 << 63) | 0x30000), "metadata"),
    "data-outside": (0x40000 + 8 * 32, be64((1 << 63) | (1 << 45)), "past the end"),
    "data-unaligned": (0x40000 + 8 * 32, be64((1 << 63) | 0x50200), "not cluster aligned"),
    "compressed-past-end": (0x40000, be64((1 << 62) | (1 << 50) | 0xFFFFFFFF00), None),
    "refblock-unaligned": (0x10000, be64(0x20008), None),
    "refblock-outside": (0x10000, be64(1 << 44), None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_field(tmp_path, good, name):
    offset, value, message = CASES[name]
    path = tmp_path / "bad.qcow2"
    bad = mutate(good, offset, value)
    path.write_bytes(bad)
    exercise(path, message)
    if name == "data-into-l1":                # the refused write left the L1 table alone
        assert path.read_bytes()[0x30000:0x40000] == bad[0x30000:0x40000]


@pytest.mark.parametrize("cut", [0, 50, 103, CS + 8, 0x30004, 0x40000 + 100, 0x60000])
def test_truncated_file(tmp_path, good, cut):
    path = tmp_path / "cut.qcow2"
    path.write_bytes(good[:cut])
    exercise(path)


def test_backing_file_loop(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", a, "1M")
    qemu_img("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b)
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    with pytest.raises(DiskError, match="creates an infinite loop"):
        pyhv.disk.open(str(b), "qcow2")


def test_corrupt_bit_opens_read_only_only(tmp_path, good):
    """As QEMU: an image marked corrupt opens read-only, never read/write (a repair
    excepted: `img check -r`)."""
    path = tmp_path / "c.qcow2"
    path.write_bytes(mutate(good, 72, be64(2)))
    with pytest.raises(DiskError, match="Image is corrupt; cannot be opened read/write"):
        pyhv.disk.open(str(path), "qcow2")
    with pyhv.disk.open(str(path), "qcow2", readonly=True) as disk:
        with pytest.raises(Qcow2Error, match="read-only"):
            disk.write(0, b"x")
    assert path.read_bytes() == mutate(good, 72, be64(2))


def test_raw_that_looks_like_qcow2_stays_raw(tmp_path, good):
    path = tmp_path / "r.img"
    path.write_bytes(good)
    with pyhv.disk.open(str(path), "raw") as disk:
        assert disk.format == "raw" and disk.size == len(good)
        disk.write(0, b"QFI\xfb")           # the user said raw: no restriction
    plain = tmp_path / "p.img"
    plain.write_bytes(bytes(4096))
    with pyhv.disk.open(str(plain)) as disk:  # probed: a warning, block 0 protected
        with pytest.raises(DiskError, match="block 0"):
            disk.write(0, b"QFI\xfb")


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 0x60000), st.integers(0, 255)),
                      min_size=1, max_size=8))
def test_random_metadata_corruption(tmp_path, good, flips):
    data = bytearray(good)
    for off, value in flips:
        data[off] = value
    path = tmp_path / "fuzz.qcow2"
    path.write_bytes(data)
    exercise(path)
