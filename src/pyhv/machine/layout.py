"""Guest physical memory map of a pyhv x86-64 machine, and guest memory sizing.

Every address the loader, the boot structures and the devices agree on lives here, so that
two builders can never pick overlapping ranges. The low 1 MiB follows the PC layout Linux
expects (it scans 0x9fc00 for the MP table and treats 0xa0000-0x100000 as legacy ROM); the
top 1 GiB below 4 GiB is a hole for MMIO (PCI BARs, IOAPIC, LAPIC, KVM's private pages).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from pyhv.errors import PyhvError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
PAGE_SIZE = 0x1000

# --- low memory: boot structures written by the VMM -------------------------------------------
BOOT_GDT = 0x500  # boot GDT (longmode.gdt(), 6 entries = 48 bytes: 0x500-0x52f)
BOOT_IDT = 0x530  # empty boot IDT right after the GDT (any early exception = triple fault)
PVH_START_INFO = 0x6000  # hvm_start_info + modlist + memmap for the PVH entry (< 4 KiB)
ZERO_PAGE = 0x7000  # struct boot_params ("zero page"), %rsi at the 64-bit entry
BOOT_STACK_TOP = 0x8FF0  # initial %rsp/%rbp; grows down towards the zero page
PML4_START = 0x9000  # boot page tables: PML4 ...
PDPT_START = 0xA000  # ... one PDPT ...
PD_START = 0xB000  # ... four PDs (0xb000-0xefff): identity map of 0-4 GiB with 2 MiB pages
PAGE_TABLES_END = 0xF000  # first byte after the boot page tables
CMDLINE_START = 0x20000  # kernel command line (NUL-terminated)
CMDLINE_MAX_SIZE = 0x10000  # 64 KiB, including the terminating NUL

# --- the PC legacy area ----------------------------------------------------------------------
EBDA_START = 0x9FC00  # last KiB of base memory: Linux scans it for the MP floating pointer
MPTABLE_START = EBDA_START  # MP floating pointer + config table (mptable.build_mptable)
MPTABLE_LIMIT = 0xE0000  # a large MP table may run into the reserved video window, not the BIOS
ROM_AREA_START = 0xA0000  # VGA window + option/BIOS ROMs: reserved in the e820 map
ROM_AREA_END = 0x100000
HIMEM_START = 0x100000  # 1 MiB: first byte of high memory; ELF kernels load here
KERNEL_LOAD_ADDR = 0x1000000  # 16 MiB: bzImage load address when it asks for pref_address

# --- the MMIO hole below 4 GiB ----------------------------------------------------------------
MMIO_GAP_START = 0xC000_0000  # RAM stops at 3 GiB; the rest of the low 4 GiB is MMIO
MMIO_GAP_END = 1 << 32
MMIO_GAP_SIZE = MMIO_GAP_END - MMIO_GAP_START
PCI_MMIO_START = 0xC000_0000  # 32-bit PCI BARs are allocated here ...
PCI_MMIO_END = 0xFEC0_0000  # ... up to the IOAPIC
IOAPIC_ADDR = 0xFEC0_0000  # IOAPIC register window (KVM in-kernel irqchip)
IOAPIC_SIZE = 0x1000
LAPIC_ADDR = 0xFEE0_0000  # local APIC window (every vCPU sees its own)
LAPIC_SIZE = 0x1000
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000  # KVM_SET_IDENTITY_MAP_ADDR: 1 page used by KVM itself
KVM_TSS_ADDR = 0xFFFB_D000  # KVM_SET_TSS_ADDR: 3 pages used by KVM itself
KVM_PRIVATE_END = 0xFFFC_0000  # end of the 4 pages above (reserved in the e820 map)
HIGH_RAM_START = 1 << 32  # RAM beyond MMIO_GAP_START is remapped above 4 GiB

# --- I/O ports ----------------------------------------------------------------------------------
SERIAL_PORT, SERIAL_PORTS, SERIAL_IRQ = 0x3F8, 8, 4  # COM1: its ports and ISA IRQ
I8042_DATA_PORT, I8042_COMMAND_PORT, I8042_IRQ = 0x60, 0x64, 1  # keyboard controller
CMOS_PORT, CMOS_PORTS, RTC_IRQ = 0x70, 2, 8  # CMOS/RTC index and data
PCI_CONFIG_ADDRESS = 0xCF8  # PCI configuration mechanism #1: 32-bit address register
PCI_CONFIG_DATA = 0xCFC  # ... and the data window (0xcfc-0xcff)
PCI_CONFIG_PORTS = (0xCF8, 8)  # (first port, count) to register with the PIO bus

# --- e820 types -----------------------------------------------------------------------------
E820_RAM = 1
E820_RESERVED = 2

# --- memory size limits -----------------------------------------------------------------------
MIN_MEMORY = 16 * MiB  # below this a stock kernel + initramfs does not get to userspace
MAX_MEMORY = 1 * TiB  # beyond what the 4-level boot map and our e820 layout are tested with


def ram_regions(mem_size: int) -> list[tuple[int, int]]:
    """(guest address, size) of every RAM region: memory above 3 GiB moves past the hole."""
    if mem_size <= MMIO_GAP_START:
        return [(0, mem_size)]
    return [(0, MMIO_GAP_START), (HIGH_RAM_START, mem_size - MMIO_GAP_START)]


def low_ram_end(mem_size: int) -> int:
    """End of RAM below 4 GiB: where the initrd and 32-bit structures must stay under."""
    return min(mem_size, MMIO_GAP_START)


def e820_map(mem_size: int) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries, sorted, non-overlapping, as the guest kernel should see them.

    The EBDA/MP table/ROM area and KVM's private pages in the hole are reported reserved so
    the guest neither allocates from them nor places a PCI BAR on top of them.
    """
    if mem_size <= HIMEM_START:
        raise PyhvError(f"guest memory of {mem_size} bytes is below 1 MiB")
    low_end = low_ram_end(mem_size)
    entries = [
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        (HIMEM_START, low_end - HIMEM_START, E820_RAM),
        (KVM_IDENTITY_MAP_ADDR, KVM_PRIVATE_END - KVM_IDENTITY_MAP_ADDR, E820_RESERVED),
    ]
    if mem_size > MMIO_GAP_START:
        entries.append((HIGH_RAM_START, mem_size - MMIO_GAP_START, E820_RAM))
    return entries


def host_memory_total(meminfo: str = "/proc/meminfo") -> int | None:
    """The host's MemTotal in bytes, or None when it cannot be read (non-Linux, sandbox)."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        return None
    return None


def validate_memory(size: int, host_total: int | None = None) -> None:
    """Reject a guest memory size the VMM cannot back or the guest cannot boot with.

    `host_total` defaults to /proc/meminfo's MemTotal; guest RAM is memfd-backed and sparse,
    but a guest larger than the host only ends in the OOM killer.
    """
    if size < MIN_MEMORY:
        raise PyhvError(
            f"guest memory {format_size(size)} is too small: at least {format_size(MIN_MEMORY)}"
        )
    if size % PAGE_SIZE:
        raise PyhvError(f"guest memory {size} bytes is not a multiple of 4 KiB")
    if size > MAX_MEMORY:
        raise PyhvError(
            f"guest memory {format_size(size)} is too large: at most {format_size(MAX_MEMORY)}"
        )
    if host_total is None:
        host_total = host_memory_total()
    if host_total is not None and size > host_total:
        raise PyhvError(
            f"guest memory {format_size(size)} exceeds the host's {format_size(host_total)}"
        )


_UNITS = {"": MiB, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)(?:([kmgt])(?:i?b)?|(b))?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes for a size as docker/QEMU accept it: "512m", "2G", "1GiB", "4096b", "1.5g".

    A bare number means MiB, as QEMU's -m does (so "1024" is 1 GiB, not 1 KiB);
    units are binary (k = 1024), case-insensitive, optionally followed by "B" or "iB".
    """
    m = _SIZE_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise PyhvError(f"invalid size {text!r}: expected e.g. 512m, 2G, 1GiB or 1024 (MiB)")
    number, unit, plain_b = m.groups()
    mult = _UNITS[(unit or plain_b or "").lower()]
    try:
        value = Decimal(number) * mult
    except InvalidOperation:  # pragma: no cover - the regex only admits decimals
        raise PyhvError(f"invalid size {text!r}") from None
    if value != value.to_integral_value():
        raise PyhvError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(size: int) -> str:
    """Short human form for messages: 512 MiB, 2 GiB, 1.5 GiB, 100 KiB."""
    for unit, mult in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= mult:
            return f"{round(size / mult, 1):g} {unit}"
    return f"{size} B"
