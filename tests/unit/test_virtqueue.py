"""Split virtqueues, device side (hvcore.virtio.queue), driven by a synthetic driver that
writes rings into guest memory as a guest would, hostile ones included: every chain is
taken exactly as a model of the spec's rules takes it, every violation breaks only its
queue with a message naming the field, and no buffer lies outside guest memory."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvcore.memory import GuestMemory
from hvcore.virtio.memmap import MemMap
from hvcore.virtio.queue import SplitQueue, VirtqueueError
from tests.helpers.virtio_driver import INDIRECT, NEXT, WRITE, Driver

# two adjacent regions (a buffer may span them) and one after a hole
REGIONS = [(0, 0x10000), (0x10000, 0x10000), (0x100000, 0x10000)]
SIZE = 16


@pytest.fixture(scope="module")
def mem() -> GuestMemory:
    return GuestMemory(REGIONS)


def queue(mem, drv: Driver, index: int = 0, event_idx=False, indirect=True) -> SplitQueue:
    q = SplitQueue(MemMap.of_guest(mem), index, drv.size, event_idx=event_idx,
                   indirect=indirect)
    q.set_rings(drv.desc, drv.avail, drv.used)
    return q


@pytest.fixture
def drv(mem) -> Driver:
    return Driver(mem, 0x1000, SIZE, data=0x4000)


def test_a_chain_is_read_written_and_returned(mem, drv):
    q = queue(mem, drv)
    out = drv.alloc(8, b"request!")
    back = drv.alloc(16)
    drv.publish(drv.chain([(out, 8, False), (back, 16, True)]))
    head, readable, writable = q.pop()
    assert [bytes(b) for b in readable] == [b"request!"]
    assert [len(b) for b in writable] == [16] and not writable[0].readonly
    writable[0][:5] = b"reply"
    q.push(head, 5)
    assert drv.take_used() == [(head, 5)]
    assert mem.read(back, 5) == b"reply"
    assert q.pop() is None


def test_indirect_chains_and_a_buffer_across_two_regions(mem, drv):
    q = queue(mem, drv)
    span = 0x10000 - 8                      # 8 bytes in the first region, 8 in the second
    mem.write(span, b"ABCDEFGH")
    mem.write(0x10000, b"IJKLMNOP")
    drv.publish(drv.indirect_chain([(span, 16, False), (drv.alloc(4), 4, True)]))
    head, readable, writable = q.pop()
    assert [bytes(b) for b in readable] == [b"ABCDEFGH", b"IJKLMNOP"]
    assert [len(b) for b in writable] == [4]
    q.push(head, 0)
    assert drv.take_used() == [(head, 0)]


def test_event_idx_interrupts_and_kick_suppression(mem, drv):
    q = queue(mem, drv, event_idx=True)
    for _ in range(3):
        drv.publish(drv.chain([(drv.alloc(4, b"x"), 4, False)]))
    drv.set_used_event(1)                   # "interrupt me once the 2nd entry is used"
    wanted = []
    for _ in range(3):
        head, _r, _w = q.pop()
        q.push(head, 0)
        wanted.append(q.interrupt_wanted())
    assert wanted == [False, True, False]
    q.notifications(True)
    assert drv.avail_event() == 3           # kick me when the driver publishes entry 3


def test_flags_without_event_idx(mem, drv):
    q = queue(mem, drv)
    drv.publish(drv.chain([(drv.alloc(4, b"x"), 4, False)]))
    q.notifications(False)
    assert drv.used_flags() == 1            # VRING_USED_F_NO_NOTIFY
    head, _r, _w = q.pop()
    q.push(head, 0)
    drv.set_avail_flags(1)                  # VRING_AVAIL_F_NO_INTERRUPT
    assert not q.interrupt_wanted()
    drv.publish(drv.chain([(drv.alloc(4, b"y"), 4, False)]))
    head, _r, _w = q.pop()
    q.push(head, 0)
    drv.set_avail_flags(0)
    assert q.interrupt_wanted()
    assert not q.interrupt_wanted()         # nothing published since


def _break(mem, drv, write, expected: str, indirect=True):
    q = queue(mem, drv, indirect=indirect)
    write(drv)
    with pytest.raises(VirtqueueError, match=expected):
        q.pop()
    with pytest.raises(VirtqueueError, match=expected):   # it stays broken
        q.pop()
    # another queue in the same memory still works
    other = Driver(mem, 0x20000 - 0x2000, 8, data=0x108000)
    q2 = queue(mem, other, index=1)
    other.publish(other.chain([(other.alloc(3, b"abc"), 3, False)]))
    assert bytes(q2.pop()[1][0]) == b"abc"
    q.reset()                               # a device reset clears the error
    assert q.error is None and q.pop() is None


BAD = {
    "avail index jump": (lambda d: d.publish(idx=SIZE + 1), "avail index jumped from 0 to 17"),
    "head outside": (lambda d: (d.write_desc(0, 0x4000, 4, 0, 0), d.publish(SIZE + 3)),
                     "chain head 19 is outside the queue"),
    "next outside": (lambda d: (d.write_desc(0, 0x4000, 4, NEXT, 99), d.publish(0)),
                     "descriptor 0: next index 99 is outside its table"),
    "loop": (lambda d: (d.write_desc(0, 0x4000, 4, NEXT, 1),
                        d.write_desc(1, 0x4000, 4, NEXT, 0), d.publish(0)),
             "more descriptors than its table .16.: a loop"),
    "outside memory": (lambda d: (d.write_desc(0, 0x50000, 4, 0, 0), d.publish(0)),
                       "descriptor 0: buffer 0x50000\\+0x4 is outside guest memory"),
    "into the hole": (lambda d: (d.write_desc(0, 0x1fff0, 0x20, 0, 0), d.publish(0)),
                      "buffer 0x1fff0\\+0x20 is outside"),
    "wrapping address": (lambda d: (d.write_desc(0, 2**64 - 8, 0x10, 0, 0), d.publish(0)),
                         "is outside guest memory"),
    "zero length": (lambda d: (d.write_desc(0, 0x4000, 0, 0, 0), d.publish(0)),
                    "descriptor 0: zero-length buffer"),
    "readable after writable": (lambda d: (d.write_desc(0, 0x4000, 4, WRITE | NEXT, 1),
                                           d.write_desc(1, 0x4000, 4, 0, 0), d.publish(0)),
                                "descriptor 1: a device-readable buffer after"),
    "past 4 GiB": (lambda d: (d.write_desc(0, 0x4000, 16, NEXT, 1),
                              d.write_desc(1, 0x4000, 0xFFFFFFFF, 0, 0), d.publish(0)),
                   "holds more than 4 GiB"),
    "nested indirect": (lambda d: (d.write_desc(0, 0x6000, 16, INDIRECT, 0, table=0x5000),
                                   d.write_desc(0, 0x5000, 16, INDIRECT, 0), d.publish(0)),
                        "indirect descriptor inside an indirect table"),
    "indirect in a chain": (lambda d: (d.write_desc(0, 0x4000, 4, NEXT, 1),
                                       d.write_desc(1, 0x5000, 16, INDIRECT, 0), d.publish(0)),
                            "indirect descriptor inside a chain"),
    "indirect with next": (lambda d: (d.write_desc(0, 0x5000, 16, INDIRECT | NEXT, 1),
                                      d.publish(0)), "indirect descriptor with the NEXT flag"),
    "indirect odd size": (lambda d: (d.write_desc(0, 0x5000, 24, INDIRECT, 0), d.publish(0)),
                          "indirect table of 24 bytes"),
    "indirect table outside": (lambda d: (d.write_desc(0, 0x70000, 32, INDIRECT, 0),
                                          d.publish(0)),
                               "indirect table 0x70000\\+0x20 is outside"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_broken_chain_breaks_only_its_queue(mem, drv, case):
    write, expected = BAD[case]
    _break(mem, drv, write, expected)


def test_indirect_without_the_feature(mem, drv):
    _break(mem, drv, lambda d: d.publish(d.indirect_chain([(0x4000, 4, False)])),
           "VIRTIO_F_INDIRECT_DESC was not negotiated", indirect=False)


def test_rings_outside_memory_or_misaligned_are_refused(mem):
    q = SplitQueue(MemMap.of_guest(mem), 0, SIZE)
    with pytest.raises(VirtqueueError, match="rings outside guest memory"):
        q.set_rings(0x1fff0, 0x1000, 0x2000)
    with pytest.raises(VirtqueueError, match="misaligned"):
        q.set_rings(0x1008, 0x1200, 0x1400)
    with pytest.raises(ValueError, match="power of two"):
        SplitQueue(MemMap.of_guest(mem), 0, 24)


# ---- hostile rings at random, against a model of the rules


def _in_ram(gpa: int, n: int) -> list[tuple[int, int]] | None:
    """The pieces [(gpa, len)] of a range split at region ends, or None if unmapped."""
    pieces = []
    while n:
        for start, size in REGIONS:
            if start <= gpa < start + size:
                got = min(n, start + size - gpa)
                pieces.append((gpa, got))
                gpa, n = gpa + got, n - got
                break
        else:
            return None
    return pieces


def model(mem: GuestMemory, head: int, indirect_ok: bool):
    """What a chain from `head` must come out as: [(gpa, len, writable)], or None."""
    def desc(table, i):
        return struct.unpack("<QIHH", mem.read(table + 16 * i, 16))

    table, tsize, i = 0x1000, SIZE, head
    addr, length, flags, _ = desc(table, head)
    if flags & INDIRECT:
        if not indirect_ok or flags & NEXT or length == 0 or length % 16 or \
                length // 16 > 1024 or _in_ram(addr, length) is None or \
                len(_in_ram(addr, length)) != 1:
            return None
        table, tsize, i = addr, length // 16, 0
    out, count, total, writing = [], 0, 0, False
    while True:
        count += 1
        if count > tsize:
            return None
        addr, length, flags, nxt = desc(table, i)
        if flags & INDIRECT or length == 0 or (writing and not flags & WRITE):
            return None
        writing = bool(flags & WRITE)
        total += length
        if total > 0xFFFFFFFF:
            return None
        pieces = _in_ram(addr, length)
        if pieces is None or len(out) + len(pieces) > 1024:
            return None
        out += [(g, n, writing) for g, n in pieces]
        if not flags & NEXT:
            return out
        if nxt >= tsize:
            return None
        i = nxt


addresses = st.one_of(st.integers(0x4000, 0x1ffff), st.integers(0x100000, 0x10ffff),
                      st.integers(0, 2**64 - 1))
descs = st.tuples(addresses, st.one_of(st.integers(0, 0x40), st.sampled_from([0, 16, 32, 24,
                                                                              2**32 - 1])),
                  st.integers(0, 7), st.integers(0, SIZE + 2))


@settings(max_examples=400, deadline=None)
@given(table=st.lists(descs, min_size=SIZE, max_size=SIZE),
       indirect_table=st.lists(descs, min_size=4, max_size=4),
       head=st.integers(0, SIZE + 1), indirect_ok=st.booleans())
def test_hostile_rings_match_the_model(mem, table, indirect_table, head, indirect_ok):
    drv = Driver(mem, 0x1000, SIZE, data=0x4000)
    mem.write(0x4000, bytes(range(256)) * 64)
    for i, (a, n, f, nx) in enumerate(table):
        drv.write_desc(i, a, n, f, nx)
    for i, (a, n, f, nx) in enumerate(indirect_table):   # a table some heads may point to
        drv.write_desc(i, a, n, f, nx, table=0x5000)
    q = queue(mem, drv, indirect=indirect_ok)
    drv.publish(head)
    expect = model(mem, head, indirect_ok) if head < SIZE else None
    if expect is None:
        with pytest.raises(VirtqueueError):
            q.pop()
        return
    got_head, readable, writable = q.pop()
    assert got_head == head
    got = [(bytes(b), False) for b in readable] + [(bytes(b), True) for b in writable]
    assert [(mem.read(g, n), w) for g, n, w in expect] == got
