"""Random write / discard / write-zeroes / resize sequences (hypothesis) keep a pyhv-written
image equal to a raw model, and `qemu-img check` clean after every sequence."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyhv.disk
from pyhv.disk.create import create
from tests.helpers.disk_qemu import Model, check, compare

SIZE = 1 << 20

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(1, 200_000),
              st.integers(1, 255)),
    st.tuples(st.just("discard"), st.integers(0, SIZE - 1), st.integers(1, 300_000),
              st.just(0)),
    st.tuples(st.just("zero"), st.integers(0, SIZE - 1), st.integers(1, 300_000), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("grow"), st.integers(1, 300_000), st.just(0), st.just(0)),
)

CONFIGS = {
    "4k": {"cluster_size": "4096"},
    "64k-rc1": {"refcount_bits": "1"},
    "extl2": {"extended_l2": "on", "cluster_size": "32768"},
    "v2": {"compat": "0.10", "cluster_size": "1024"},
}


def run(tmp_path, config: str, ops) -> None:
    path = tmp_path / f"h-{config}.qcow2"
    create(str(path), "qcow2", SIZE, dict(CONFIGS[config]))
    model = Model(SIZE)
    with pyhv.disk.open(str(path), "qcow2") as disk:
        unit = disk.core.zero_unit
        for kind, off, length, pattern in ops:
            size = disk.size
            off = off % size
            length = min(length, size - off)
            if kind == "write":
                disk.write(off, bytes([pattern]) * length)
                model.write(off, bytes([pattern]) * length)
            elif kind == "zero":
                disk.write_zeroes(off, length)
                model.zero(off, length)
            elif kind == "discard":
                disk.discard(off, length)
                lo = -(-off // unit) * unit           # only whole units are dropped
                hi = off + length if off + length == size else (off + length) // unit * unit
                if lo < hi:
                    model.zero(lo, hi - lo)
            elif kind == "flush":
                disk.flush()
            else:
                new = size + (off // 512 + 1) * 512
                disk.resize(new)
                model.data += bytes(new - size)
        got = bytearray(disk.size)
        disk.read(0, got)
        assert got == model.data
    rc, result = check(path)
    assert rc == 0, result
    assert compare(path, model.save(tmp_path / "model.raw")).returncode == 0


SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(ops=st.lists(op, min_size=1, max_size=25))
def test_random_ops_4k(tmp_path, ops):
    run(tmp_path, "4k", ops)


@SETTINGS
@given(ops=st.lists(op, min_size=1, max_size=25))
def test_random_ops_refcount_bits_1(tmp_path, ops):
    run(tmp_path, "64k-rc1", ops)


@SETTINGS
@given(ops=st.lists(op, min_size=1, max_size=25))
def test_random_ops_extended_l2(tmp_path, ops):
    run(tmp_path, "extl2", ops)


@SETTINGS
@given(ops=st.lists(op, min_size=1, max_size=25))
def test_random_ops_compat_010(tmp_path, ops):
    run(tmp_path, "v2", ops)


def test_refcount_table_grows_and_freed_clusters_are_reused(tmp_path):
    """512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters and the
    first refcount table 4096, so 4 MiB of data moves the table and adds many blocks."""
    path = tmp_path / "g.qcow2"
    create(str(path), "qcow2", 8 << 20, {"cluster_size": "512", "refcount_bits": "64"})
    model = Model(8 << 20)
    with pyhv.disk.open(str(path), "qcow2") as disk:
        for i in range(64):
            chunk = bytes([i + 1]) * 65536
            disk.write(i * 65536, chunk)
            model.write(i * 65536, chunk)
        disk.flush()
        end = path.stat().st_size
        disk.discard(0, 1 << 20)
        model.zero(0, 1 << 20)
        disk.flush()                      # the freed clusters become reusable here
        disk.write(6 << 20, b"\x55" * (512 << 10))
        model.write(6 << 20, b"\x55" * (512 << 10))
        disk.flush()
        assert path.stat().st_size <= end + (64 << 10)
    assert check(path)[0] == 0
    assert compare(path, model.save(tmp_path / "g.raw")).returncode == 0


def test_small_block_caches_evict_in_crash_safe_order(tmp_path):
    """Four L2 tables and four refcount blocks cached (512-byte clusters, 64-bit
    refcounts) while writes scatter over 256 L2 tables and hundreds of refcount blocks:
    every eviction writes a block back, and the image still equals the model and passes
    qemu-img check, before and after a flush."""
    import random

    from pyhv.disk.qcow2 import Qcow2Disk

    path = tmp_path / "e.qcow2"
    size = 8 << 20
    create(str(path), "qcow2", size, {"cluster_size": "512", "refcount_bits": "64"})
    model = Model(size)
    rng = random.Random(7)
    with Qcow2Disk(str(path), l2_cache_size=4 * 512, rb_cache_size=4 * 512) as disk:
        for i in range(600):
            off = rng.randrange(0, size - 3000)
            chunk = bytes([i % 255 + 1]) * rng.randint(1, 3000)
            disk.write(off, chunk)
            model.write(off, chunk)
            if i % 200 == 199:
                disk.flush()
        for off in range(0, size, 1 << 20):          # reads through evictions too
            got = bytearray(1 << 20)
            disk.read(off, got)
            assert got == model.data[off:off + (1 << 20)]
    rc, result = check(path)
    assert rc == 0, result
    assert compare(path, model.save(tmp_path / "model.raw")).returncode == 0
