"""What this host's KVM is, decided from what is loaded, never from timing a guest loop.

PVM (the `kvm_pvm` module, /sys/module/kvm_pvm) runs guest user code natively but emulates
guest supervisor code, so a stock kernel stalls in early boot: QEMU TCG runs full guests
better there. KVM on a CPU whose /proc/cpuinfo flags show `vmx` (kvm_intel) or `svm`
(kvm_amd) runs guest kernel code natively, and pyhv's own VMM is the better engine. A KVM
with neither (no hardware virtualisation exposed) cannot run guest kernel code natively.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pyhv.machine.cpu import host_is_pvm

VENDOR = {"vmx": ("VT-x", "kvm_intel"), "svm": ("AMD-V", "kvm_amd")}


@dataclass(frozen=True)
class HostKvm:
    usable: bool            # /dev/kvm opens read-write
    native: bool            # guest kernel code runs natively
    reason: str             # one line: why


def cpu_flags(cpuinfo: Path) -> set[str]:
    """The first CPU's `flags` line of /proc/cpuinfo (empty if unreadable)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return set(value.split())
    except OSError:
        pass
    return set()


def host_kvm(dev: str = "/dev/kvm", sys_module: Path = Path("/sys/module"),
             cpuinfo: Path = Path("/proc/cpuinfo")) -> HostKvm:
    usable = os.access(dev, os.R_OK | os.W_OK)
    if not usable:
        return HostKvm(False, False, f"no usable {dev}")
    if host_is_pvm(str(sys_module / "kvm_pvm")):
        return HostKvm(True, False, "kvm_pvm is loaded: PVM emulates guest kernel code")
    flags = cpu_flags(cpuinfo)
    for flag, (name, module) in VENDOR.items():
        if flag in flags:
            loaded = f"{module}, " if (sys_module / module).is_dir() else ""
            return HostKvm(True, True, f"{loaded}CPU flag {flag}: {name} runs guest kernel "
                           "code natively")
    return HostKvm(True, False, "the CPU flags show neither vmx nor svm: this KVM cannot run "
                   "guest kernel code natively")
