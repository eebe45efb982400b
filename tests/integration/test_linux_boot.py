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

CMDLINE = "console=ttyS0 earlyprintk=serial reboot=k panic=1 pyhv.test=\"two words\" loglevel=8"


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


@pytest.mark.parametrize("image, boot, memory", [("vmlinux", "linux64", 256 << 20),
                                                 ("bzImage", "auto", 256 << 20),
                                                 ("vmlinux", "pvh", 256 << 20),
                                                 ("bzImage", "auto", 4 << 30)])
def test_boot_shows_version_cmdline_and_our_e820(image, boot, memory, vmlinux, debian_kernel,
                                                 tmp_path):
    kernel = vmlinux if image == "vmlinux" else debian_kernel
    run = ConsoleRun(tmp_path / "console.log", "--kernel", str(kernel), "--memory",
                     f"{memory >> 20}m", "--boot", boot, "--append", CMDLINE)
    try:
        e820 = expected_e820_lines(memory)
        text = run.wait_for("Linux version", f"Command line: {CMDLINE}", *e820)
    finally:
        assert run.stop() == 0   # SIGTERM is a clean stop
    table = re.findall(r"BIOS-e820: .*", text)
    assert table == e820          # exactly our map, in order, nothing else
    if memory > 3 << 30:          # RAM beyond the PCI hole continues at 4 GiB
        assert any(line.startswith("BIOS-e820: [mem 0x0000000100000000-") for line in table)


@pytest.mark.parametrize("cpus", [2, 3])
def test_cpus_reported_in_early_boot(vmlinux, tmp_path, cpus):
    # Debian's cloud kernel lacks CONFIG_X86_MPPARSE: it counts CPUs from our ACPI MADT.
    run = ConsoleRun(tmp_path / "console.log", "--kernel", str(vmlinux), "--cpus", str(cpus),
                     "--memory", "256m")
    try:
        text = run.wait_for(f"Allowing {cpus} CPUs")
    finally:
        run.stop()
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in text
    assert "IOAPIC[0]: apic_id " + str(cpus) in text


def test_bzimage_through_its_own_decompressor(debian_kernel, guest_kernel_native, tmp_path):
    if not guest_kernel_native:
        pytest.skip("guest kernel code is emulated by this host's KVM: the in-guest "
                    "decompressor would take many minutes (test_bed_vmm.py boots with "
                    "--no-extract in the hardware-virtualisation test bed)")
    run = ConsoleRun(tmp_path / "console.log", "--kernel", str(debian_kernel), "--no-extract",
                     "--append", CMDLINE)
    try:
        run.wait_for("Linux version", f"Command line: {CMDLINE}")
    finally:
        run.stop()


def test_initrd_is_handed_to_the_kernel(vmlinux, tmp_path):
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"\x00" * ((3 << 20) + 123))     # size deliberately not page-aligned
    run = ConsoleRun(tmp_path / "console.log", "--kernel", str(vmlinux), "--memory", "256m",
                     "--initrd", str(initrd))
    try:
        text = run.wait_for("RAMDISK: [mem ")
    finally:
        run.stop()
    start, end = (int(x, 16) for x in re.search(r"RAMDISK: \[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\]",
                                                 text).groups())
    assert start % 4096 == 0
    assert end + 1 - start == -(-initrd.stat().st_size // 4096) * 4096
    assert end < 256 << 20
