"""Minimal ACPI tables for a legacy-free, hardware-reduced ACPI x86-64 guest.

Debian's cloud kernel is built without CONFIG_X86_MPPARSE, so it ignores the MP table and
finds its CPUs, its IOAPIC and how to power off only through ACPI. Like Firecracker and
cloud-hypervisor, we describe a hardware-reduced platform (no PM1 blocks, no SCI, no FACS):
RSDP -> XSDT -> {FADT -> DSDT, MADT}. The DSDT holds `Name (_S5, Package () {5, 0})`, so
Linux powers off by writing SLP_TYP=5 | SLP_EN to the FADT's sleep control register (an I/O
port the VMM traps), and reboots by writing RESET_VALUE to the FADT's reset register.

It also describes the legacy devices with their ISA IRQs: COM1 (PNP0501, 0x3f8, IRQ 4), the
i8042 keyboard controller (PNP0303, 0x60/0x64, IRQ 1) and the RTC (PNP0B00, 0x70, IRQ 8).
A hardware-reduced FADT makes Linux drop the legacy PIC (`null_legacy_pic`), so no Linux IRQ
stands for an ISA IRQ until a device's _CRS asks for its GSI: without COM1 here the 8250
driver's request_irq(4) fails with EINVAL, opening ttyS0 fails, and user space's console
writes get EIO (kernel messages still appear: printk polls the UART); the i8042 and rtc_cmos
probes fail the same way. Firecracker's DSDT describes its serial port and i8042 alike.

The blob goes at RSDP_ADDR: Linux scans 0xe0000-0xfffff for the RSDP on 16-byte boundaries,
and the e820 map reserves 0x9fc00-0x100000, so the guest never reuses it as RAM.
"""

from __future__ import annotations

import struct

from pyhv.errors import PyhvError
from pyhv.machine import aml
from pyhv.machine.layout import (
    CMOS_PORT,
    CMOS_PORTS,
    I8042_COMMAND_PORT,
    I8042_DATA_PORT,
    I8042_IRQ,
    IOAPIC_ADDR,
    LAPIC_ADDR,
    RTC_IRQ,
    SERIAL_IRQ,
    SERIAL_PORT,
    SERIAL_PORTS,
)

RSDP_ADDR = 0xE0000
ACPI_LIMIT = 0x100000
SLEEP_CONTROL_PORT = 0x600
SLEEP_STATUS_PORT = 0x601
RESET_PORT = 0x602
RESET_VALUE = 0x0F
SLEEP_TYPE_S5 = 5
# hardware-reduced sleep control register (ACPI 6.5 section 4.8.3.7): SLP_TYP bits 2-4, SLP_EN
SLP_EN = 1 << 5
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
# xAPIC ids are 8 bits, 0xff is broadcast, and the IOAPIC takes id num_cpus by default
MAX_CPUS = 254

OEM_ID = b"PYHV  "
OEM_TABLE_ID = b"PYHVVM  "
OEM_REVISION = 1
CREATOR_ID = b"PYHV"
CREATOR_REVISION = 1
HYPERVISOR_ID = b"PYHV\0\0\0\0"

# FADT flags (ACPI 6.5 table 5.10) and IA-PC boot architecture flags (table 5.11)
FADT_PWR_BUTTON = 1 << 4  # set = there is NO fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # set = there is NO fixed-feature sleep button
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
FADT_FLAGS = FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP | FADT_HW_REDUCED_ACPI
IAPC_BOOT_8042 = 1 << 1  # keep Linux probing the i8042 (its reset line is our fallback reboot)
IAPC_BOOT_VGA_NOT_PRESENT = 1 << 2
IAPC_BOOT_ARCH = IAPC_BOOT_8042 | IAPC_BOOT_VGA_NOT_PRESENT
FADT_REVISION, FADT_MINOR_REVISION = 6, 5  # ACPI 6.5
FADT_LENGTH = 276

MADT_PCAT_COMPAT = 1 << 0  # dual 8259 PICs present (KVM's in-kernel irqchip has them)
MADT_LAPIC, MADT_IOAPIC = 0, 1
MADT_CPU_ENABLED = 1 << 0
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1

_RSDP = struct.Struct("<8sB6sBIIQB3x")  # signature checksum oem rev rsdt length xsdt xchecksum
_HEADER = struct.Struct("<4sIBB6s8sI4sI")  # signature length revision checksum oem ... creator
_GAS = struct.Struct("<BBBBQ")  # space id, bit width, bit offset, access size, address
_MADT_HEAD = struct.Struct("<II")  # local APIC address, flags
_LAPIC = struct.Struct("<BBBBI")  # type length acpi_processor_uid apic_id flags
_IOAPIC = struct.Struct("<BBBBII")  # type length ioapic_id reserved address gsi_base
_RSDP_V1_LEN = 20  # the revision-0 checksum covers only the first 20 bytes

# FADT field offsets (ACPICA actbl.h struct acpi_table_fadt)
_FADT_DSDT = 40
_FADT_BOOT_ARCH = 109
_FADT_FLAGS = 112
_FADT_RESET_REG = 116
_FADT_RESET_VALUE = 128
_FADT_MINOR_REVISION = 131
_FADT_X_DSDT = 140
_FADT_SLEEP_CONTROL = 244
_FADT_SLEEP_STATUS = 256
_FADT_HYPERVISOR_ID = 268

# DefName "_S5_" DefPackage: PkgLength 5 counts itself, NumElements, BytePrefix 5, ZeroOp
S5_AML = bytes([0x08]) + b"_S5_" + bytes([0x12, 0x05, 0x02, 0x0A, SLEEP_TYPE_S5, 0x00])
# Scope (\_SB) { Device (COM1) {...} Device (PS2K) {...} Device (RTC) {...} }: each an _HID
# and a _CRS of its ports and ISA IRQ
LEGACY_AML = aml.scope(
    "_SB",
    aml.device("COM1", aml.name("_HID", aml.eisa_id("PNP0501")), aml.name("_UID", aml.zero()),
               aml.name("_CRS", aml.resource_template(aml.io_port(SERIAL_PORT, SERIAL_PORTS),
                                                      aml.irq_no_flags(SERIAL_IRQ)))),
    aml.device("PS2K", aml.name("_HID", aml.eisa_id("PNP0303")),
               aml.name("_CRS", aml.resource_template(aml.io_port(I8042_DATA_PORT, 1),
                                                      aml.io_port(I8042_COMMAND_PORT, 1),
                                                      aml.irq_no_flags(I8042_IRQ)))),
    aml.device("RTC", aml.name("_HID", aml.eisa_id("PNP0B00")),
               aml.name("_CRS", aml.resource_template(aml.io_port(CMOS_PORT, CMOS_PORTS),
                                                      aml.irq_no_flags(RTC_IRQ)))))
DSDT_AML = S5_AML + LEGACY_AML


def _checksum(buf: bytearray, start: int, end: int, at: int) -> None:
    """Store the byte that makes buf[start:end] sum to 0 mod 256 (what every ACPI reader checks)."""
    buf[at] = 0
    buf[at] = -sum(buf[start:end]) & 0xFF


def _table(buf: bytearray, off: int, sig: bytes, length: int, revision: int) -> None:
    """Write the 36-byte common header; the checksum is filled once the body is in place."""
    _HEADER.pack_into(buf, off, sig, length, revision, 0, OEM_ID, OEM_TABLE_ID, OEM_REVISION,
                      CREATOR_ID, CREATOR_REVISION)


def _align8(n: int) -> int:
    return (n + 7) & ~7


def decode_sleep_control(value: int) -> int | None:
    """The sleep type a guest write to the sleep control register requests, None without SLP_EN."""
    return (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT if value & SLP_EN else None


def acpi_tables_size(num_cpus: int) -> int:
    """Bytes build_acpi_tables writes for num_cpus (so a caller can check its window first)."""
    return (_align8(_RSDP.size) + _align8(_HEADER.size + 2 * 8) + _align8(FADT_LENGTH)
            + _align8(_HEADER.size + len(DSDT_AML))
            + _HEADER.size + _MADT_HEAD.size + num_cpus * _LAPIC.size + _IOAPIC.size)


def build_acpi_tables(num_cpus: int, base_addr: int = RSDP_ADDR, ioapic_id: int | None = None,
                      ioapic_addr: int = IOAPIC_ADDR, lapic_addr: int = LAPIC_ADDR) -> bytes:
    """RSDP, XSDT, FADT, DSDT and MADT as one blob to write at guest physical base_addr.

    Every pointer inside is an absolute guest physical address computed from base_addr.
    """
    if not 1 <= num_cpus <= MAX_CPUS:
        raise PyhvError(f"{num_cpus} vCPUs requested: ACPI MADT supports 1 to {MAX_CPUS}")
    if base_addr % 16:
        raise PyhvError(f"ACPI RSDP address {base_addr:#x} is not 16-byte aligned")
    ioapic_id = num_cpus if ioapic_id is None else ioapic_id
    if not 0 <= ioapic_id <= 0xFF:
        raise PyhvError(f"IOAPIC id {ioapic_id} does not fit in 8 bits")
    size = acpi_tables_size(num_cpus)
    if base_addr + size > ACPI_LIMIT:
        raise PyhvError(f"ACPI tables for {num_cpus} vCPUs at {base_addr:#x} ({size} bytes) "
                        f"cross {ACPI_LIMIT:#x}")
    buf = bytearray(size)
    xsdt = _align8(_RSDP.size)
    xsdt_len = _HEADER.size + 2 * 8
    fadt = xsdt + _align8(xsdt_len)
    dsdt = fadt + _align8(FADT_LENGTH)
    dsdt_len = _HEADER.size + len(DSDT_AML)
    madt = dsdt + _align8(dsdt_len)
    madt_len = size - madt

    # RSDP: revision 2 with an XSDT only (Linux prefers the XSDT when revision >= 2)
    _RSDP.pack_into(buf, 0, b"RSD PTR ", 0, OEM_ID, 2, 0, _RSDP.size, base_addr + xsdt, 0)
    _checksum(buf, 0, _RSDP_V1_LEN, 8)
    _checksum(buf, 0, _RSDP.size, 32)

    _table(buf, xsdt, b"XSDT", xsdt_len, 1)
    struct.pack_into("<QQ", buf, xsdt + _HEADER.size, base_addr + fadt, base_addr + madt)
    _checksum(buf, xsdt, xsdt + xsdt_len, xsdt + 9)

    _table(buf, fadt, b"FACP", FADT_LENGTH, FADT_REVISION)
    struct.pack_into("<I", buf, fadt + _FADT_DSDT, base_addr + dsdt)
    struct.pack_into("<HxI", buf, fadt + _FADT_BOOT_ARCH, IAPC_BOOT_ARCH, FADT_FLAGS)
    _GAS.pack_into(buf, fadt + _FADT_RESET_REG, GAS_SYSTEM_IO, 8, 0, GAS_ACCESS_BYTE, RESET_PORT)
    struct.pack_into("<BHB", buf, fadt + _FADT_RESET_VALUE, RESET_VALUE, 0, FADT_MINOR_REVISION)
    struct.pack_into("<Q", buf, fadt + _FADT_X_DSDT, base_addr + dsdt)
    for off, port in ((_FADT_SLEEP_CONTROL, SLEEP_CONTROL_PORT),
                      (_FADT_SLEEP_STATUS, SLEEP_STATUS_PORT)):
        _GAS.pack_into(buf, fadt + off, GAS_SYSTEM_IO, 8, 0, GAS_ACCESS_BYTE, port)
    buf[fadt + _FADT_HYPERVISOR_ID:fadt + FADT_LENGTH] = HYPERVISOR_ID
    _checksum(buf, fadt, fadt + FADT_LENGTH, fadt + 9)

    _table(buf, dsdt, b"DSDT", dsdt_len, 2)  # revision 2: 64-bit AML integers
    buf[dsdt + _HEADER.size:dsdt + dsdt_len] = DSDT_AML
    _checksum(buf, dsdt, dsdt + dsdt_len, dsdt + 9)

    # MADT (revision 5, ACPI 6.3+): no interrupt source overrides. KVM's default GSI routing
    # wires the PIT to IOAPIC pin 0 (identity), and hardware-reduced ACPI has no SCI.
    _table(buf, madt, b"APIC", madt_len, 5)
    off = madt + _HEADER.size
    _MADT_HEAD.pack_into(buf, off, lapic_addr, MADT_PCAT_COMPAT)
    off += _MADT_HEAD.size
    for cpu in range(num_cpus):
        _LAPIC.pack_into(buf, off, MADT_LAPIC, _LAPIC.size, cpu, cpu, MADT_CPU_ENABLED)
        off += _LAPIC.size
    _IOAPIC.pack_into(buf, off, MADT_IOAPIC, _IOAPIC.size, ioapic_id, 0, ioapic_addr, 0)
    _checksum(buf, madt, madt + madt_len, madt + 9)
    return bytes(buf)


def _read_table(blob: bytes, base_addr: int, addr: int, sig: bytes) -> bytes:
    """The table at guest address addr, after checking it lies in the blob, its signature,
    length and checksum; ValueError naming the table otherwise."""
    name = sig.decode()
    off = addr - base_addr
    if not 0 <= off <= len(blob) - _HEADER.size:
        raise ValueError(f"{name}: address {addr:#x} outside the ACPI blob")
    found, length = struct.unpack_from("<4sI", blob, off)
    if found != sig:
        raise ValueError(f"{name}: signature {found!r} at {addr:#x}")
    if not _HEADER.size <= length <= len(blob) - off:
        raise ValueError(f"{name}: length {length} runs outside the ACPI blob")
    table = blob[off:off + length]
    if sum(table) & 0xFF:
        raise ValueError(f"{name}: bad checksum")
    return table


def parse_acpi_tables(blob: bytes, base_addr: int = RSDP_ADDR) -> dict:
    """Walk RSDP -> XSDT -> tables the way a guest does and decode what pyhv relies on.

    A reference reader for the tests: it validates every signature, length and checksum
    (ValueError naming the table) and assumes nothing about where the builder put things.
    """
    if len(blob) < _RSDP.size:
        raise ValueError("RSDP: blob too short")
    sig, _, oem, rev, rsdt, length, xsdt_addr, _ = _RSDP.unpack_from(blob, 0)
    if sig != b"RSD PTR " or rev < 2 or length != _RSDP.size:
        raise ValueError(f"RSDP: signature {sig!r}, revision {rev}, length {length}")
    if sum(blob[:_RSDP_V1_LEN]) & 0xFF or sum(blob[:_RSDP.size]) & 0xFF:
        raise ValueError("RSDP: bad checksum")
    xsdt = _read_table(blob, base_addr, xsdt_addr, b"XSDT")
    count, rest = divmod(len(xsdt) - _HEADER.size, 8)
    if rest:
        raise ValueError(f"XSDT: length {len(xsdt)} is not a whole number of entries")
    entries = struct.unpack_from(f"<{count}Q", xsdt, _HEADER.size)
    tables: dict[str, bytes] = {"XSDT": xsdt}
    for i, addr in enumerate(entries):
        off = addr - base_addr
        if not 0 <= off <= len(blob) - 4:
            raise ValueError(f"XSDT: entry {i} ({addr:#x}) outside the ACPI blob")
        sig = blob[off:off + 4]
        if sig not in (b"FACP", b"APIC"):
            raise ValueError(f"XSDT entry {i}: table at {addr:#x} has signature {sig!r}, "
                             "expected FACP or APIC")
        tables[sig.decode()] = _read_table(blob, base_addr, addr, sig)
    if "FACP" not in tables or "APIC" not in tables:
        raise ValueError(f"XSDT: missing FACP or APIC (has {sorted(tables)})")

    fadt = tables["FACP"]
    if len(fadt) != FADT_LENGTH:
        raise ValueError(f"FACP: length {len(fadt)}, expected {FADT_LENGTH}")
    (dsdt32,) = struct.unpack_from("<I", fadt, _FADT_DSDT)
    boot_arch, flags = struct.unpack_from("<HxI", fadt, _FADT_BOOT_ARCH)
    (x_dsdt,) = struct.unpack_from("<Q", fadt, _FADT_X_DSDT)
    if dsdt32 and dsdt32 != x_dsdt:
        raise ValueError(f"FACP: DSDT {dsdt32:#x} != X_DSDT {x_dsdt:#x}")
    dsdt = tables["DSDT"] = _read_table(blob, base_addr, x_dsdt, b"DSDT")
    reset_gas = _GAS.unpack_from(fadt, _FADT_RESET_REG)
    sleep_control = _GAS.unpack_from(fadt, _FADT_SLEEP_CONTROL)
    sleep_status = _GAS.unpack_from(fadt, _FADT_SLEEP_STATUS)
    for name, gas in (("RESET_REG", reset_gas), ("SLEEP_CONTROL_REG", sleep_control),
                      ("SLEEP_STATUS_REG", sleep_status)):
        if gas[:2] != (GAS_SYSTEM_IO, 8):
            raise ValueError(f"FACP: {name} is not an 8-bit system I/O register: {gas}")

    madt = tables["APIC"]
    lapic_addr, madt_flags = _MADT_HEAD.unpack_from(madt, _HEADER.size)
    cpus: list[int] = []
    ioapics: list[tuple[int, int, int]] = []
    off = _HEADER.size + _MADT_HEAD.size
    while off < len(madt):
        if off + 2 > len(madt):
            raise ValueError("APIC: truncated subtable header")
        kind, sub_len = madt[off], madt[off + 1]
        if sub_len < 2 or off + sub_len > len(madt):
            raise ValueError(f"APIC: subtable type {kind} length {sub_len} at {off}")
        if kind == MADT_LAPIC and sub_len == _LAPIC.size:
            _, _, _, apic_id, lflags = _LAPIC.unpack_from(madt, off)
            if lflags & MADT_CPU_ENABLED:
                cpus.append(apic_id)
        elif kind == MADT_IOAPIC and sub_len == _IOAPIC.size:
            _, _, io_id, _, io_addr, gsi_base = _IOAPIC.unpack_from(madt, off)
            ioapics.append((io_id, io_addr, gsi_base))
        else:
            raise ValueError(f"APIC: unexpected subtable type {kind} length {sub_len}")
        off += sub_len
    if len(ioapics) != 1:
        raise ValueError(f"APIC: {len(ioapics)} IOAPIC entries, expected 1")

    return {
        "tables": tables,
        "oem_id": oem,
        "rsdt_address": rsdt,
        "xsdt_entries": list(entries),
        "cpus": cpus,
        "ioapic": ioapics[0],
        "lapic_addr": lapic_addr,
        "madt_flags": madt_flags,
        "fadt_revision": (fadt[8], fadt[_FADT_MINOR_REVISION]),
        "fadt_flags": flags,
        "iapc_boot_arch": boot_arch,
        "dsdt_addr": x_dsdt,
        "dsdt32_addr": dsdt32,
        "reset_port": reset_gas[4],
        "reset_value": fadt[_FADT_RESET_VALUE],
        "sleep_control_port": sleep_control[4],
        "sleep_status_port": sleep_status[4],
        "hypervisor_id": fadt[_FADT_HYPERVISOR_ID:],
        "dsdt_has_s5": S5_AML in dsdt[_HEADER.size:],
        "dsdt_has_legacy_devices": LEGACY_AML in dsdt[_HEADER.size:],
    }
