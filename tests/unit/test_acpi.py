"""ACPI tables for a hardware-reduced guest. Fields are read back at the spec offsets (ACPI 6.5,
ACPICA actbl*.h) as literals here, independently of the builder's constants, and checked by a
real peer when acpica-tools is installed: iasl disassembles every table and compiles our _S5 ASL,
and acpiexec (the ACPICA core Linux runs) loads the tables, evaluates \\_S5 and enters S5.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyhv.errors import PyhvError
from pyhv.machine import acpi

BASE = 0xE0000
CPU_COUNTS = [1, 2, 64, 254]
S5_AML = b"\x08_S5_\x12\x05\x02\x0a\x05\x00"  # Name(_S5, Package(){5, 0}), PkgLength 5
# LEGACY_ASL as iasl 20220331 compiles it (`\\_SB` shortened to `_SB_` at the root)
LEGACY_AML = bytes.fromhex(
    "1049085f53425f5b822b434f4d31085f4849440c41d00501085f55494400085f43525311100a0d4701f803f8"
    "03000822100079005b822d5053324b085f4849440c41d00303085f43525311180a1547016000600000014701"
    "64006400000122020079005b82255254435f085f4849440c41d00b00085f43525311100a0d47017000700000"
    "022200017900")
LEGACY_ASL = """
    Scope (\\_SB)
    {
        Device (COM1)
        {
            Name (_HID, EisaId ("PNP0501"))
            Name (_UID, Zero)
            Name (_CRS, ResourceTemplate ()
            {
                IO (Decode16, 0x03F8, 0x03F8, 0x00, 0x08)
                IRQNoFlags () {4}
            })
        }
        Device (PS2K)
        {
            Name (_HID, EisaId ("PNP0303"))
            Name (_CRS, ResourceTemplate ()
            {
                IO (Decode16, 0x0060, 0x0060, 0x00, 0x01)
                IO (Decode16, 0x0064, 0x0064, 0x00, 0x01)
                IRQNoFlags () {1}
            })
        }
        Device (RTC)
        {
            Name (_HID, EisaId ("PNP0B00"))
            Name (_CRS, ResourceTemplate ()
            {
                IO (Decode16, 0x0070, 0x0070, 0x00, 0x02)
                IRQNoFlags () {8}
            })
        }
    }
"""


def _blob(num_cpus: int = 2, **kw) -> bytes:
    return acpi.build_acpi_tables(num_cpus, **kw)


def _table_offsets(blob: bytes, base: int = BASE) -> dict[str, int]:
    """Blob offset of each table, found by following the pointers at their spec offsets."""
    xsdt = struct.unpack_from("<Q", blob, 24)[0] - base  # RSDP XsdtAddress at offset 24
    n = (struct.unpack_from("<I", blob, xsdt + 4)[0] - 36) // 8
    offs = {"XSDT": xsdt}
    for addr in struct.unpack_from(f"<{n}Q", blob, xsdt + 36):
        offs[blob[addr - base:addr - base + 4].decode()] = addr - base
    offs["DSDT"] = struct.unpack_from("<Q", blob, offs["FACP"] + 140)[0] - base  # X_DSDT
    return offs


def _table(blob: bytes, off: int) -> bytes:
    return blob[off:off + struct.unpack_from("<I", blob, off + 4)[0]]


# ---------------------------------------------------------------- structure ------------------


def test_constants_match_the_spec_and_the_memory_map() -> None:
    assert acpi.RSDP_ADDR == 0xE0000 and acpi.ACPI_LIMIT == 0x100000
    assert acpi.SLP_EN == 0x20 and acpi.SLP_TYP_MASK == 0x1C  # ACPICA ACPI_X_SLEEP_*
    assert acpi.decode_sleep_control(0x20 | 5 << 2) == acpi.SLEEP_TYPE_S5 == 5
    assert acpi.decode_sleep_control(5 << 2) is None  # SLP_TYP without SLP_EN: not a request
    assert acpi.decode_sleep_control(0x20) == 0


@pytest.mark.parametrize("num_cpus", CPU_COUNTS)
def test_rsdp_and_every_table_checksum(num_cpus: int) -> None:
    blob = _blob(num_cpus)
    assert blob[:8] == b"RSD PTR " and blob[9:15] == b"PYHV  "
    assert blob[15] == 2 and struct.unpack_from("<I", blob, 20)[0] == 36  # revision, length
    assert sum(blob[:20]) % 256 == 0, "ACPI 1.0 checksum (first 20 bytes)"
    assert sum(blob[:36]) % 256 == 0, "extended checksum (all 36 bytes)"
    offs = _table_offsets(blob)
    assert sorted(offs) == ["APIC", "DSDT", "FACP", "XSDT"]
    for sig, off in offs.items():
        table = _table(blob, off)
        assert table[:4] == sig.encode()
        assert sum(table) % 256 == 0, f"{sig} checksum"
        assert table[10:36] == b"PYHV  PYHVVM  \x01\0\0\0PYHV\x01\0\0\0", f"{sig} header ids"
        assert off % 8 == 0, f"{sig} not 8-byte aligned"


@pytest.mark.parametrize("base", [BASE, 0xF0000, 0xFF000])
def test_rsdp_is_16_byte_aligned_and_pointers_follow_base(base: int) -> None:
    blob = _blob(4, base_addr=base)
    assert base % 16 == 0 and 0xE0000 <= base <= 0xFFFFF - 36  # Linux's RSDP scan window
    assert base + len(blob) <= acpi.ACPI_LIMIT
    info = acpi.parse_acpi_tables(blob, base)
    assert info["cpus"] == [0, 1, 2, 3]
    for addr in info["xsdt_entries"] + [info["dsdt_addr"]]:
        assert base <= addr < base + len(blob)
    if base != BASE:
        with pytest.raises(ValueError, match="XSDT"):
            acpi.parse_acpi_tables(blob, BASE)
    with pytest.raises(PyhvError, match="16-byte"):
        _blob(1, base_addr=base + 8)


def test_xsdt_entries_point_at_fadt_and_madt_inside_the_blob() -> None:
    blob = _blob(2)
    xsdt = struct.unpack_from("<Q", blob, 24)[0] - BASE
    assert struct.unpack_from("<I", blob, 16)[0] in (0, BASE)  # RsdtAddress: none (XSDT only)
    assert blob[xsdt:xsdt + 4] == b"XSDT" and struct.unpack_from("<I", blob, xsdt + 4)[0] == 52
    sigs = []
    for addr in struct.unpack_from("<2Q", blob, xsdt + 36):
        assert BASE <= addr and addr + 36 <= BASE + len(blob)
        sigs.append(blob[addr - BASE:addr - BASE + 4])
    assert sigs == [b"FACP", b"APIC"]
    info = acpi.parse_acpi_tables(blob)
    assert sorted(info["tables"]) == ["APIC", "DSDT", "FACP", "XSDT"]
    assert info["rsdt_address"] == 0


@pytest.mark.parametrize("num_cpus", CPU_COUNTS)
def test_madt_lists_every_cpu_and_one_ioapic(num_cpus: int) -> None:
    blob = _blob(num_cpus)
    madt = _table(blob, _table_offsets(blob)["APIC"])
    assert len(madt) == 44 + 8 * num_cpus + 12
    assert struct.unpack_from("<II", madt, 36) == (0xFEE00000, 1)  # LAPIC address, PCAT_COMPAT
    for i in range(num_cpus):
        # type 0, length 8, ACPI processor UID, APIC id, flags = enabled
        assert madt[44 + 8 * i:52 + 8 * i] == bytes([0, 8, i, i, 1, 0, 0, 0])
    io = 44 + 8 * num_cpus
    assert struct.unpack_from("<BBBBII", madt, io) == (1, 12, num_cpus, 0, 0xFEC00000, 0)
    info = acpi.parse_acpi_tables(blob)
    assert info["cpus"] == list(range(num_cpus))
    assert info["ioapic"] == (num_cpus, 0xFEC00000, 0)
    assert info["lapic_addr"] == 0xFEE00000 and info["madt_flags"] == 1


def test_ioapic_entry_takes_the_given_id_and_addresses() -> None:
    blob = _blob(3, ioapic_id=9, ioapic_addr=0xFEC01000, lapic_addr=0xFEE10000)
    info = acpi.parse_acpi_tables(blob)
    assert info["ioapic"] == (9, 0xFEC01000, 0) and info["lapic_addr"] == 0xFEE10000
    madt, off, types = info["tables"]["APIC"], 44, []
    while off < len(madt):  # walk the subtables by their own length bytes
        types.append(madt[off])
        off += madt[off + 1]
    assert types == [0, 0, 0, 1], "3 local APICs, 1 IOAPIC, no interrupt source override"


def test_fadt_is_hardware_reduced_with_sleep_and_reset_registers() -> None:
    blob = _blob(2)
    fadt = _table(blob, _table_offsets(blob)["FACP"])
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == 5  # ACPI 6.5 FADT
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & 1 << 20, "HW_REDUCED_ACPI"
    assert flags & 1 << 10, "RESET_REG_SUP"
    assert flags & (1 << 4 | 1 << 5) == 0x30, "no fixed power/sleep button"
    assert struct.unpack_from("<H", fadt, 109)[0] == 0b110  # IAPC_BOOT_ARCH: 8042, no VGA
    io8 = bytes([1, 8, 0, 1])  # GAS: system I/O, 8 bits, offset 0, byte access
    assert fadt[116:128] == io8 + (0x602).to_bytes(8, "little") and fadt[128] == 0x0F  # reset
    assert fadt[244:256] == io8 + (0x600).to_bytes(8, "little")  # SLEEP_CONTROL_REG
    assert fadt[256:268] == io8 + (0x601).to_bytes(8, "little")  # SLEEP_STATUS_REG
    assert fadt[268:272] == b"PYHV"  # hypervisor vendor identity
    assert fadt[56:88] == bytes(32), "no PM1/PM2/PM timer/GPE blocks"
    info = acpi.parse_acpi_tables(blob)
    assert info["fadt_flags"] & acpi.FADT_HW_REDUCED_ACPI
    assert (info["sleep_control_port"], info["sleep_status_port"]) == (0x600, 0x601)
    assert (info["reset_port"], info["reset_value"]) == (0x602, 0x0F)


def test_fadt_dsdt_pointers_reach_the_dsdt() -> None:
    blob = _blob(2)
    fadt = _table_offsets(blob)["FACP"]
    dsdt32 = struct.unpack_from("<I", blob, fadt + 40)[0]
    x_dsdt = struct.unpack_from("<Q", blob, fadt + 140)[0]
    assert dsdt32 == x_dsdt and blob[x_dsdt - BASE:x_dsdt - BASE + 4] == b"DSDT"
    assert acpi.parse_acpi_tables(blob)["dsdt_addr"] == x_dsdt


def test_dsdt_holds_the_s5_package_then_the_legacy_devices() -> None:
    blob = _blob(2)
    dsdt = _table(blob, _table_offsets(blob)["DSDT"])
    assert dsdt[8] == 2 and dsdt[36:36 + len(S5_AML)] == S5_AML
    assert dsdt[36 + len(S5_AML):] == LEGACY_AML
    info = acpi.parse_acpi_tables(blob)
    assert info["dsdt_has_s5"] is True and info["dsdt_has_legacy_devices"] is True


def test_corrupting_any_table_byte_makes_parse_raise() -> None:
    blob = _blob(2)
    regions = {"RSDP": (0, 36)}
    for sig, off in _table_offsets(blob).items():
        regions[sig] = (off, off + struct.unpack_from("<I", blob, off + 4)[0])
    for sig, (start, end) in regions.items():
        for i in range(start, end):
            bad = bytearray(blob)
            bad[i] ^= 0x5A
            with pytest.raises(ValueError) as exc:
                acpi.parse_acpi_tables(bytes(bad))
            where = "XSDT entry" if sig in ("FACP", "APIC") and i - start < 4 else sig
            assert where in str(exc.value), f"byte {i - start} of {sig}: {exc.value}"


def test_size_bound_and_cpu_count_errors() -> None:
    assert BASE + len(_blob(acpi.MAX_CPUS)) <= acpi.ACPI_LIMIT
    assert len(_blob(7)) == acpi.acpi_tables_size(7)
    with pytest.raises(PyhvError, match="cross"):
        _blob(254, base_addr=acpi.ACPI_LIMIT - 0x400)
    top = (acpi.ACPI_LIMIT - acpi.acpi_tables_size(1)) // 16 * 16  # highest base that fits
    assert top + len(_blob(1, base_addr=top)) <= acpi.ACPI_LIMIT
    with pytest.raises(PyhvError, match="cross"):
        _blob(1, base_addr=top + 16)
    for bad in (0, -1, 255):
        with pytest.raises(PyhvError, match="vCPUs"):
            _blob(bad)


# ---------------------------------------------------------------- real peer: acpica-tools ------


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed (Debian package acpica-tools)")
    return path


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


def _write_tables(blob: bytes, tmp_path: Path) -> dict[str, Path]:
    files = {}
    for sig, table in acpi.parse_acpi_tables(blob)["tables"].items():
        files[sig] = tmp_path / f"{sig.lower()}.dat"
        files[sig].write_bytes(table)
    return files


def _disassemble(iasl: str, path: Path) -> str:
    _run([iasl, "-d", path.name], path.parent)
    dsl = path.with_suffix(".dsl").read_text()
    assert "Incorrect checksum" not in dsl and "terminates in the middle" not in dsl
    return re.sub(r"[ \t]+", " ", dsl)


@pytest.mark.parametrize("num_cpus", [1, 254])
def test_iasl_disassembles_every_table(num_cpus: int, tmp_path: Path) -> None:
    iasl = _need("iasl")
    blob = _blob(num_cpus)
    info = acpi.parse_acpi_tables(blob)
    files = _write_tables(blob, tmp_path)
    fadt = _disassemble(iasl, files["FACP"])
    for line in ("Revision : 06", "FADT Minor Revision : 05", "Hardware Reduced (V5) : 1",
                 "Reset Register Supported (V2) : 1", "Control Method Power Button (V1) : 1",
                 "Control Method Sleep Button (V1) : 1", "8042 Present on ports 60/64 (V2) : 1",
                 "VGA Not Present (V4) : 1", "Value to cause reset : 0F",
                 f"DSDT Address : {info['dsdt_addr']:016X}",
                 f"DSDT Address : {info['dsdt_addr']:08X}"):
        assert line in fadt, line
    for name, port in (("Reset Register", 0x602), ("Sleep Control Register", 0x600),
                       ("Sleep Status Register", 0x601)):
        assert re.search(rf"{name} : \[Generic Address Structure\]\n.*Space ID : 01 \[SystemIO\]"
                         rf"\n.*Bit Width : 08\n.*\n.*Byte Access:8\]\n.*Address : {port:016X}",
                         fadt), name
    madt = _disassemble(iasl, files["APIC"])
    assert madt.count("Subtable Type : 00 [Processor Local APIC]") == num_cpus
    assert madt.count("Processor Enabled : 1") == num_cpus
    assert f"Local Apic ID : {num_cpus - 1:02X}" in madt
    assert madt.count("Subtable Type : 01 [I/O APIC]") == 1
    assert f"I/O Apic ID : {num_cpus:02X}" in madt and "Address : FEC00000" in madt
    assert "Local Apic Address : FEE00000" in madt and "PC-AT Compatibility : 1" in madt
    assert "Interrupt Source Override" not in madt
    xsdt = _disassemble(iasl, files["XSDT"])
    for i, addr in enumerate(info["xsdt_entries"]):
        assert f"ACPI Table Address {i} : {addr:016X}" in xsdt
    dsdt = _disassemble(iasl, files["DSDT"])
    assert re.search(r"Name \(_S5, Package \(0x02\)[^{]*\{\s*0x05,\s*Zero\s*\}\)", dsdt), dsdt
    for hid, irq in (("PNP0501", 4), ("PNP0303", 1), ("PNP0B00", 8)):
        assert f'Name (_HID, EisaId ("{hid}")' in dsdt and f"IRQNoFlags ()\n {{{irq}}}" in dsdt


def test_iasl_recompiles_data_tables_to_the_same_bytes(tmp_path: Path) -> None:
    """Data-table compiler round trip: only the checksum and compiler id/revision may change."""
    iasl = _need("iasl")
    files = _write_tables(_blob(3), tmp_path)
    for sig in ("XSDT", "FACP", "APIC"):
        _disassemble(iasl, files[sig])
        _run([iasl, files[sig].with_suffix(".dsl").name], tmp_path)
        ours, theirs = files[sig].read_bytes(), files[sig].with_suffix(".aml").read_bytes()
        assert len(theirs) == len(ours), sig
        assert theirs[:9] + theirs[10:28] + theirs[36:] == ours[:9] + ours[10:28] + ours[36:], sig


def test_iasl_compiles_our_dsdt_asl_to_the_same_aml(tmp_path: Path) -> None:
    iasl = _need("iasl")
    (tmp_path / "dsdt.asl").write_text('DefinitionBlock ("", "DSDT", 2, "PYHV  ", "PYHVVM  ", 1)\n'
                                       "{\n    Name (_S5, Package () {5, 0})\n"
                                       f"{LEGACY_ASL}}}\n")
    _run([iasl, "dsdt.asl"], tmp_path)
    aml = (tmp_path / "dsdt.aml").read_bytes()
    dsdt = acpi.parse_acpi_tables(_blob(1))["tables"]["DSDT"]
    assert aml[36:] == dsdt[36:] == S5_AML + LEGACY_AML
    assert aml[:9] + aml[10:28] == dsdt[:9] + dsdt[10:28]


def test_acpiexec_loads_the_tables_and_enters_s5_through_the_sleep_register(
        tmp_path: Path) -> None:
    """ACPICA (the interpreter inside Linux) loads FADT/DSDT/MADT, evaluates \\_S5 and takes
    the hardware-reduced sleep path: a legacy FADT would fail here on missing PM1 blocks."""
    acpiexec = _need("acpiexec")
    files = _write_tables(_blob(2), tmp_path)
    out = _run([acpiexec, "-b", "evaluate \\_S5;sleep 5",
                files["DSDT"].name, files["FACP"].name, files["APIC"].name], tmp_path)
    assert not re.search(r"error|warning|exception", out, re.IGNORECASE), out
    assert "[Integer] = 0000000000000005" in out
    assert "Sleep-A: 05" in out
    assert re.search(r"HwExtendedSleep\s*: Entering sleep state \[S5\]", out), out
