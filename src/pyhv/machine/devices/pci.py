"""PCI configuration mechanism #1 (ports 0xCF8/0xCFC) with a host bridge at 00:00.0.

Later issues plug virtio functions into the free slots; an empty slot reads all ones,
which is how a guest learns that nothing is there.
"""

from __future__ import annotations

import struct

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC
ENABLE = 0x8000_0000
SLOTS = 32


class PciFunction:
    """A function's 256-byte configuration space; bytes set in `writable` accept writes."""

    def __init__(self, vendor: int, device: int, class_code: int, revision: int = 0,
                 header_type: int = 0, subsystem_vendor: int = 0, subsystem: int = 0):
        self.config = bytearray(256)
        self.writable = bytearray(256)
        struct.pack_into("<HH", self.config, 0, vendor, device)
        struct.pack_into("<I", self.config, 8, (class_code << 8) | revision)
        self.config[0x0E] = header_type
        struct.pack_into("<HH", self.config, 0x2C, subsystem_vendor, subsystem)
        self.writable[0x04:0x06] = b"\xff\xff"   # command
        self.writable[0x0C:0x0E] = b"\xff\xff"   # cache line size, latency timer
        self.writable[0x3C] = 0xFF                # interrupt line

    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        data = value.to_bytes(size, "little")
        for i in range(size):   # at most 4 iterations: one register, not a byte stream
            mask = self.writable[offset + i]
            self.config[offset + i] = (self.config[offset + i] & ~mask) | (data[i] & mask)


class HostBridge(PciFunction):
    def __init__(self) -> None:
        # Red Hat's "QEMU PCIe host bridge" IDs: guests bind no special driver to it.
        super().__init__(vendor=0x1B36, device=0x0008, class_code=0x060000)


class PciConfigSpace:
    """Mapped at 0xCF8 (length 8): offset 0 is CONFIG_ADDRESS, 4-7 are CONFIG_DATA."""

    def __init__(self) -> None:
        self._address = 0
        self.functions: dict[tuple[int, int, int], PciFunction] = {(0, 0, 0): HostBridge()}

    def add(self, slot: int, function: PciFunction) -> None:
        if not 0 < slot < SLOTS or (0, slot, 0) in self.functions:
            raise ValueError(f"PCI slot {slot} is taken or out of range")
        self.functions[(0, slot, 0)] = function

    def free_slot(self) -> int:
        for slot in range(1, SLOTS):
            if (0, slot, 0) not in self.functions:
                return slot
        raise ValueError("no free PCI slot")

    def _target(self) -> tuple[PciFunction | None, int]:
        if not self._address & ENABLE:
            return None, 0
        bus = (self._address >> 16) & 0xFF
        slot = (self._address >> 11) & 0x1F
        fn = (self._address >> 8) & 0x7
        return self.functions.get((bus, slot, fn)), self._address & 0xFC

    def read(self, offset: int, size: int) -> int:
        if offset < 4:
            if offset == 0 and size == 4:
                return self._address
            return (1 << (8 * size)) - 1
        function, register = self._target()
        if function is None:
            return (1 << (8 * size)) - 1
        return function.read_config(register + (offset - 4), size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            if offset == 0 and size == 4:
                self._address = value & 0x80FF_FFFC
            return
        function, register = self._target()
        if function is not None:
            function.write_config(register + (offset - 4), size, value)
