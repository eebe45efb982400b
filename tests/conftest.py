"""Shared fixtures: KVM presence, the Debian kernel, and skip reasons printed for the reader."""

from __future__ import annotations

import os

import pytest


def _kvm_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no permission on /dev/kvm (join the kvm group)"
    return None


@pytest.fixture(scope="session")
def kvm_available() -> None:
    reason = _kvm_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def guest_kernel_native(kvm_available) -> bool:
    from pyhv.machine.doctor import guest_kernel_native

    return guest_kernel_native()


@pytest.fixture(scope="session")
def debian_kernel():
    """vmlinuz from Debian's linux-image-cloud-amd64 (apt-get download, cached)."""
    from pyhv.guest.debian import debian_kernel as fetch

    return fetch()
