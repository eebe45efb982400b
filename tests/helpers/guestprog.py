"""Builds tiny guest programs with the system toolchain into flat binaries.

Tests write their guests as assembly (or freestanding C) next to the assertions, and this
turns the text into the bytes `Machine.load_flat` takes. Results are cached by content.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("PYHV_TEST_CACHE", Path(tempfile.gettempdir()) / "pyhv-guestprog"))


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{cmd[0]} failed building a guest program:\n{done.stderr}")


def _build(source: str, suffix: str, address: int, compile_args: list[str]) -> bytes:
    key = hashlib.sha256(f"{suffix}|{address}|{compile_args}|{source}".encode()).hexdigest()[:24]
    out = CACHE / f"{key}.bin"
    if out.exists():
        return out.read_bytes()
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / f"guest{suffix}"
        src.write_text(source)
        obj = Path(d) / "guest.o"
        elf = Path(d) / "guest.elf"
        emulation = "elf_i386" if "-m32" in compile_args else "elf_x86_64"
        _run(["gcc", "-c", *compile_args, "-o", str(obj), str(src)])
        _run(["ld", "-m", emulation, "-static", "-nostdlib", "-e", "_start",
              f"-Ttext={address:#x}", "-o", str(elf), str(obj)])
        _run(["objcopy", "-O", "binary", "-j", ".text", "-j", ".rodata", "-j", ".data",
              str(elf), str(out) + ".tmp"])
    os.replace(str(out) + ".tmp", out)
    return out.read_bytes()


def asm16(body: str, address: int = 0x1000) -> bytes:
    """Real-mode assembly (Intel syntax); execution starts at the first instruction."""
    src = f".intel_syntax noprefix\n.code16\n.text\n.globl _start\n_start:\n{body}\n"
    return _build(src, ".S", address, ["-m32"])


def asm64(body: str, address: int = 0x100000) -> bytes:
    """Long-mode assembly (Intel syntax)."""
    src = f".intel_syntax noprefix\n.code64\n.text\n.globl _start\n_start:\n{body}\n"
    return _build(src, ".S", address, [])


def c64(source: str, address: int = 0x100000) -> bytes:
    """Freestanding C for long mode; `_start` must be the first function in the file."""
    return _build(source, ".c", address,
                  ["-ffreestanding", "-fno-pic", "-fno-stack-protector", "-mno-red-zone",
                   "-mgeneral-regs-only", "-nostdlib", "-O2", "-fno-asynchronous-unwind-tables",
                   "-mcmodel=kernel" if address >= 0xFFFFFFFF80000000 else "-mcmodel=small"])
