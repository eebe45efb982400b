"""Reads a guest's console stream: passes it through, and picks out how the guest ended.

The default guest's init prints "PYHV-EXIT-STATUS: N" after its command; everything from
that line on (the kernel's reboot message) is withheld. A kernel panic is recognised by
its "Kernel panic - not syncing: REASON" line."""

from __future__ import annotations

import re
from collections.abc import Callable

STATUS_PREFIX = b"PYHV-EXIT-STATUS: "
STATUS_RE = re.compile(rb"^PYHV-EXIT-STATUS: (\d+)\r?$")
PANIC_RE = re.compile(rb"Kernel panic - not syncing: ([^\r\n]*)")
MAX_LINE = 64 << 10         # of a partial line, only this much is kept for the panic scan


def _maybe_status(partial: bytes) -> bool:
    """Whether an unfinished line could still become the status line."""
    if len(partial) <= len(STATUS_PREFIX):
        return STATUS_PREFIX.startswith(partial)
    return (partial.startswith(STATUS_PREFIX)
            and re.fullmatch(rb"\d*\r?", partial[len(STATUS_PREFIX):]) is not None)


class ConsoleScanner:
    """Feed it console bytes; `write` receives what the user should see.

    An unfinished line is passed on at once (a shell's prompt has no newline), unless it
    could still become the status line; it is kept for the panic scan until it ends."""

    def __init__(self, write: Callable[[bytes], None]):
        self._write = write
        self._partial = b""     # the current line so far
        self._sent = 0          # how much of it was already written
        self.status: int | None = None
        self.panic: str | None = None

    def feed(self, data: bytes) -> None:
        if self.status is not None:
            return
        data = self._partial + data
        out, start = [], 0
        while (end := data.find(b"\n", start)) >= 0:
            line = data[start:end]          # whole lines, not bytes: one regex match each
            m = STATUS_RE.match(line) if self._sent == 0 else None
            if m:
                self.status = int(m.group(1))
                self._partial = b""
                break
            p = PANIC_RE.search(line)
            if p and self.panic is None:
                self.panic = p.group(1).decode(errors="replace").strip()
            out.append(data[start + self._sent:end + 1])
            self._sent, start = 0, end + 1
        else:
            rest = data[start:]
            if not _maybe_status(rest):
                out.append(rest[self._sent:])
                self._sent = len(rest)
            if len(rest) > MAX_LINE and self._sent == len(rest):
                rest = rest[-MAX_LINE:]
                self._sent = len(rest)
            self._partial = rest
        if any(out):
            self._write(b"".join(out))

    def close(self) -> None:
        """Flush a last partial line (the guest ended without a newline)."""
        if self._partial[self._sent:] and self.status is None:
            self._write(self._partial[self._sent:])
        self._partial, self._sent = b"", 0
