"""`pyhv img bench` / `pyhv img convert` next to `qemu-img bench` / `qemu-img convert` on the
same images with the same flags, measured in the same run (best of 3, interleaved).
Targets: at least 1.0x qemu-img on every row."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

PYHV_IMG = [sys.executable, "-m", "pyhv", "img"]
QEMU_IMG = ["qemu-img"]
ROUNDS = 3
DATA_SIZE = 800 << 20                 # the read image: every cluster allocated


def bench_seconds(tool: list[str], *args: str) -> float:
    done = subprocess.run([*tool, "bench", *args], capture_output=True, text=True, check=True)
    return float(re.search(r"Run completed in ([0-9.]+) seconds", done.stdout).group(1))


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("diskbench")


@pytest.fixture(scope="module")
def data_image(workdir) -> Path:
    path = workdir / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(path), str(DATA_SIZE)], check=True,
                   capture_output=True)
    subprocess.run(["qemu-img", "bench", "-w", "-c", str(DATA_SIZE // 65536), "-s", "64k",
                    "--pattern", "7", str(path)], check=True, capture_output=True)
    return path


def measure(benchmark, run_anchor, run_pyhv) -> tuple[float, float]:
    """Best of ROUNDS for each, interleaved so host drift hits both alike."""
    anchors, ours = [], []

    def once():
        anchors.append(run_anchor())
        ours.append(run_pyhv())

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    return min(anchors), min(ours)


def test_bench_4k_sequential_allocating_writes(workdir, record, benchmark):
    count = 200_000
    args = ["-w", "-c", str(count), "-d", "16", "-t", "writeback", "-f", "qcow2"]

    def fresh(tool):
        path = workdir / "w.qcow2"
        subprocess.run(["qemu-img", "create", "-f", "qcow2", str(path), "4G"], check=True,
                       capture_output=True)
        return bench_seconds(tool, *args, str(path))

    q, p = measure(benchmark, lambda: fresh(QEMU_IMG), lambda: fresh(PYHV_IMG))
    record("img bench 4 KiB sequential allocating writes, depth 16", "requests/s",
           pyhv=count / p, anchor=count / q, anchor_name="qemu-img bench",
           target=1.0)


@pytest.mark.parametrize("size,count", [("4k", 400_000), ("64k", 200_000)])
def test_bench_reads(data_image, record, benchmark, size, count):
    args = ["-c", str(count), "-d", "16", "-s", size, "-t", "writeback", "-f", "qcow2",
            str(data_image)]
    q, p = measure(benchmark, lambda: bench_seconds(QEMU_IMG, *args),
                   lambda: bench_seconds(PYHV_IMG, *args))
    record(f"img bench {size} reads, depth 16, page cache", "requests/s",
           pyhv=count / p, anchor=count / q, anchor_name="qemu-img bench",
           target=1.0)


@pytest.mark.parametrize("size,count", [("4k", 400_000), ("64k", 200_000)])
def test_bench_reads_io_uring(data_image, record, benchmark, size, count):
    args = ["-i", "io_uring", "-c", str(count), "-d", "16", "-s", size, "-t", "writeback",
            "-f", "qcow2", str(data_image)]
    q, p = measure(benchmark, lambda: bench_seconds(QEMU_IMG, *args),
                   lambda: bench_seconds(PYHV_IMG, *args))
    record(f"img bench -i io_uring {size} reads, depth 16, page cache", "requests/s",
           pyhv=count / p, anchor=count / q, anchor_name="qemu-img bench -i io_uring",
           target=1.0)


@pytest.fixture(scope="module")
def half_allocated(workdir) -> tuple[Path, Path]:
    """2 GiB, every other 64 KiB cluster holding random data: raw and qcow2 copies."""
    raw = workdir / "half.raw"
    block = os.urandom(65536)
    with open(raw, "wb") as f:
        f.truncate(2 << 30)
        for i in range(0, (2 << 30) // 65536, 2):
            f.seek(i * 65536)
            f.write(i.to_bytes(8, "little") + block[8:])
    qcow = workdir / "half.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)],
                   check=True)
    return raw, qcow


@pytest.mark.parametrize("direction", ["qcow2-to-raw", "raw-to-qcow2"])
def test_convert(half_allocated, workdir, record, benchmark, direction):
    raw, qcow = half_allocated
    src, sfmt, dfmt = (qcow, "qcow2", "raw") if direction == "qcow2-to-raw" else \
        (raw, "raw", "qcow2")
    out = workdir / f"out.{dfmt}"

    def run(tool):
        if out.exists():
            out.unlink()
        return wall([*tool, "convert", "-f", sfmt, "-O", dfmt, str(src), str(out)])

    q, p = measure(benchmark, lambda: run(QEMU_IMG), lambda: run(PYHV_IMG))
    done = subprocess.run(["qemu-img", "compare", "-f", sfmt, "-F", dfmt, str(src), str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    mib = (1 << 30) / (1 << 20)           # the allocated half
    record(f"img convert {direction}, 2 GiB half allocated", "MiB/s",
           pyhv=mib / p, anchor=mib / q, anchor_name="qemu-img convert",
           target=1.0)
