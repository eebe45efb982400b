"""Which VMM runs a guest: pyhv's own (`kvm`) or QEMU (`qemu`), and why."""

from __future__ import annotations

import shutil

from pyhv.errors import PyhvError

ENGINES = ("auto", "kvm", "qemu")


def choose(engine: str) -> tuple[str, str]:
    """(engine, one-line reason). `auto` takes kvm where guest kernel code runs natively
    (see pyhv.machine.hostkvm: decided from the kind of KVM, not from its speed)."""
    if engine not in ENGINES:
        raise PyhvError(f"unknown engine {engine!r} (auto, kvm or qemu)")
    if engine != "auto":
        return engine, "as asked"
    from pyhv.machine.hostkvm import host_kvm

    host = host_kvm()
    if host.native:
        return "kvm", host.reason
    return "qemu", f"{host.reason}, so QEMU with TCG"


def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise PyhvError("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    return path


def qemu_accel() -> str:
    """KVM acceleration for QEMU where guest kernel code runs natively, TCG otherwise."""
    from pyhv.machine.hostkvm import host_kvm

    return "kvm" if host_kvm().native else "tcg"
