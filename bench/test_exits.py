"""VM-exit round trips through pyhv's full dispatch (KVM_RUN -> exit decode in Cython ->
range bus -> a Cython device -> back), next to a C program doing the same loop on raw KVM
ioctls (bench/ref/kvm_exit_loop.c), built and run in the same session. Target: >= 0.85x."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from hvcore.devices import Probe
from pyhv.machine.machine import Machine

REF = Path(__file__).parent / "ref" / "kvm_exit_loop.c"
PORT, MMIO = 0x510, 0xD000_0000
EXITS = 400_000
# The same guest bytes as the C anchor (see bench/ref/README.md), at GPA 0x1000, real mode.
PIO_LOOP = bytes.fromhex("ba1005 b042 ee ec ebfc".replace(" ", ""))
MMIO_LOOP = bytes.fromhex("66bb000000d0 66b878563412 67668903 67668b03 ebf6".replace(" ", ""))


@pytest.fixture(scope="module")
def anchor_binary(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "kvm_exit_loop"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(REF)], check=True)
    return out


def anchor_rate(binary: Path, mode: str) -> float:
    done = subprocess.run([str(binary), mode, str(EXITS)], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)["exits_per_second"]


def pyhv_rate(mode: str) -> float:
    """Exits per second in steady state: counters sampled while the guest loops."""
    with Machine(memory=16 << 20, console=-1, irqchip=True) as m:
        probe = Probe(read_value=0x5A5A5A5A)
        if mode == "pio":
            m.pio.add(PORT, 1, probe)
            m.load_flat(PIO_LOOP, 0x1000)
        else:
            m.mmio.add(MMIO, 0x1000, probe)
            m.load_flat(MMIO_LOOP, 0x1000)
            m.vcpus[0].set_sregs(ds={"base": 0, "limit": 0xFFFFFFFF, "g": 1})
        runner = threading.Thread(target=m.run)
        runner.start()
        while probe.reads + probe.writes < 1000:      # warm-up, as the anchor does
            time.sleep(0.001)
        start_n, start_t = probe.reads + probe.writes, time.perf_counter()
        while probe.reads + probe.writes - start_n < EXITS:
            time.sleep(0.01)
        rate = (probe.reads + probe.writes - start_n) / (time.perf_counter() - start_t)
        m.stop()
        runner.join()
    return rate


@pytest.mark.parametrize("mode", ["pio", "mmio"])
def test_exit_round_trips(mode, anchor_binary, record, benchmark):
    # Interleave the two so drift on the host hits both alike; keep each one's best of 3.
    anchors, ours = [], []

    def once():
        anchors.append(anchor_rate(anchor_binary, mode))
        ours.append(pyhv_rate(mode))

    benchmark.pedantic(once, rounds=3, iterations=1)
    record(f"{mode} exits", "exits/s", pyhv=max(ours), anchor=max(anchors),
           anchor_name="raw KVM ioctl loop in C", target=0.85)
