"""Which VMM runs a guest: pyhv's own (`kvm`) or QEMU (`qemu`), and why."""

from __future__ import annotations

import os
import shutil

from pyhv.errors import PyhvError

ENGINES = ("auto", "kvm", "qemu")


def choose(engine: str) -> tuple[str, str]:
    """(engine, one-line reason). `auto` takes kvm where guest kernel code runs natively."""
    if engine not in ENGINES:
        raise PyhvError(f"unknown engine {engine!r} (auto, kvm or qemu)")
    if engine != "auto":
        return engine, "as asked"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "qemu", "no usable /dev/kvm, so QEMU with TCG"
    from pyhv.machine.cpu import host_is_pvm

    if host_is_pvm():
        return "qemu", "this host's KVM (PVM) emulates guest kernel code, so QEMU with TCG"
    from pyhv.machine.doctor import guest_kernel_native

    native, speed = guest_kernel_native()
    if native:
        return "kvm", "guest kernel code runs natively on this host's KVM"
    return "qemu", (f"this host's KVM runs guest kernel code at {speed / 1e6:.0f} M "
                    "instructions/s (emulated), so QEMU with TCG")


def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise PyhvError("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    return path


def qemu_accel() -> str:
    """KVM acceleration for QEMU where guest kernel code runs natively, TCG otherwise."""
    from pyhv.machine.cpu import host_is_pvm

    return "tcg" if host_is_pvm() or not os.access("/dev/kvm", os.R_OK | os.W_OK) else "kvm"
