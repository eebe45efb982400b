"""qemu-img's conventions shared by the `img` subcommands: sizes, human sizes, progress."""

from __future__ import annotations

import os
import sys

from pyhv.disk.errors import DiskError

_SUFFIX = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
           "p": 1 << 50, "e": 1 << 60}
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_NOT_A_NAME = ("", "-c", "-m", "__main__.py", "pyhv")


def program() -> str:
    """The name messages start with: argv[0]'s basename, as QEMU's error_init(argv[0])
    takes it (a `qemu-img` wrapper or `pyhv-img`), or `pyhv` when run as pyhv or by Python."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if name in _NOT_A_NAME or name.startswith(("python", "pytest", "py.test")):
        return "pyhv"
    return name


def error(message: str, end: str = "\n") -> None:
    """qemu's error_report, then the hint lines (error_append_hint) as they are."""
    print(f"{program()}: {message}", end=end, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """qemu's warn_report."""
    print(f"{program()}: warning: {message}", file=sys.stderr, flush=True)


def strtosz(text: str) -> int:
    """qemu_strtosz: a decimal number (a fraction only with a suffix) or a 0x hex integer,
    then an optional B/k/M/G/T/P/E suffix. ValueError when malformed, OverflowError when
    it does not fit 64 bits."""
    t = text.lstrip(" \t\n\v\f\r")
    t = t[1:] if t[:1] == "+" else t
    hexa = t[:2].lower() == "0x"
    digits = "0123456789abcdef" if hexa else "0123456789"
    i = 2 if hexa else 0
    while i < len(t) and t[i].lower() in digits:
        i += 1
    whole, frac = t[2 if hexa else 0:i], ""
    if not hexa and t[i:i + 1] == ".":
        j = i + 1
        while j < len(t) and t[j].isdigit():
            j += 1
        frac, i = t[i:j], j
    if not whole:
        raise ValueError(text)
    mul = _SUFFIX.get(t[i:i + 1].lower(), 0)
    if mul:
        i += 1
        if hexa:
            warn(f"Using a multiplier suffix on hex numbers is deprecated: {text}")
    elif frac.strip(".") and int(frac[1:] or 0):
        raise ValueError(text)          # qemu: a fraction needs a unit
    if i != len(t) or (hexa and frac):
        raise ValueError(text)
    value = int(whole, 16 if hexa else 10) if whole else 0
    size = value * (mul or 1) + int(float("0" + frac) * (mul or 1))
    if size >= 1 << 64:
        raise OverflowError(text)
    return size


def cvtnum(text: str, what: str = "image size") -> int:
    """qemu-img's cvtnum: a size argument between 0 and INT64_MAX, or qemu-img's error."""
    try:
        size = strtosz(text)
    except ValueError:
        raise DiskError(f"Invalid {what} specified. You may use k, M, G, T, P or E suffixes "
                        f"for\n{program()}: kilobytes, megabytes, gigabytes, terabytes, "
                        "petabytes and exabytes.") from None    # two error_report lines
    except OverflowError:
        size = 1 << 63
    if size > (1 << 63) - 1:
        raise DiskError(f"Invalid {what} specified. Must be between 0 and "
                        f"{(1 << 63) - 1}.")
    return size


def parse_size(text: str) -> int:
    """'1G', '64k', '512', '1.5M', '0x10000' as qemu-img reads sizes (bare numbers are
    bytes)."""
    return cvtnum(text)


def human(size: int) -> str:
    """qemu's size_to_str: three significant digits and a binary unit."""
    i = max(0, (size.bit_length() - 1) // 10) if size else 0
    i = min(i, len(_UNITS) - 1)
    return f"{size / (1 << (10 * i)):.3g} {_UNITS[i]}"


class Progress:
    """qemu-img's `-p` line: '    (42.00/100%)\r' on stdout, printed as qemu_progress_print
    does (at 0 and 100, and on moves of more than 1%), with a last 100% at the end."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.last = enabled, max(total, 1), 0.0
        self.update(0)

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        pct = min(100.0, done * 100.0 / self.total)
        if abs(pct - self.last) > 1.0 or pct in (0.0, 100.0):
            self.last = pct
            sys.stdout.write(f"    ({pct:.2f}/100%)\r")
            sys.stdout.flush()

    def done(self) -> None:
        if self.enabled:
            self.update(self.total)
            sys.stdout.write("\n")
