"""The services `pyhv run` starts beside a QEMU guest (network, disks, shares), each a
`pyhv ... serve` in a child process: it keeps their event loops and threads apart from
the run's console pump, and each ends with the run."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

from pyhv.errors import PyhvError

START_TIMEOUT = 20.0


class Child:
    """`pyhv ARGS...`, started and ready once it has printed `marker` on stdout."""

    def __init__(self, args: list[str], marker: bytes, what: str):
        self.args, self.marker, self.what = args, marker, what
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "pyhv", *self.args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        out, seen = self.proc.stdout.fileno(), b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([out], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(out, 4096)
            seen += chunk
            if self.marker in seen:
                return
            if not chunk:
                break
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
        self.stop()
        cause = err[-1].removeprefix("pyhv: ") if err else "no output"
        raise PyhvError(f"the {self.what} did not start: {cause}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        proc.stderr.close()


class Children:
    """Context manager: starts every child (stopping those started if one fails), stops
    them all at the end."""

    def __init__(self, children: list[Child]):
        self.children = children

    def __enter__(self) -> Children:
        try:
            for child in self.children:
                child.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for child in self.children:
            child.stop()


def vhost_user_memory(memory: int) -> list[str]:
    """Guest RAM from a shared memfd: what every vhost-user device needs."""
    return ["-object", f"memory-backend-memfd,id=pyhv-mem,size={memory},share=on",
            "-numa", "node,memdev=pyhv-mem"]
