"""Servers the benches start: wait for their socket, and read their CPU time."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def listening(argv: list[str], sock: Path) -> subprocess.Popen:
    """`argv` started, once its Unix socket `sock` exists."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(200):
        if sock.exists():
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{argv[0]} did not listen: {proc.stderr.read()}")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
