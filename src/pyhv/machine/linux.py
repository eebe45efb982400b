"""Linux boot: place the kernel, initrd, command line, zero page and MP table in guest RAM
and point the boot vCPU at the kernel's entry.

Three ways in, chosen by what the image offers:
- ELF vmlinux through its 64-bit entry (startup_64, %rsi = boot_params), as Firecracker does;
- ELF vmlinux through PVH (32-bit flat protected mode, %ebx = hvm_start_info) when the
  image has the Xen PHYS32_ENTRY note and the caller asked for it (`protocol="pvh"`);
- bzImage: by default extracted on the host once (cached) and booted as the ELF above,
  which skips the guest's decompressor (slow where guest kernel code is emulated); with
  `extract=False`, through the bzImage's own 64-bit entry at load address + 0x200.

`protocol="auto"` takes the 64-bit entry: it is the path every x86-64 Linux has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pyhv.errors import PyhvError
from pyhv.machine import acpi, layout, longmode
from pyhv.machine.bootparams import build_pvh_start_info, build_zero_page, initrd_address
from pyhv.machine.kernelimage import BzImage, ElfKernel, cached_vmlinux, load_kernel
from pyhv.machine.mptable import build_mptable

BZIMAGE_64BIT_ENTRY_OFFSET = 0x200
ELF_CMDLINE_MAX = 2048           # COMMAND_LINE_SIZE of x86 Linux, for images with no header
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF


@dataclass
class BootInfo:
    protocol: str                # "linux64" or "pvh"
    entry: int
    kernel_end: int
    initrd: tuple[int, int] | None   # (address, size)
    cmdline: str
    e820: list[tuple[int, int, int]]
    extracted: Path | None       # the cached vmlinux a bzImage was booted through


def _fit(machine, addr: int, size: int, what: str) -> None:
    if not machine.memory.contains(addr, max(size, 1)):
        raise PyhvError(f"{what} ({size >> 10} KiB at {addr:#x}) does not fit in guest RAM "
                        f"({machine.memory.size >> 20} MiB): raise --memory")


def _load_elf(machine, elf: ElfKernel) -> int:
    end = 0
    for paddr, data, memsz in elf.segments:
        _fit(machine, paddr, memsz, "kernel segment")
        machine.memory.write(paddr, data)
        end = max(end, paddr + memsz)
    return end


def load_linux(machine, kernel: str | Path, initrd: str | Path | None = None,
               cmdline: str = "", extract: bool = True, protocol: str = "auto") -> BootInfo:
    if protocol not in ("auto", "linux64", "pvh"):
        raise PyhvError(f"unknown boot protocol {protocol!r} (auto, linux64 or pvh)")
    image = load_kernel(kernel)
    header = b""
    cmdline_max = ELF_CMDLINE_MAX - 1
    initrd_max = DEFAULT_INITRD_ADDR_MAX
    extracted = None
    if isinstance(image, BzImage):
        header = image.header.raw
        cmdline_max = image.header.cmdline_size
        initrd_max = image.header.initrd_addr_max
        if extract:
            extracted = cached_vmlinux(kernel)
            image = load_kernel(extracted)
    if protocol == "pvh" and (not isinstance(image, ElfKernel) or image.pvh_entry is None):
        raise PyhvError(f"{kernel}: no PVH entry (XEN_ELFNOTE_PHYS32_ENTRY) in this kernel")

    # kernel
    if isinstance(image, ElfKernel):
        kernel_end = _load_elf(machine, image)
        use_pvh = protocol == "pvh"
        entry = image.pvh_entry if use_pvh else image.entry
    else:
        use_pvh = False
        load_addr = layout.HIMEM_START
        _fit(machine, load_addr, max(len(image.kernel), image.header.init_size), "kernel")
        machine.memory.write(load_addr, image.kernel)
        kernel_end = load_addr + max(len(image.kernel), image.header.init_size)
        entry = load_addr + BZIMAGE_64BIT_ENTRY_OFFSET

    # command line
    raw_cmdline = cmdline.encode()
    if len(raw_cmdline) > cmdline_max or len(raw_cmdline) >= layout.CMDLINE_MAX_SIZE:
        raise PyhvError(f"kernel command line is {len(raw_cmdline)} bytes; this kernel "
                        f"accepts at most {cmdline_max}")
    machine.memory.write(layout.CMDLINE_START, raw_cmdline + b"\0")

    # initrd: read straight into guest RAM, no intermediate copy
    placed = None
    if initrd is not None:
        placed = _load_initrd(machine, Path(initrd), initrd_max, kernel_end)

    e820 = layout.e820_map(machine.memory.size)
    initrd_addr, initrd_size = placed or (0, 0)
    # KVM's default GSI routing wires the PIT to IOAPIC pin 0, so the MP table says so.
    mptable = build_mptable(layout.MPTABLE_START, machine.cpus, timer_pin=0)
    machine.memory.write(layout.MPTABLE_START, mptable)
    # ACPI too: kernels built without CONFIG_X86_MPPARSE (Debian's cloud kernel) find their
    # CPUs, IOAPIC and power-off only there.
    machine.memory.write(acpi.RSDP_ADDR, acpi.build_acpi_tables(machine.cpus))
    machine.setup_long_mode()
    bsp = machine.vcpus[0]
    if use_pvh:
        machine.memory.write(layout.PVH_START_INFO, build_pvh_start_info(
            layout.PVH_START_INFO, e820, layout.CMDLINE_START, initrd_addr, initrd_size,
            acpi.RSDP_ADDR))
        bsp.set_sregs(**longmode.protected_mode_sregs(layout.BOOT_GDT, layout.BOOT_IDT))
        bsp.set_regs(rip=entry, rbx=layout.PVH_START_INFO, rflags=2)
    else:
        machine.memory.write(layout.ZERO_PAGE, build_zero_page(
            header, e820, layout.CMDLINE_START, len(raw_cmdline), initrd_addr, initrd_size,
            acpi.RSDP_ADDR))
        bsp.set_sregs(**longmode.long_mode_sregs(layout.PML4_START, layout.BOOT_GDT,
                                                 layout.BOOT_IDT))
        bsp.set_regs(rip=entry, rsi=layout.ZERO_PAGE, rsp=layout.BOOT_STACK_TOP,
                     rbp=layout.BOOT_STACK_TOP, rflags=2)
    return BootInfo("pvh" if use_pvh else "linux64", entry, kernel_end, placed, cmdline, e820,
                    extracted)


def _load_initrd(machine, path: Path, initrd_max: int, kernel_end: int) -> tuple[int, int]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise PyhvError(f"cannot read initrd {path}: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise PyhvError(f"initrd {path} is empty")
        low_end = layout.low_ram_end(machine.memory.size)
        addr = initrd_address(size, low_end, initrd_max, kernel_end)
        view = machine.memory.view(addr, size)
        got = f.readinto(view)
        if got != size:
            raise PyhvError(f"initrd {path}: read {got} of {size} bytes")
    return addr, size
