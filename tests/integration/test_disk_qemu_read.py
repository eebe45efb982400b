"""Images made by qemu-img/qemu-io read back byte-identical through pyhv, and what pyhv
then writes into them passes `qemu-img check` and `qemu-img compare` against a raw model."""

from __future__ import annotations

import random

import pytest

import pyhv.disk
from tests.helpers.disk_qemu import (
    Model,
    apply,
    check,
    compare,
    qemu_img,
    qemu_io,
    qemu_io_commands,
    random_ops,
)

SIZE = 4 << 20

CASES = [
    ("cs512", "cluster_size=512"),
    ("cs4k", "cluster_size=4096"),
    ("cs64k", "cluster_size=65536"),
    ("cs2M", "cluster_size=2097152"),
    ("compat010", "compat=0.10"),
    ("rc1", "refcount_bits=1"),
    ("rc2", "refcount_bits=2"),
    ("rc4", "refcount_bits=4,cluster_size=4096"),
    ("rc8", "refcount_bits=8"),
    ("rc32", "refcount_bits=32,cluster_size=1024"),
    ("rc64", "refcount_bits=64,cluster_size=512"),
    ("lazy", "lazy_refcounts=on"),
    ("extl2", "extended_l2=on"),
    ("extl2-32k", "extended_l2=on,cluster_size=32768"),
    ("zstd", "compression_type=zstd"),
    ("prealloc", "preallocation=metadata"),
]


def read_all(disk) -> bytes:
    buf = bytearray(disk.size)
    step = 1 << 20
    for off in range(0, disk.size, step):
        disk.read(off, memoryview(buf)[off:off + step])
    return bytes(buf)


@pytest.mark.parametrize("name,options", CASES, ids=[c[0] for c in CASES])
def test_qemu_written_image_reads_identical_then_pyhv_writes_stay_clean(tmp_path, name, options):
    rng = random.Random(name)
    img = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", options, img, SIZE)
    unit = 65536 if "cluster_size" not in options else \
        int(options.split("cluster_size=")[1].split(",")[0])
    model = Model(SIZE)
    ops = random_ops(rng, SIZE, 30, unit)
    qemu_io(img, *qemu_io_commands(ops))
    apply(model, ops)
    with pyhv.disk.open(str(img), "qcow2", readonly=True) as disk:
        assert read_all(disk) == bytes(model.data)
    ops = random_ops(rng, SIZE, 30, unit)
    with pyhv.disk.open(str(img), "qcow2") as disk:
        for kind, off, length, pattern in ops:
            if kind == "write":
                disk.write(off, bytes([pattern]) * length)
            else:
                disk.write_zeroes(off, length)
    apply(model, ops)
    rc, result = check(img)
    assert rc == 0, result
    assert compare(img, model.save(tmp_path / "model.raw")).returncode == 0


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_clusters_read_and_rewrite(tmp_path, ctype):
    rng = random.Random(ctype)
    raw = tmp_path / "src.raw"
    data = bytearray(SIZE)
    for _ in range(40):
        off = rng.randrange(0, SIZE - 70000)
        data[off:off + 70000] = bytes([rng.randrange(256)]) * 35000 + rng.randbytes(35000)
    raw.write_bytes(data)
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type={ctype}",
             raw, img)
    info = qemu_img("check", img).stdout
    assert "compressed clusters" in info and " 0.00% compressed" not in info
    with pyhv.disk.open(str(img)) as disk:
        assert read_all(disk) == bytes(data)
        disk.write(12345, b"\x07" * 5000)        # partial overwrite of a compressed cluster
        disk.write_zeroes(200000, 100)
    data[12345:17345] = b"\x07" * 5000
    data[200000:200100] = bytes(100)
    raw.write_bytes(data)
    assert check(img)[0] == 0
    assert compare(img, raw).returncode == 0


def test_backing_chain_three_deep(tmp_path):
    model = Model(SIZE)
    base = tmp_path / "base.raw"
    rng = random.Random(3)
    model.data[:] = rng.randbytes(SIZE)
    base.write_bytes(model.data)
    base_bytes = bytes(model.data)
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "sub" / "top.qcow2"
    top.parent.mkdir()
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid)
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "../mid.qcow2",
             "-F", "qcow2", top)
    for img in (mid, top):
        ops = random_ops(rng, SIZE, 20, 4096)
        qemu_io(img, *qemu_io_commands(ops))
        apply(model, ops)
    with pyhv.disk.open(str(top)) as disk:
        assert read_all(disk) == bytes(model.data)
        ops = random_ops(rng, SIZE, 20, 4096)     # partial writes copy from the backing
        for kind, off, length, pattern in ops:
            if kind == "write":
                disk.write(off, bytes([pattern]) * length)
            else:
                disk.write_zeroes(off, length)
    apply(model, ops)
    assert check(top)[0] == 0
    assert compare(top, model.save(tmp_path / "m.raw")).returncode == 0
    assert base.read_bytes() == base_bytes         # backing files are opened read-only


def test_internal_snapshots_are_preserved(tmp_path):
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", img, SIZE)
    qemu_io(img, "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "one", img)
    with pyhv.disk.open(str(img)) as disk:
        disk.write(4096, b"\x02" * 8192)          # shared cluster: must be copied
        disk.write(2 << 20, b"\x03" * 4096)
    assert check(img)[0] == 0
    qemu_img("snapshot", "-a", "one", img)         # the snapshot still holds the old data
    snap = tmp_path / "snap.raw"
    qemu_img("convert", "-O", "raw", img, snap)
    assert snap.read_bytes()[:1 << 20] == b"\x01" * (1 << 20)
    assert snap.read_bytes()[2 << 20:(2 << 20) + 4096] == bytes(4096)
