"""The Python legacy devices: CMOS, i8042, PCI configuration space, boot timer."""

from __future__ import annotations

import time

from pyhv.machine.devices.boottimer import BootTimer
from pyhv.machine.devices.cmos import Cmos
from pyhv.machine.devices.i8042 import I8042
from pyhv.machine.devices.pci import PciConfigSpace, PciFunction


def test_cmos_time_is_bcd_and_memory_sizes_are_reported():
    clock = time.struct_time((2026, 11, 27, 23, 59, 58, 4, 331, 0))
    cmos = Cmos(512 << 20, 0, clock=lambda: clock)

    def reg(i: int) -> int:
        cmos.write(0, 1, i | 0x80)          # bit 7 (NMI mask) must not change the index
        return cmos.read(1, 1)

    assert [reg(i) for i in (0, 2, 4, 7, 8, 9, 0x32)] == [0x58, 0x59, 0x23, 0x27, 0x11, 0x26,
                                                          0x20]
    assert reg(0x0A) & 0x80 == 0              # never "update in progress"
    assert reg(0x0B) & 0x02                   # 24-hour mode
    assert reg(0x34) | reg(0x35) << 8 == ((512 - 16) << 20) >> 16


def test_i8042_reset_command_and_self_test():
    resets = []
    kbd = I8042(on_reset=lambda: resets.append(1))
    kbd.write(4, 1, 0xAA)
    assert kbd.read(4, 1) & 1 and kbd.read(0, 1) == 0x55
    assert resets == []
    kbd.write(4, 1, 0xFE)
    assert resets == [1]


def test_pci_mechanism_one_host_bridge_empty_slots_and_write_masks():
    pci = PciConfigSpace()

    def cfg(slot: int, reg: int, size: int = 4, value: int | None = None) -> int:
        pci.write(0, 4, 0x8000_0000 | slot << 11 | (reg & 0xFC))
        if value is not None:
            pci.write(4 + (reg & 3), size, value)
            return 0
        return pci.read(4 + (reg & 3), size)

    assert cfg(0, 0) == 0x0008_1B36
    assert pci.read(0, 4) == 0x8000_0000          # the address register reads back
    assert cfg(0, 0x0A, 2) == 0x0600            # class: host bridge
    assert cfg(5, 0) == 0xFFFF_FFFF             # empty slot
    cfg(0, 0, 4, 0x1234_5678)                   # vendor/device are read-only
    assert cfg(0, 0) == 0x0008_1B36
    cfg(0, 0x3C, 1, 11)                         # interrupt line is writable
    assert cfg(0, 0x3C, 1) == 11
    slot = pci.free_slot()
    pci.add(slot, PciFunction(0x1AF4, 0x1042, 0x010000))
    assert cfg(slot, 0) == 0x1042_1AF4
    pci.write(0, 4, 0x0000_0000)                # enable bit clear: data reads all ones
    assert pci.read(4, 4) == 0xFFFF_FFFF


def test_boot_timer_counts_only_the_magic_value():
    timer = BootTimer(start=time.monotonic() - 1.0)
    timer.write(0, 1, 7)
    timer.write(0, 1, 123)
    assert len(timer.marks) == 1 and 1.0 <= timer.marks[0] < 60
