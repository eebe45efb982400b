"""Runs the `pyhv` command as users do, and waits on its console log for expected lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PYHV = [sys.executable, "-m", "pyhv"]


def pyhv(*args: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([*PYHV, *args], **kw)


class ConsoleRun:
    """`pyhv run --engine kvm ... --console-log LOG` (pyhv's own VMM) in the background;
    `wait_for` polls the log."""

    def __init__(self, log: Path, *args: str):
        self.log = log
        self.proc = subprocess.Popen([*PYHV, "run", "--engine", "kvm", "--console-log",
                                      str(log), *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, *needles: str, timeout: float = 180) -> str:
        """Wait until every needle appeared (the guest is slow where KVM emulates kernel code,
        so this waits on output, never on a fixed time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if all(n in text for n in needles):
                return text
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        missing = [n for n in needles if n not in self.text()]
        raise AssertionError(f"console never showed {missing}; pyhv stderr: "
                             f"{self.proc.stderr.read()[-2000:]}\nconsole:\n{self.text()[-4000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode
