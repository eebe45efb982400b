"""`pyhv doctor`: what this host's KVM can do and which test-harness tools are installed."""

from __future__ import annotations

import shutil

from hvcore.errors import HvError

TOOLS = ("qemu-system-x86_64", "qemu-img", "qemu-io", "busybox", "cpio", "gcc", "ip",
         "apt-get", "dpkg-deb", "fusermount3", "iperf3", "passt")


def guest_kernel_native() -> bool:
    """Whether this host's KVM runs guest kernel code natively (see pyhv.machine.hostkvm)."""
    from pyhv.machine.hostkvm import host_kvm

    return host_kvm().native


def report() -> tuple[list[str], bool]:
    """Lines to print, and whether pyhv's own VMM can run here at all."""
    from hvcore.kvm import Kvm
    from pyhv.machine.hostkvm import host_kvm

    lines = []
    try:
        kvm = Kvm()
    except HvError as e:
        return [f"KVM: unavailable: {e}"], False
    lines.append(f"KVM: /dev/kvm present, API version {kvm.api_version}")
    caps = kvm.capabilities()
    lines.append("KVM capabilities: " + ", ".join(
        f"{name.removeprefix('KVM_CAP_')}={value}" for name, value in caps.items()))
    host = host_kvm()
    lines.append(f"guest kernel code: {'native' if host.native else 'emulated'} ({host.reason})")
    if not host.native:
        lines.append("  (stock Linux guests stall in early boot on this host's VMM; "
                     "`pyhv run` uses QEMU TCG for full guests)")
    for tool in TOOLS:
        path = shutil.which(tool)
        lines.append(f"tool {tool}: {path or 'not installed'}")
    return lines, True
