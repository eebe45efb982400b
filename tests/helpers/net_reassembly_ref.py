"""Pure-Python twin of `hvcore.net.packet.Reassembly`, the reference the tests hold it to.

Same contract: bytes at unwrapped sequence numbers, clipped to [base, base + capacity),
at most 64 disjoint held intervals (a segment that would need a 65th is dropped: -1).
Slow on purpose: one dict entry per byte, so its correctness is easy to see.
"""

from __future__ import annotations

MAX_INTERVALS = 64


class ReassemblyRef:
    def __init__(self, capacity: int, base: int = 0):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.base = base
        self.held: dict[int, int] = {}

    @property
    def intervals(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for seq in sorted(self.held):
            if out and out[-1][1] == seq:
                out[-1] = (out[-1][0], seq + 1)
            else:
                out.append((seq, seq + 1))
        return out

    @property
    def pending(self) -> int:
        return len(self.held)

    def set_base(self, base: int) -> None:
        if self.held:
            raise ValueError("cannot move the base while data is held")
        self.base = base

    def _ready(self) -> int:
        n = 0
        while self.base + n in self.held:
            n += 1
        return n

    def add(self, seq: int, data: bytes) -> int:
        start, end = max(seq, self.base), min(seq + len(data), self.base + self.capacity)
        if end <= start:
            return self._ready()
        spans = self.intervals
        touching = [s for s in spans if s[1] >= start and s[0] <= end]
        if not touching and len(spans) == MAX_INTERVALS:
            return -1
        for pos in range(start, end):
            self.held[pos] = data[pos - seq]
        return self._ready()

    def take(self) -> bytes:
        n = self._ready()
        out = bytes(self.held.pop(self.base + i) for i in range(n))
        self.base += n
        return out
