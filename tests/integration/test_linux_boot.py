"""A real Debian kernel booted by `pyhv run`: as an ELF vmlinux, and as a bzImage extracted
on the host. This host's KVM emulates guest kernel code, so the kernel stalls after early
boot; the tests wait only for the early lines, which already prove the boot protocol, the
command line, the e820 map and the CPU description."""

from __future__ import annotations

import re

import pytest

from pyhv.machine import layout
from tests.helpers.pyhvrun import ConsoleRun, pyhv

pytestmark = [pytest.mark.usefixtures("kvm_available"), pytest.mark.kernel, pytest.mark.slow]

CMDLINE = "console=ttyS0 reboot=k panic=1 pyhv.test=\"two words\" loglevel=8"


def expected_e820_lines(memory: int) -> list[str]:
    names = {layout.E820_RAM: "usable", layout.E820_RESERVED: "reserved"}
    return [f"BIOS-e820: [mem {addr:#018x}-{addr + size - 1:#018x}] {names[kind]}"
            for addr, size, kind in layout.e820_map(memory)]


@pytest.fixture(scope="module")
def vmlinux(debian_kernel, tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel") / "vmlinux"
    done = pyhv("kernel", "extract", str(debian_kernel), str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:4] == b"\x7fELF"
    return out


@pytest.mark.parametrize("image", ["vmlinux", "bzImage"])
def test_boot_shows_version_cmdline_and_our_e820(image, vmlinux, debian_kernel, tmp_path):
    kernel = vmlinux if image == "vmlinux" else debian_kernel
    run = ConsoleRun(tmp_path / "console.log", "--kernel", str(kernel), "--memory", "256m",
                     "--append", CMDLINE)
    try:
        e820 = expected_e820_lines(256 << 20)
        text = run.wait_for("Linux version", f"Command line: {CMDLINE}", *e820)
    finally:
        assert run.stop() == 0   # SIGTERM is a clean stop
    table = re.findall(r"BIOS-e820: .*", text)
    assert table == e820          # exactly our map, in order, nothing else


def test_two_cpus_reported_in_early_boot(vmlinux, tmp_path):
    run = ConsoleRun(tmp_path / "console.log", "--kernel", str(vmlinux), "--cpus", "2",
                     "--memory", "256m")
    try:
        text = run.wait_for("Allowing 2 CPUs")
    finally:
        run.stop()
    assert "lapic_id[0x01] enabled" in text   # the second CPU, from our ACPI MADT
