"""`img dd`: qemu-img's dd (if=, of=, bs=, count=, skip=): a new image holding the
input's bytes from skip*bs on, count*bs of them at most (the whole rest by default)."""

from __future__ import annotations

import pyhv.disk
from hvcore.qcow2 import nonzero_runs
from pyhv.disk.cliutil import cvtnum
from pyhv.disk.create import create
from pyhv.disk.errors import DiskError

CHUNK = 1 << 20
_KEYS = ("if", "of", "bs", "count", "skip")


def parse_operands(operands: list[str]) -> dict[str, str]:
    """`key=value` operands, with qemu-img's messages for the bad ones."""
    out: dict[str, str] = {}
    for text in operands:
        key, eq, value = text.partition("=")
        if not eq or key not in _KEYS:
            raise DiskError(f"unrecognized operand {key}")
        out[key] = value
    if "if" not in out or "of" not in out:
        raise DiskError("Must specify both input and output files")
    return out


def _number(ops: dict[str, str], key: str, default: int) -> int:
    if key not in ops:
        return default
    value = cvtnum(ops[key], key)
    if key == "bs" and not 1 <= value <= (1 << 31) - 1:
        raise DiskError("Invalid bs specified. Must be between 1 and 2147483647.")
    return value


def dd(ops: dict[str, str], fmt: str | None, out_fmt: str) -> None:
    """As qemu-img 7.2 computes it: the end is count*bs (or the input's size), the start
    skip*bs, and the output holds what lies between."""
    bs = _number(ops, "bs", 512)
    skip = _number(ops, "skip", 0)
    count = _number(ops, "count", -1)
    with pyhv.disk.open(ops["if"], fmt, readonly=True) as src:
        end = count * bs if 0 <= count <= src.size // bs else src.size
        start = skip * bs
        size = max(0, end - start)
        create(ops["of"], out_fmt, size, {})
        if start > end:     # qemu-img reports it and still exits 0
            from pyhv.disk.cliutil import error
            error(f"{ops['if']}: cannot skip to specified offset")
            return
        with pyhv.disk.open(ops["of"], out_fmt) as dst:
            buf = bytearray(CHUNK)
            for pos in range(0, size, CHUNK):
                view = memoryview(buf)[:min(CHUNK, size - pos)]
                src.read(start + pos, view)
                for a, b in nonzero_runs(view, 512):    # a new image reads zeroes
                    dst.write(pos + a, view[a:b])
            dst.flush()
