"""Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI learns its CPUs,
its IOAPIC and which IOAPIC pin each ISA and PCI interrupt arrives on.

The floating pointer goes at layout.MPTABLE_START (0x9fc00), inside the last KiB of base
memory that Linux scans; the configuration table follows it directly. Up to about 39 CPUs the
whole thing stays below 0xa0000; beyond that it runs into the legacy video window, which the
e820 map reports reserved (Firecracker does the same), but never past layout.MPTABLE_LIMIT.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from pyhv.errors import PyhvError
from pyhv.machine.layout import IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_LIMIT, MPTABLE_START

MPF_SIGNATURE = b"_MP_"
MPC_SIGNATURE = b"PCMP"
MP_SPEC_REV = 4  # MP spec 1.4
OEM_ID = b"PYHV    "
PRODUCT_ID = b"pyhv microvm"

# entry types and sizes
MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = range(5)
_ENTRY_SIZES = {MP_PROCESSOR: 20, MP_BUS: 8, MP_IOAPIC: 8, MP_INTSRC: 8, MP_LINTSRC: 8}

# interrupt types (I/O and local interrupt assignment entries)
MP_INT, MP_NMI, MP_SMI, MP_EXTINT = range(4)
# interrupt flags: polarity bits 0-1, trigger mode bits 2-3 (00 = conforms to the bus)
MP_IRQ_DEFAULT = 0x0
MP_IRQ_POLARITY_LOW = 0x3
MP_IRQ_TRIGGER_LEVEL = 0x3 << 2
PCI_IRQ_FLAGS = MP_IRQ_POLARITY_LOW | MP_IRQ_TRIGGER_LEVEL  # PCI INTx: level, active low

CPU_ENABLED = 0x1
CPU_BOOTPROCESSOR = 0x2
IOAPIC_USABLE = 0x1
LAPIC_VERSION = 0x14  # integrated xAPIC, as KVM's local APIC reports
IOAPIC_VERSION = 0x11  # KVM's in-kernel IOAPIC
CPU_SIGNATURE = 0x600  # family 6 (only informational: Linux uses CPUID)
CPU_FEATURES = 0x201  # CPUID.1:EDX APIC | FPU

BUS_PCI = 0
BUS_ISA = 1
BUS_NAMES = {BUS_PCI: b"PCI   ", BUS_ISA: b"ISA   "}
ISA_IRQS = 16
IOAPIC_PINS = 24  # KVM's IOAPIC
PCI_SLOTS = 32
MAX_PCI_INTERRUPTS = PCI_SLOTS * 4
ALL_LAPICS = 0xFF

_MPF = struct.Struct("<4sIBBBBB3s")  # signature physptr length spec checksum feature1 feature2 ..
_MPC = struct.Struct("<4sHBB8s12sIHHIHBB")  # see MP spec 1.4 table 4-2
_CPU = struct.Struct("<BBBBII8x")
_BUS = struct.Struct("<BB6s")
_IOAPIC = struct.Struct("<BBBBI")
_INT = struct.Struct("<BBHBBBB")  # type irqtype flags src_bus src_irq dest_apic dest_pin
_CHECKSUM_MPF = 10  # offset of the checksum byte in the floating pointer
_CHECKSUM_MPC = 7  # ... and in the configuration table header
assert _MPF.size == 16 and _MPC.size == 44 and _CPU.size == 20
assert _BUS.size == _IOAPIC.size == _INT.size == 8


def mptable_max_size(num_cpus: int, num_pci: int = 0) -> int:
    """Upper bound of build_mptable's output size (exact unless IRQ pins are shared)."""
    return (
        _MPF.size
        + _MPC.size
        + num_cpus * _CPU.size
        + len(BUS_NAMES) * _BUS.size
        + _IOAPIC.size
        + (ISA_IRQS + num_pci + 2) * _INT.size
    )


# xAPIC ids are 8 bits, 0xff is broadcast, and the IOAPIC takes id num_cpus: 254 CPUs at most,
# and no more than fit (with every PCI slot routed) between MPTABLE_START and MPTABLE_LIMIT.
MAX_CPUS = min(
    0xFF - 1,
    (MPTABLE_LIMIT - MPTABLE_START - mptable_max_size(0, MAX_PCI_INTERRUPTS)) // _CPU.size,
)


class MpInterrupt(NamedTuple):
    """One I/O (type 3) or local (type 4) interrupt assignment entry."""

    kind: int  # MP_INT, MP_NMI, MP_SMI, MP_EXTINT
    flags: int
    src_bus: int
    src_irq: int
    dest_apic: int  # IOAPIC id, or local APIC id (0xff = all)
    dest_pin: int  # IOAPIC INTIN#, or LINTIN#


def _checksum(data: bytes | bytearray | memoryview) -> int:
    return (-sum(data)) & 0xFF


def validate_cpus(num_cpus: int) -> None:
    """The vCPU count every part of pyhv can describe to a guest (MP table and MADT)."""
    if not 1 <= num_cpus <= MAX_CPUS:
        raise PyhvError(f"--cpus must be between 1 and {MAX_CPUS}, got {num_cpus}")


def build_mptable(
    base_addr: int,
    num_cpus: int,
    ioapic_addr: int = IOAPIC_ADDR,
    pci_interrupts: list[tuple[int, int, int]] | tuple[()] = (),
    *,
    timer_pin: int = 2,
) -> bytes:
    """Floating pointer + configuration table, to be written at `base_addr`.

    `pci_interrupts` holds (device slot, INTx pin 0-3 = INTA-INTD, IOAPIC pin). ISA IRQ 0 (the
    PIT) is routed to IOAPIC pin `timer_pin`, 2 by default like a PC's interrupt override, which
    needs GSI 0 -> IOAPIC pin 2 in KVM's irq routing (QEMU's kvm_pc_setup_irq_routing); IRQ 2,
    the 8259 cascade, then has no IOAPIC entry. Pass timer_pin=0 with KVM's default routing.
    """
    if not 1 <= num_cpus <= MAX_CPUS:
        raise PyhvError(f"{num_cpus} vCPUs requested: pyhv supports 1 to {MAX_CPUS}")
    if timer_pin not in (0, 2):
        raise ValueError("timer_pin must be 0 or 2")
    if len(pci_interrupts) > MAX_PCI_INTERRUPTS:
        raise PyhvError(f"{len(pci_interrupts)} PCI interrupts: at most {MAX_PCI_INTERRUPTS}")
    ioapic_id = num_cpus
    entries: list[bytes] = []
    for cpu in range(num_cpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries.append(
            _CPU.pack(MP_PROCESSOR, cpu, LAPIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES)
        )
    for bus_id, name in BUS_NAMES.items():
        entries.append(_BUS.pack(MP_BUS, bus_id, name))
    entries.append(_IOAPIC.pack(MP_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_USABLE, ioapic_addr))

    pci_pins = set()
    pci_entries = []
    for slot, pin, ioapic_pin in pci_interrupts:
        if not (0 <= slot < PCI_SLOTS and 0 <= pin < 4 and 0 <= ioapic_pin < IOAPIC_PINS):
            raise PyhvError(f"bad PCI interrupt route slot={slot} pin={pin} -> {ioapic_pin}")
        pci_pins.add(ioapic_pin)
        src_irq = (slot << 2) | pin
        pci_entries.append(
            _INT.pack(MP_INTSRC, MP_INT, PCI_IRQ_FLAGS, BUS_PCI, src_irq, ioapic_id, ioapic_pin)
        )
    for irq in range(ISA_IRQS):
        pin = irq
        if timer_pin == 2:
            if irq == 2:
                continue  # the cascade: pin 2 is taken by the PIT override below
            if irq == 0:
                pin = 2
        if pin in pci_pins:
            continue  # a PCI device owns this pin (level, active low); the ISA IRQ is unused
        entries.append(_INT.pack(MP_INTSRC, MP_INT, MP_IRQ_DEFAULT, BUS_ISA, irq, ioapic_id, pin))
    entries.extend(pci_entries)
    # Virtual wire mode: the 8259 reaches the BSP through LINT0; NMIs go to every CPU's LINT1.
    entries.append(_INT.pack(MP_LINTSRC, MP_EXTINT, MP_IRQ_DEFAULT, BUS_ISA, 0, 0, 0))
    entries.append(_INT.pack(MP_LINTSRC, MP_NMI, MP_IRQ_DEFAULT, BUS_ISA, 0, ALL_LAPICS, 1))

    body = b"".join(entries)
    table_len = _MPC.size + len(body)
    total = _MPF.size + table_len
    if base_addr < 0 or (base_addr + total) >> 32:
        raise PyhvError(f"MP table at {base_addr:#x} must lie below 4 GiB")
    buf = bytearray(total)
    _MPF.pack_into(buf, 0, MPF_SIGNATURE, base_addr + _MPF.size, 1, MP_SPEC_REV, 0, 0, 0, b"")
    buf[_CHECKSUM_MPF] = _checksum(memoryview(buf)[: _MPF.size])
    _MPC.pack_into(
        buf, _MPF.size, MPC_SIGNATURE, table_len, MP_SPEC_REV, 0, OEM_ID, PRODUCT_ID,
        0, 0, len(entries), LAPIC_ADDR, 0, 0, 0,
    )  # fmt: skip
    buf[_MPF.size + _MPC.size :] = body
    buf[_MPF.size + _CHECKSUM_MPC] = _checksum(memoryview(buf)[_MPF.size :])
    return bytes(buf)


def parse_mptable(data: bytes, base_addr: int = MPTABLE_START) -> dict:
    """Read back an MP table blob written at `base_addr`, checking signatures and checksums.

    A reference reader for tests and diagnostics; raises ValueError on anything malformed.
    """
    if len(data) < _MPF.size:
        raise ValueError("MP table shorter than the floating pointer")
    sig, physptr, length, spec, _ck, feature1, _f2, _ = _MPF.unpack_from(data, 0)
    if sig != MPF_SIGNATURE or length != 1 or spec not in (1, 4):
        raise ValueError("bad MP floating pointer signature, length or revision")
    if _checksum(data[: _MPF.size]):
        raise ValueError("bad MP floating pointer checksum")
    if feature1 != 0:
        raise ValueError(f"MP default configuration {feature1} instead of a table")
    off = physptr - base_addr
    if off < 0 or off + _MPC.size > len(data):
        raise ValueError(f"MP config table pointer {physptr:#x} outside the blob")
    (sig, table_len, spec, _ck, oem, product, _oemptr, _oemsize, count, lapic, ext_len, _, _) = (
        _MPC.unpack_from(data, off)
    )
    if sig != MPC_SIGNATURE or spec not in (1, 4):
        raise ValueError("bad MP config table signature or revision")
    if off + table_len > len(data) or ext_len:
        raise ValueError("MP config table length runs past the blob")
    if _checksum(data[off : off + table_len]):
        raise ValueError("bad MP config table checksum")

    result: dict = {
        "oem": oem.rstrip(b" ").decode("ascii", "replace"),
        "product": product.rstrip(b" ").decode("ascii", "replace"),
        "lapic_addr": lapic,
        "cpus": [],
        "bsp": None,
        "buses": {},
        "ioapic": None,
        "irqs": [],
        "lints": [],
    }
    pos, end = off + _MPC.size, off + table_len
    for _ in range(count):
        kind = data[pos] if pos < end else None
        size = _ENTRY_SIZES.get(kind)  # type: ignore[arg-type]
        if size is None or pos + size > end:
            raise ValueError(f"bad MP entry type {kind} at offset {pos}")
        if kind == MP_PROCESSOR:
            _, apic_id, _ver, flags, _sig, _feat = _CPU.unpack_from(data, pos)
            if flags & CPU_ENABLED:
                result["cpus"].append(apic_id)
            if flags & CPU_BOOTPROCESSOR:
                result["bsp"] = apic_id
        elif kind == MP_BUS:
            _, bus_id, name = _BUS.unpack_from(data, pos)
            result["buses"][bus_id] = name.rstrip(b" ").decode("ascii", "replace")
        elif kind == MP_IOAPIC:
            _, apic_id, _ver, flags, addr = _IOAPIC.unpack_from(data, pos)
            if result["ioapic"] is None and flags & IOAPIC_USABLE:
                result["ioapic"] = (apic_id, addr)
        else:
            entry = MpInterrupt(*_INT.unpack_from(data, pos)[1:])
            result["irqs" if kind == MP_INTSRC else "lints"].append(entry)
        pos += size
    if pos != end:
        raise ValueError(f"MP config table has {end - pos} bytes after its {count} entries")
    return result
