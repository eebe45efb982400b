"""The real peer for disk tests: qemu-img / qemu-io, plus a raw model of guest contents."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True,
                          check=check, timeout=300)


def qemu_io(image: Path, *commands: str, fmt: str = "qcow2") -> None:
    cmd = ["qemu-io", "-f", fmt]
    for c in commands:
        cmd += ["-c", c]
    done = subprocess.run([*cmd, str(image)], capture_output=True, text=True, timeout=300)
    if done.returncode or "error" in done.stdout.lower() or "failed" in done.stdout.lower():
        raise AssertionError(f"qemu-io failed: {done.stdout} {done.stderr}")


def check(image: Path) -> tuple[int, dict]:
    done = qemu_img("check", "--output", "json", image, check=False)
    return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else {})


def compare(image: Path, raw: Path) -> subprocess.CompletedProcess:
    return qemu_img("compare", "-F", "raw", image, raw, check=False)


class Model:
    """What the guest should see: a bytearray changed by the same operations as the image."""

    def __init__(self, size: int):
        self.data = bytearray(size)

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        self.data[offset:offset + length] = bytes(length)

    def save(self, path: Path) -> Path:
        path.write_bytes(self.data)
        return path


def random_ops(rng: random.Random, size: int, count: int, unit: int):
    """(kind, offset, length, pattern) with kinds write / zero, aligned and not."""
    ops = []
    for _ in range(count):
        kind = rng.choice(["write", "write", "write", "zero"])
        if rng.random() < 0.5:
            off = rng.randrange(0, size // unit) * unit
            length = min(size - off, unit * rng.randint(1, 4))
        else:
            off = rng.randrange(0, size - 1)
            length = min(size - off, rng.randint(1, 3 * unit))
        ops.append((kind, off, length, rng.randrange(1, 256)))
    return ops


def qemu_io_commands(ops) -> list[str]:
    out = []
    for kind, off, length, pattern in ops:
        if kind == "write":
            out.append(f"write -P {pattern} {off} {length}")
        else:
            out.append(f"write -z {off} {length}")
    return out


def apply(model: Model, ops) -> None:
    for kind, off, length, pattern in ops:
        if kind == "write":
            model.write(off, bytes([pattern]) * length)
        else:
            model.zero(off, length)
