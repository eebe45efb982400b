"""How expensive waking another CPU is on this host right now, recorded beside rows whose
figures depend on it (FUSE round trips, short connections): on a virtual machine with idle
vCPUs a cross-CPU wake-up is an IPI to a halted vCPU (~40-60 us measured here), with the
other vCPU busy it is ~6 us, and small-operation rows move with it. Runs are comparable
only at similar values."""

from __future__ import annotations

import os
import time

ROUNDS = 2000


def cross_cpu_round_trip_us() -> float | None:
    """Mean round trip (us) of one byte over two pipes between two processes
    pinned to different CPUs; None on a one-CPU host."""
    mask = os.sched_getaffinity(0)
    cpus = sorted(mask)
    if len(cpus) < 2:
        return None
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:                                # the echo side, on the second CPU
        try:
            os.sched_setaffinity(0, {cpus[1]})
            for _ in range(ROUNDS + 1):
                os.read(r1, 1)
                os.write(w2, b"x")
        finally:
            os._exit(0)
    try:
        os.sched_setaffinity(0, {cpus[0]})
        os.write(w1, b"x")                      # one round to settle placement
        os.read(r2, 1)
        t = time.perf_counter()
        for _ in range(ROUNDS):
            os.write(w1, b"x")
            os.read(r2, 1)
        return (time.perf_counter() - t) / ROUNDS * 1e6
    finally:
        os.sched_setaffinity(0, mask)
        os.waitpid(pid, 0)
        for fd in (r1, w1, r2, w2):
            os.close(fd)
