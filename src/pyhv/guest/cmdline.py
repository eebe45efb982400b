"""The kernel command line of the default guest, and the command it runs."""

from __future__ import annotations

import base64
import shlex

GUEST_APPEND = "console=ttyS0 quiet reboot=k panic=-1 i8042.noaux"


def encode_command(argv: list[str]) -> str:
    """`pyhv.cmd=...`: argv shell-quoted, then base64, so spaces, quotes and non-ASCII
    survive the kernel's own parsing; the guest's init decodes and evals it."""
    quoted = shlex.join(argv).encode("utf-8", errors="surrogateescape")
    return "pyhv.cmd=" + base64.b64encode(quoted).decode()


def guest_cmdline(command: list[str] | None, extra: str = "", shares: list[str] = ()) -> str:
    parts = [GUEST_APPEND, *(f"pyhv.share={s}" for s in shares)]
    if extra:
        parts.append(extra)
    if command:
        parts.append(encode_command(command))
    return " ".join(parts)
