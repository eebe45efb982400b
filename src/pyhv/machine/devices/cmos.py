"""Minimal MC146818 CMOS/RTC at ports 0x70/0x71: wall-clock time and the memory sizes.

Linux reads the RTC once at boot for the time of day (kvmclock takes over after), and
some boot paths read the memory-size registers; nothing here raises interrupts.
"""

from __future__ import annotations

import time

REG_SECONDS, REG_MINUTES, REG_HOURS = 0x00, 0x02, 0x04
REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_CENTURY = 0x32
STATUS_B_24H = 0x02


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


class Cmos:
    """Mapped at 0x70 (length 2): offset 0 selects a register (bit 7 is the NMI mask)."""

    def __init__(self, mem_below_4g: int, mem_above_4g: int, clock=time.gmtime):
        self._index = 0
        self._clock = clock
        self._nvram = bytearray(128)
        self._nvram[REG_B] = STATUS_B_24H
        self._nvram[REG_D] = 0x80  # RAM and time valid
        ext = max(0, min(mem_below_4g - (1 << 20), 0xFFFF << 10) >> 10)  # KiB above 1 MiB
        self._nvram[0x15:0x17] = (640).to_bytes(2, "little")
        self._nvram[0x17:0x19] = self._nvram[0x30:0x32] = ext.to_bytes(2, "little")
        above16 = max(0, min((mem_below_4g - (16 << 20)) >> 16, 0xFFFF))
        self._nvram[0x34:0x36] = above16.to_bytes(2, "little")
        self._nvram[0x5B:0x5E] = min(mem_above_4g >> 16, 0xFFFFFF).to_bytes(3, "little")

    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return self._index
        index = self._index
        if index < 0x0A or index == REG_CENTURY:
            t = self._clock()
            return _bcd({REG_SECONDS: t.tm_sec, REG_MINUTES: t.tm_min, REG_HOURS: t.tm_hour,
                         REG_WEEKDAY: (t.tm_wday + 1) % 7 + 1, REG_DAY: t.tm_mday,
                         REG_MONTH: t.tm_mon, REG_YEAR: t.tm_year % 100,
                         REG_CENTURY: t.tm_year // 100}.get(index, 0))
        if index == REG_A:
            return 0x26  # 32.768 kHz base, 1024 Hz rate, update not in progress
        return self._nvram[index]

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self._index = value & 0x7F
        elif self._index not in (REG_A, REG_C, REG_D) and self._index >= 0x0A:
            self._nvram[self._index] = value & 0xFF
