"""Runs a guest under qemu-system-x86_64 with the same options `pyhv run` takes."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyhv.guest.engine import qemu_accel, qemu_binary
from pyhv.guest.status import ConsoleScanner


@dataclass
class QemuRun:
    kernel: Path
    initrd: Path | None
    append: str
    cpus: int = 1
    memory: int = 512 << 20
    extra_args: list[str] = field(default_factory=list)
    interactive: bool = False       # terminal attached: QEMU's own mon:stdio (Ctrl-A x)

    def argv(self) -> list[str]:
        accel = qemu_accel()
        argv = [qemu_binary(), "-M", "q35", "-accel", accel,
                "-cpu", "host" if accel == "kvm" else "max",
                "-m", str(max(self.memory >> 20, 1)), "-smp", str(self.cpus),
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-serial", "mon:stdio" if self.interactive else "stdio",
                "-kernel", str(self.kernel), "-append", self.append]
        if self.initrd is not None:
            argv += ["-initrd", str(self.initrd)]
        return argv + list(self.extra_args)


@dataclass
class QemuResult:
    returncode: int | None          # QEMU's own status (None: killed at the timeout)
    status: int | None              # the guest command's, from its status line
    panic: str | None
    timed_out: bool


def run_qemu(spec: QemuRun, write: Callable[[bytes], None],
             timeout: float | None = None) -> QemuResult:
    """Run to the end, passing the console through `write` (status line withheld)."""
    if spec.interactive:
        proc = subprocess.Popen(spec.argv())
        return QemuResult(proc.wait(), None, None, False)
    scanner = ConsoleScanner(write)
    proc = subprocess.Popen(spec.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    deadline = None if timeout is None else time.monotonic() + timeout
    timed_out = False
    try:
        fd = proc.stdout.fileno()
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                timed_out = True
                proc.send_signal(signal.SIGTERM)
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            scanner.feed(chunk)
        scanner.close()
    finally:
        try:
            returncode = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            returncode = proc.wait()
        proc.stdout.close()
    return QemuResult(None if timed_out else returncode, scanner.status, scanner.panic,
                      timed_out)
