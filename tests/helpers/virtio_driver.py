"""A synthetic virtio driver for the device side's tests and benches: it lays out a split
virtqueue in guest memory and writes descriptors, the avail ring and its indexes byte by
byte as a guest driver would, including everything a hostile guest might write."""

from __future__ import annotations

import struct

from hvcore.memory import GuestMemory

NEXT, WRITE, INDIRECT = 1, 2, 4


class Driver:
    """One queue of `size` entries at `base` in `mem`; data buffers are carved from
    `data` upwards."""

    def __init__(self, mem: GuestMemory, base: int, size: int, data: int):
        self.mem, self.size = mem, size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.end = self.used + 6 + 8 * size
        self.next_free = 0                  # descriptors are handed out in order
        self.avail_idx = 0
        self.used_seen = 0
        self.data = self.data_start = data
        mem.write(base, bytes(self.end - base))

    # ---- memory

    def alloc(self, n: int, fill: bytes = b"") -> int:
        gpa = self.data
        self.data += (n + 15) & ~15
        if fill:
            self.mem.write(gpa, fill[:n].ljust(n, b"\0"))
        return gpa

    # ---- descriptors and rings

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int,
                   table: int | None = None) -> None:
        at = (self.desc if table is None else table) + 16 * i
        self.mem.write(at, struct.pack("<QIHH", addr, length, flags, nxt))

    def chain(self, bufs: list[tuple[int, int, bool]]) -> int:
        """Descriptors for [(gpa, length, device-writable)] linked by NEXT; the head."""
        first = self.next_free
        for k, (gpa, length, writable) in enumerate(bufs):
            i = (first + k) % self.size
            last = k == len(bufs) - 1
            self.write_desc(i, gpa, length, (WRITE if writable else 0) | (0 if last else NEXT),
                            0 if last else (i + 1) % self.size)
        self.next_free = (first + len(bufs)) % self.size
        return first

    def indirect_chain(self, bufs: list[tuple[int, int, bool]]) -> int:
        """One descriptor pointing at a table holding the chain."""
        table = self.alloc(16 * len(bufs))
        for k, (gpa, length, writable) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.write_desc(k, gpa, length, (WRITE if writable else 0) | (0 if last else NEXT),
                            0 if last else k + 1, table=table)
        head = self.next_free
        self.write_desc(head, table, 16 * len(bufs), INDIRECT, 0)
        self.next_free = (head + 1) % self.size
        return head

    def publish(self, *heads: int, idx: int | None = None) -> None:
        """Heads into the avail ring, then the index (or `idx`, whatever it is)."""
        for h in heads:
            self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.size),
                           struct.pack("<H", h))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx if idx is None
                                                   else idx & 0xFFFF))

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write(self.avail, struct.pack("<H", flags))

    def set_used_event(self, value: int) -> None:
        self.mem.write(self.avail + 4 + 2 * self.size, struct.pack("<H", value & 0xFFFF))

    def used_flags(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used, 2))[0]

    def avail_event(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 4 + 8 * self.size, 2))[0]

    def take_used(self) -> list[tuple[int, int]]:
        """The (head, written) entries the device returned since the last call; then,
        as Linux re-enables callbacks, interrupts are asked for from the next one on
        (used_event, read by a device that negotiated EVENT_IDX)."""
        idx = struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]
        out = []
        while self.used_seen != idx:
            at = self.used + 4 + 8 * (self.used_seen % self.size)
            out.append(struct.unpack("<II", self.mem.read(at, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        self.set_used_event(self.used_seen)
        return out
