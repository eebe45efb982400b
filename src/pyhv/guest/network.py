"""The guest's network for `pyhv run`: pyhv's user-mode stack (`pyhv net serve --stream`)
in a child process, attached to QEMU as `-netdev stream` + virtio-net-pci.

A child process keeps the stack's event loop and the run's console pump apart, and it
ends with the run."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyhv.errors import PyhvError

READY = b"pyhv net: ready"
START_TIMEOUT = 20.0


class NetworkService:
    """Context manager: starts the stack, yields the QEMU arguments that attach a NIC."""

    def __init__(self, publish: list[str]):
        self.publish = list(publish)
        self._dir = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> list[str]:
        self._dir = tempfile.TemporaryDirectory(prefix="pyhv-net-")
        sock = Path(self._dir.name) / "net.sock"
        argv = [sys.executable, "-m", "pyhv", "net", "serve", "--stream", str(sock)]
        for spec in self.publish:
            argv += ["-p", spec]
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
        self._wait_ready()
        return ["-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={sock}",
                "-device", "virtio-net-pci,netdev=n0"]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        out = self._proc.stdout.fileno()
        seen = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([out], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                chunk = os.read(out, 4096)
                seen += chunk
                if READY in seen:
                    return
                if not chunk:
                    break
        self._proc.wait(timeout=5) if self._proc.poll() is None else None
        err = self._proc.stderr.read().decode(errors="replace").strip().splitlines()
        self.__exit__()
        cause = err[-1].removeprefix("pyhv: ") if err else "no output"
        raise PyhvError(f"the network service did not start: {cause}")

    def __exit__(self, *exc) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc is not None:
            self._proc.stdout.close()
            self._proc.stderr.close()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
