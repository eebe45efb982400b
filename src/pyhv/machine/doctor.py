"""`pyhv doctor`: what this host's KVM can do and which test-harness tools are installed."""

from __future__ import annotations

import shutil
import time

from hvcore.errors import HvError

# A real-mode loop of `dec ecx; jnz` run once to tell native from emulated guest kernel code:
# CPL-0 code runs at full speed under hardware KVM and at ~1 M instructions/s under PVM.
LOOP_ITERATIONS = 200_000
NATIVE_THRESHOLD = 50e6     # instructions per second
TOOLS = ("qemu-system-x86_64", "qemu-img", "qemu-io", "busybox", "cpio", "gcc", "ip",
         "apt-get", "dpkg-deb", "fusermount3", "iperf3", "passt")


def measure_guest_speed() -> float:
    """Guest supervisor-mode instructions per second (2 per loop iteration)."""
    from pyhv.machine.machine import Machine

    n = LOOP_ITERATIONS
    code = bytes([0x66, 0xB9]) + n.to_bytes(4, "little") + bytes([
        0x66, 0x49,          # dec ecx
        0x75, 0xFC,          # jnz -4
        0xF4,                # hlt
    ])
    with Machine(memory=16 << 20, cpus=1, console=-1, irqchip=False) as m:
        m.load_flat(code, 0x1000, mode="real")
        t0 = time.perf_counter()
        m.run(timeout=60)
        elapsed = time.perf_counter() - t0
    return 2 * n / elapsed


def guest_kernel_native() -> tuple[bool, float]:
    speed = measure_guest_speed()
    return speed >= NATIVE_THRESHOLD, speed


def report() -> tuple[list[str], bool]:
    """Lines to print, and whether pyhv's own VMM can run here at all."""
    from hvcore.kvm import Kvm

    lines = []
    try:
        kvm = Kvm()
    except HvError as e:
        return [f"KVM: unavailable: {e}"], False
    lines.append(f"KVM: /dev/kvm present, API version {kvm.api_version}")
    caps = kvm.capabilities()
    lines.append("KVM capabilities: " + ", ".join(
        f"{name.removeprefix('KVM_CAP_')}={value}" for name, value in caps.items()))
    native, speed = guest_kernel_native()
    lines.append(f"guest kernel code: {'native' if native else 'emulated'} "
                 f"({speed / 1e6:.1f} M instructions/s in a real-mode loop)")
    if not native:
        lines.append("  (stock Linux guests stall in early boot on this host's VMM; "
                     "use QEMU TCG for full guests)")
    for tool in TOOLS:
        path = shutil.which(tool)
        lines.append(f"tool {tool}: {path or 'not installed'}")
    return lines, True
