"""Start to the guest command's status: `pyhv run --engine kvm` against
`qemu-system-x86_64 -accel kvm` with the same kernel, initrd and command line (the default
guest running `true`). Both end when the guest resets after printing its status line.

Run where KVM runs guest kernel code natively (the test bed on PVM machines):
    python -m bench.bootclock [ROUNDS]
prints one JSON line: each engine's seconds per round and pyhv's peak RSS (guest pages
the guest touched included: its RAM is a memfd pyhv maps).
Anchor for scale: Firecracker boots to init in <= 125 ms on bare metal.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

from pyhv.guest.build import default_guest
from pyhv.guest.cmdline import guest_cmdline

MEMORY_MIB = 512
STATUS = b"PYHV-EXIT-STATUS: 0"


def _clock(argv: list[str]) -> float:
    """Seconds from start to exit; the run must have printed the status line."""
    start = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    elapsed = time.perf_counter() - start
    if STATUS not in done.stdout:
        raise SystemExit(f"{argv[0]}: no status line (exit {done.returncode}): "
                         f"{done.stderr.decode(errors='replace')[-300:]}")
    return elapsed


def main(rounds: int) -> None:
    image = default_guest(progress=lambda _m: None)
    append = guest_cmdline(["true"], extra="pyhv.net=0 pyhv.tty=0")
    pyhv = [sys.executable, "-m", "pyhv", "run", "--engine", "kvm", "--kernel",
            str(image.kernel), "--initrd", str(image.initrd), "--append", append,
            "--memory", f"{MEMORY_MIB}m"]
    qemu = [shutil.which("qemu-system-x86_64") or "qemu-system-x86_64", "-M", "q35",
            "-accel", "kvm", "-cpu", "host", "-m", str(MEMORY_MIB), "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", "stdio", "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", append]
    _clock(pyhv)                            # warm-up: extracts and caches the vmlinux
    times: dict[str, list[float]] = {"pyhv": [], "qemu": []}
    for _ in range(rounds):                 # interleaved: a busy spell hits both
        times["pyhv"].append(_clock(pyhv))
        times["qemu"].append(_clock(qemu))
    # ru_maxrss of children is the largest child's: a fresh process whose only child is pyhv
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], capture_output=True,"
             " stdin=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN)"
             ".ru_maxrss)")
    rss = subprocess.run([sys.executable, "-c", probe, *pyhv], capture_output=True, text=True,
                         check=True, timeout=300).stdout.split()[-1]
    print(json.dumps({**times, "pyhv_peak_rss_kib": int(rss), "guest_memory_mib": MEMORY_MIB}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
