"""Concurrent requests on one qcow2 image: several threads write, discard, zero, flush and
read at once (the engine releases the GIL), then the image equals a raw model, passes
`qemu-img check` and `qemu-img compare`; and `pyhv img bench -d N` writes what
`qemu-img bench -d N` writes.

Ownership keeps the expected contents exact: in the first half of the disk the threads own
interleaved 1.5 KiB chunks, so neighbours' partial writes allocate (and copy-on-write from
the backing file) the same clusters at the same time; in the second half each thread owns
whole clusters, where it also discards and zeroes. A thread's reads of its own bytes must
always see its last write, whatever the others do to the same clusters."""

from __future__ import annotations

import random
import subprocess
import sys
import threading

import pytest

import pyhv.disk
from pyhv.disk.create import create
from tests.helpers.disk_qemu import Model, check, compare, qemu_img

SIZE = 4 << 20
THREADS = 6
CHUNK = 1536
OPS = 300

CONFIGS = {
    "64k": {},
    "4k-rc1": {"cluster_size": "4096", "refcount_bits": "1"},
    "extl2": {"extended_l2": "on", "cluster_size": "32768"},
}


def worker(disk, model: Model, t: int, seed: int, cluster: int, failures: list) -> None:
    rng = random.Random(seed * 1000 + t)
    half = SIZE // 2
    chunks = [c for c in range(half // CHUNK) if c % THREADS == t]
    clusters = [c for c in range(half // cluster, SIZE // cluster) if c % THREADS == t]
    unit = disk.core.zero_unit
    mine: list[tuple[int, int]] = []
    try:
        for _ in range(OPS):
            r = rng.random()
            if r < 0.45:
                if rng.random() < 0.5:
                    c = rng.choice(chunks)
                    lo = rng.randrange(CHUNK)
                    off, n = c * CHUNK + lo, rng.randint(1, CHUNK - lo)
                else:
                    c = rng.choice(clusters)
                    lo = rng.randrange(cluster)
                    off, n = c * cluster + lo, rng.randint(1, cluster - lo)
                data = rng.randbytes(n)
                disk.write(off, data)
                model.write(off, data)
                mine.append((off, n))
            elif r < 0.55:
                c = rng.choice(clusters)
                disk.discard(c * cluster, cluster)
                model.zero(c * cluster, cluster)
            elif r < 0.65:
                c = rng.choice(clusters)
                lo = rng.randrange(0, cluster, unit) if rng.random() < 0.5 else \
                    rng.randrange(cluster)
                n = rng.randint(1, cluster - lo)
                disk.write_zeroes(c * cluster + lo, n)
                model.zero(c * cluster + lo, n)
            elif r < 0.7:
                disk.flush()
            elif mine:
                off, n = rng.choice(mine)
                got = bytearray(n)
                disk.read(off, got)
                want = model.data[off:off + n]
                if got != want:
                    failures.append(f"thread {t}: read of {off:#x}+{n:#x} saw other bytes")
                    return
    except BaseException as e:      # noqa: BLE001 - reported by the main thread
        failures.append(f"thread {t}: {e!r}")


@pytest.mark.parametrize("backing", [False, True], ids=["plain", "backing"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("seed", [1, 2])
def test_concurrent_requests_match_model(tmp_path, config, backing, seed):
    path = tmp_path / "c.qcow2"
    opts = dict(CONFIGS[config])
    model = Model(SIZE)
    if backing:
        base = tmp_path / "base.raw"
        model.data[:] = random.Random(seed).randbytes(SIZE)
        base.write_bytes(model.data)
        qemu_img("create", "-f", "qcow2", "-b", base, "-F", "raw",
                 *(["-o", ",".join(f"{k}={v}" for k, v in opts.items())] if opts else []),
                 path, str(SIZE))
    else:
        create(str(path), "qcow2", SIZE, opts)
    with pyhv.disk.open(str(path), "qcow2") as disk:
        cluster = disk.core.cluster_size
        failures: list[str] = []
        threads = [threading.Thread(target=worker,
                                    args=(disk, model, t, seed, cluster, failures))
                   for t in range(THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not failures, failures
        got = bytearray(SIZE)
        disk.read(0, got)
        assert got == model.data
    rc, result = check(path)
    assert rc == 0, result
    done = compare(path, model.save(tmp_path / "model.raw"))
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize("args", [
    ["-w", "-c", "3000", "-d", "16", "-s", "4k"],
    ["-w", "-c", "2000", "-d", "7", "-s", "3000", "-S", "5120", "-o", "1000",
     "--pattern", "9"],
    ["-w", "-c", "1000", "-d", "4", "-s", "64k", "--flush-interval", "8"],
])
def test_bench_depth_writes_what_qemu_writes(tmp_path, args):
    """N requests in flight through the engine leave the image qemu-img's -d N leaves."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for image in (ours, theirs):
        qemu_img("create", "-f", "qcow2", "-o", "cluster_size=16384", image, "16M")
    done = subprocess.run([sys.executable, "-m", "pyhv", "img", "bench", "-f", "qcow2", *args,
                           str(ours)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Run completed in" in done.stdout
    qemu_img("bench", "-f", "qcow2", *args, theirs)
    rc, result = check(ours)
    assert rc == 0, result
    assert qemu_img("compare", ours, theirs, check=False).returncode == 0
    done = subprocess.run([sys.executable, "-m", "pyhv", "img", "bench", "-f", "qcow2", "-d",
                           "16", "-c", "4000", "-s", "4k", str(ours)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
