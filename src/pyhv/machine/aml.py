"""The few AML encodings pyhv's DSDT needs (ACPI 6.5 chapter 20 and 6.4 resource data).

Each function returns the bytes iasl emits for the matching ASL, so the DSDT can be
checked against iasl's output for the same source (tests/unit/test_acpi.py).
"""

from __future__ import annotations

from pyhv.errors import PyhvError

NAME_OP, SCOPE_OP, BUFFER_OP, BYTE_PREFIX, DWORD_PREFIX, ZERO_OP = 0x08, 0x10, 0x11, 0x0A, 0x0C, 0
DEVICE_OP = b"\x5b\x82"
END_TAG = b"\x79\x00"       # small resource "end tag", checksum 0 = not checked


def pkg_length(body: int) -> bytes:
    """PkgLength for `body` bytes: it counts its own 1-4 bytes; beyond one byte the low
    nibble goes in the lead byte and the rest in 1-3 following bytes."""
    for extra in range(4):
        total = body + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            rest = (total >> 4).to_bytes(extra, "little")
            return bytes([extra << 6 | (total & 0xF)]) + rest
    raise PyhvError(f"AML package of {body} bytes is too large")


def name_seg(name: str) -> bytes:
    """A 4-character NameSeg, padded with '_' as ASL does."""
    if not 1 <= len(name) <= 4 or not name.replace("_", "A").isalnum():
        raise PyhvError(f"bad AML name {name!r}")
    return name.ljust(4, "_").encode()


def name(seg: str, value: bytes) -> bytes:
    return bytes([NAME_OP]) + name_seg(seg) + value


def dword(value: int) -> bytes:
    return bytes([DWORD_PREFIX]) + value.to_bytes(4, "little")


def zero() -> bytes:
    return bytes([ZERO_OP])


def eisa_id(text: str) -> bytes:
    """EisaId ("PNP0501"): three letters in 5 bits each, then 4 hex digits, big-endian."""
    if len(text) != 7 or not text[:3].isupper() or not text[:3].isalpha():
        raise PyhvError(f"bad EISA id {text!r}")
    letters = (ord(text[0]) - 0x40) << 10 | (ord(text[1]) - 0x40) << 5 | (ord(text[2]) - 0x40)
    return dword(int.from_bytes(letters.to_bytes(2, "big") + bytes.fromhex(text[3:]), "little"))


def buffer(data: bytes) -> bytes:
    if len(data) > 0xFF:
        raise PyhvError("AML buffer over 255 bytes")
    size = bytes([BYTE_PREFIX, len(data)])
    return bytes([BUFFER_OP]) + pkg_length(len(size) + len(data)) + size + data


def resource_template(*descriptors: bytes) -> bytes:
    return buffer(b"".join(descriptors) + END_TAG)


def io_port(base: int, length: int) -> bytes:
    """IO (Decode16, base, base, 0x00, length): a fixed 16-bit decoded port range."""
    return bytes([0x47, 0x01]) + base.to_bytes(2, "little") * 2 + bytes([0, length])


def irq_no_flags(irq: int) -> bytes:
    """IRQNoFlags () {irq}: an ISA IRQ, edge-triggered, active high."""
    return bytes([0x22]) + (1 << irq).to_bytes(2, "little")


def device(seg: str, *terms: bytes) -> bytes:
    body = name_seg(seg) + b"".join(terms)
    return DEVICE_OP + pkg_length(len(body)) + body


def scope(seg: str, *terms: bytes) -> bytes:
    body = name_seg(seg) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body
