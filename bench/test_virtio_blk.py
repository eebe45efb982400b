"""virtio-blk requests through the virtqueue, with no guest (TCG would hide the backend's
cost): a synthetic vhost-user frontend keeps 32 requests of 4 KiB in flight at random
offsets of a qcow2 image in the page cache, against `pyhv disk serve` and against
`qemu-storage-daemon --export type=vhost-user-blk` on the same image, interleaved, best of
3. Also the backend's CPU time per request. Target: 1.5x qemu-storage-daemon."""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.services import cpu_seconds
from hvcore.memory import GuestMemory
from tests.helpers.serving import listening
from tests.helpers.vhost_user_frontend import Frontend
from tests.helpers.virtio_driver import Driver

SIZE = 256 << 20
DEPTH, BLOCK, REQUESTS, ROUNDS = 32, 4096, 100000, 3


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vblk") / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(path), str(SIZE)], check=True,
                   capture_output=True)
    subprocess.run(["qemu-img", "bench", "-w", "-c", str(SIZE // 65536), "-s", "64k",
                    "--pattern", "7", str(path)], check=True, capture_output=True)
    return path




def pyhv_backend(image: Path) -> tuple[list[str], Path]:
    sock = image.with_suffix(".pyhv.sock")
    return ([sys.executable, "-m", "pyhv", "disk", "serve", str(image), "--socket",
                   str(sock), "-f", "qcow2"], sock), sock


def qsd_backend(image: Path) -> tuple[list[str], Path]:
    sock = image.with_suffix(".qsd.sock")
    return (["qemu-storage-daemon",
                   "--blockdev", f"driver=file,node-name=f0,filename={image}",
                   "--blockdev", "driver=qcow2,node-name=d0,file=f0",
                   "--export", f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,"
                               f"addr.path={sock},writable=on"], sock), sock




def drive(sock: Path, write: bool, seed: int) -> tuple[float, int]:
    """(requests per second, requests done) with DEPTH in flight, REQUESTS or a few more."""
    rng = random.Random(seed)
    mem = GuestMemory([(0, 64 << 20)])
    front = Frontend(str(sock), mem)
    front.handshake()
    drv = Driver(mem, 0x1000, 256, data=0x100000)
    front.start(0, drv)
    slots = {}
    for _ in range(DEPTH):                  # fixed chains, reused: only the sector changes
        hdr = drv.alloc(16, struct.pack("<IIQ", 1 if write else 0, 0, 0))
        data = drv.alloc(BLOCK, b"\x5a" * BLOCK)
        head = drv.chain([(hdr, 16, False), (data, BLOCK, not write),
                          (drv.alloc(1), 1, True)])
        slots[head] = hdr
    sectors = SIZE // BLOCK

    def submit(heads):
        for h in heads:
            mem.write(slots[h] + 8, struct.pack("<Q", rng.randrange(sectors) * (BLOCK // 512)))
        drv.publish(*heads)
        front.kick(0)

    start = time.perf_counter()
    submit(list(slots))
    done = 0
    while done < REQUESTS:
        assert front.wait_call(0, timeout=30), "the backend stopped answering"
        finished = [h for h, _n in drv.take_used()]
        done += len(finished)
        submit(finished)
    elapsed = time.perf_counter() - start
    front.close()
    return done / elapsed, done


@pytest.mark.parametrize("write", [False, True], ids=["randread", "randwrite"])
def test_virtio_blk_4k_random_depth_32(image, record, benchmark, write):
    ours, theirs, cpu_ours, cpu_theirs = [], [], [], []

    def once():
        for start, out, cpu in ((qsd_backend, theirs, cpu_theirs),
                                (pyhv_backend, ours, cpu_ours)):
            argv, sock = start(image)
            with listening(argv, sock) as proc:
                before = cpu_seconds(proc.pid)
                rate, done = drive(sock, write, seed=len(out))
                cpu.append((cpu_seconds(proc.pid) - before) / done * 1e6)
                out.append(rate)
            sock.unlink(missing_ok=True)

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    kind = "write" if write else "read"
    record(f"virtio-blk 4 KiB random {kind}, depth 32, vhost-user", "req/s",
           pyhv=max(ours), anchor=max(theirs), anchor_name="qemu-storage-daemon",
           target=1.5, cpu_us_per_request={"pyhv": round(min(cpu_ours), 2),
                                           "qemu-storage-daemon": round(min(cpu_theirs), 2)},
           runs={"pyhv": [round(x) for x in ours],
                 "qemu-storage-daemon": [round(x) for x in theirs]})
