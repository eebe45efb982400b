"""Boot-timer port, like Firecracker's: the guest writes a magic byte when it is up, and
pyhv records the time since the machine started (for boot-time measurements).

Guests signal it from init with e.g. `printf '\\173' | dd of=/dev/port bs=1 seek=1008`.
"""

from __future__ import annotations

import time

PORT = 0x3F0
MAGIC = 123


class BootTimer:
    def __init__(self, start: float | None = None):
        self.start = time.monotonic() if start is None else start
        self.marks: list[float] = []   # seconds since start, one per magic write

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if value & 0xFF == MAGIC:
            self.marks.append(time.monotonic() - self.start)
