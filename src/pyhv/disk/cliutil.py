"""qemu-img's conventions shared by the `img` subcommands: sizes, human sizes, progress."""

from __future__ import annotations

import sys

from pyhv.disk.errors import DiskError

_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
           "p": 1 << 50, "e": 1 << 60}
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def parse_size(text: str) -> int:
    """'1G', '64k', '512', '1.5M' as qemu-img reads them (bare numbers are bytes)."""
    t = text.strip().lower()
    if t.endswith("ib"):
        t = t[:-2]
    unit = t[-1:] if t[-1:] in _SUFFIX and not t[-1:].isdigit() else ""
    number = t[:len(t) - len(unit)]
    try:
        value = float(number) if "." in number else int(number)
    except ValueError:
        raise DiskError(f"Invalid image size specified: '{text}'") from None
    size = int(value * _SUFFIX[unit])
    if size < 0 or size > (1 << 63) - 1:
        raise DiskError(f"Invalid image size specified: '{text}'")
    return size


def human(size: int) -> str:
    """qemu's size_to_str: three significant digits and a binary unit."""
    i = max(0, (size.bit_length() - 1) // 10) if size else 0
    i = min(i, len(_UNITS) - 1)
    return f"{size / (1 << (10 * i)):.3g} {_UNITS[i]}"


class Progress:
    """qemu-img's `-p` line: '    (42.00/100%)', rewritten in place on stderr-less stdout."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.last = enabled, max(total, 1), -1.0
        self.update(0)

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        pct = min(100.0, done * 100.0 / self.total)
        if pct - self.last >= 1.0 or pct == 100.0 and self.last != 100.0:
            self.last = pct
            sys.stdout.write(f"    ({pct:.2f}/100%)\r")
            sys.stdout.flush()

    def done(self) -> None:
        if self.enabled:
            self.update(self.total)
            sys.stdout.write("\n")
