"""GuestMemory bounds and layout, and the range bus, without a VM."""

from __future__ import annotations

import mmap
import os

import pytest

from hvcore.bus import Bus
from hvcore.devices import Probe
from hvcore.memory import GuestMemory
from pyhv.machine import layout


def test_view_read_write_round_trip():
    mem = GuestMemory([(0, 1 << 20)])
    mem.write(0x1234, b"hello")
    assert mem.read(0x1234, 5) == b"hello"
    view = mem.view(0x1000, 0x1000)
    view[0x234:0x239] = b"HELLO"
    assert mem.read(0x1234, 5) == b"HELLO"


@pytest.mark.parametrize("gpa, length", [(1 << 20, 1), ((1 << 20) - 4, 8), (1 << 40, 1),
                                         (0xFFFF_FFFF_FFFF_FFF0, 0x20)])
def test_outside_ram_raises_and_never_reads_host_memory(gpa, length):
    mem = GuestMemory([(0, 1 << 20)])
    for op in (lambda: mem.read(gpa, length), lambda: mem.view(gpa, length),
               lambda: mem.write(gpa, b"x" * length)):
        with pytest.raises(IndexError, match="outside guest RAM"):
            op()
    assert not mem.contains(gpa, length)


def test_access_may_not_span_the_pci_hole():
    mem = GuestMemory(layout.ram_regions(4 << 30))
    (low, low_size, _, _), (high, high_size, _, off) = mem.layout
    assert (low, low_size) == (0, layout.MMIO_GAP_START)
    assert (high, high_size) == (1 << 32, (4 << 30) - layout.MMIO_GAP_START)
    assert off == low_size                      # one memfd, the high part right after
    with pytest.raises(IndexError):
        mem.read(layout.MMIO_GAP_START - 4, 8)  # runs into the hole
    mem.write(1 << 32, b"above")
    assert mem.read(1 << 32, 5) == b"above"


def test_memory_is_a_shareable_memfd():
    mem = GuestMemory([(0, 1 << 20)])
    mem.write(0x10, b"shared")
    other = mmap.mmap(os.dup(mem.memfd), 1 << 20, flags=mmap.MAP_SHARED)
    assert other[0x10:0x16] == b"shared"       # a vhost-user backend would see the same
    assert os.readlink(f"/proc/self/fd/{mem.memfd}").startswith("/memfd:pyhv-ram")


@pytest.mark.parametrize("regions, needle", [([], "1 to"), ([(0, 100)], "page-aligned"),
                                             ([(0, 8192), (4096, 4096)], "overlaps")])
def test_bad_layouts_are_refused(regions, needle):
    with pytest.raises(ValueError, match=needle):
        GuestMemory(regions)


def test_bus_dispatches_by_range_and_reads_all_ones_elsewhere():
    bus = Bus("test")
    a, b = Probe(read_value=0xAA), Probe(read_value=0xBB)
    bus.add(0x100, 0x10, a)
    bus.add(0x200, 1, b)
    assert bus.access(0x105, 1, False) == 0xAA and a.last_offset == 5
    assert bus.access(0x200, 2, False) == 0xBB
    bus.access(0x10F, 4, True, 0x12345678)
    assert a.last_value == 0x12345678 and a.last_offset == 0xF
    assert bus.access(0x110, 4, False) == 0xFFFFFFFF
    assert bus.unhandled == 1 and bus.last_unhandled == 0x110


def test_bus_refuses_overlaps_and_supports_removal():
    bus = Bus("test")
    bus.add(0x100, 0x10, Probe())
    with pytest.raises(ValueError, match="overlaps"):
        bus.add(0x10F, 2, Probe())
    bus.remove(0x100)
    assert bus.access(0x100, 1, False) == 0xFF
    with pytest.raises(KeyError):
        bus.remove(0x100)


def test_python_device_errors_are_raised_with_their_message():
    class Bad:
        def read(self, offset, size):
            raise RuntimeError("no such register")

        def write(self, offset, size, value):
            pass

    bus = Bus("test")
    bus.add(0x10, 4, Bad())
    with pytest.raises(RuntimeError, match="no such register"):
        bus.access(0x12, 1, False)
    bus.access(0x12, 1, True, 1)      # the device keeps working after an error
