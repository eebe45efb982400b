"""Reads a guest's console stream: passes it through, and picks out how the guest ended.

The default guest's init prints "PYHV-EXIT-STATUS: N" after its command; everything from
that line on (the kernel's reboot message) is withheld. A kernel panic is recognised by
its "Kernel panic - not syncing: REASON" line."""

from __future__ import annotations

import re
from collections.abc import Callable

STATUS_RE = re.compile(rb"^PYHV-EXIT-STATUS: (\d+)\r?$")
PANIC_RE = re.compile(rb"Kernel panic - not syncing: ([^\r\n]*)")
MAX_LINE = 64 << 10         # a partial line longer than this is passed through unscanned


class ConsoleScanner:
    """Feed it console bytes; `write` receives what the user should see."""

    def __init__(self, write: Callable[[bytes], None]):
        self._write = write
        self._partial = b""
        self.status: int | None = None
        self.panic: str | None = None

    def feed(self, data: bytes) -> None:
        if self.status is not None:
            return
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        out = []
        for line in lines:      # whole lines, not bytes: one regex match each
            m = STATUS_RE.match(line)
            if m:
                self.status = int(m.group(1))
                break
            p = PANIC_RE.search(line)
            if p and self.panic is None:
                self.panic = p.group(1).decode(errors="replace").strip()
            out.append(line + b"\n")
        if out:
            self._write(b"".join(out))

    def close(self) -> None:
        """Flush a last partial line (the guest ended without a newline)."""
        if self._partial and self.status is None:
            self._write(self._partial)
        self._partial = b""
