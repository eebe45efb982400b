"""The AML encoders against the bytes iasl emits for the same ASL, and PkgLength at the
boundaries where it grows a byte (ACPI 6.5 section 20.2.4)."""

from __future__ import annotations

import pytest

from pyhv.errors import PyhvError
from pyhv.machine import aml

# Device (PS2K) { Name (_HID, EisaId ("PNP0303")) Name (_CRS, ResourceTemplate () {
#   IO (Decode16, 0x60, 0x60, 0, 1) IO (Decode16, 0x64, 0x64, 0, 1) IRQNoFlags () {1} }) }
PS2K_IASL = bytes.fromhex("5b822d5053324b085f4849440c41d00303085f43525311180a1547016000600000"
                          "0147016400640000012202007900")


def test_device_matches_iasl():
    ps2k = aml.device("PS2K", aml.name("_HID", aml.eisa_id("PNP0303")),
                      aml.name("_CRS", aml.resource_template(
                          aml.io_port(0x60, 1), aml.io_port(0x64, 1), aml.irq_no_flags(1))))
    assert ps2k == PS2K_IASL


@pytest.mark.parametrize("body, encoded", [
    (0, "01"), (62, "3f"),                      # one byte up to a total of 63
    (63, "4104"), (96, "4206"),                 # 2 bytes: low nibble + 1 byte
    (4093, "4fff"), (4094, "810001"),           # 3 bytes from a total of 4096
    ((1 << 20) - 4, "8fffff"), ((1 << 20) - 3, "c1000001"),
])
def test_pkg_length_boundaries(body, encoded):
    assert aml.pkg_length(body).hex() == encoded
    assert body + len(aml.pkg_length(body)) == _decode(aml.pkg_length(body))


def _decode(b: bytes) -> int:
    extra = b[0] >> 6
    if not extra:
        return b[0] & 0x3F
    return (b[0] & 0xF) | int.from_bytes(b[1:1 + extra], "little") << 4


@pytest.mark.parametrize("bad", [lambda: aml.name_seg("TOOLONG"), lambda: aml.name_seg("a-b"),
                                 lambda: aml.eisa_id("pnp0501"), lambda: aml.buffer(b"x" * 256),
                                 lambda: aml.pkg_length(1 << 28)])
def test_bad_input_is_one_line(bad):
    with pytest.raises(PyhvError) as e:
        bad()
    assert "\n" not in str(e.value)
