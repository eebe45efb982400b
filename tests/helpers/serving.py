"""A server for a test or bench: started, used once its Unix socket exists, stopped."""

from __future__ import annotations

import subprocess
import time
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def listening(argv: list[str], sock: Path, timeout: float = 20):
    """Run `argv`; yield the process once `sock` exists (its stderr in the failure when
    it ends first or never listens); SIGTERM and wait at the end."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + timeout
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not sock.exists():
            proc.kill()
            raise RuntimeError(f"{argv[0]} did not listen on {sock}: {proc.stderr.read()}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
