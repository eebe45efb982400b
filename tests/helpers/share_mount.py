"""Runs `pyhv share serve` in the background the way users do, and always unmounts.

`ShareMount(hostdir, mountpoint, *args, nofile=N, debug=True)` starts the server (with
RLIMIT_NOFILE lowered to N, soft and hard, when given; logging at debug level into `log`,
which `stop()` fills), waits until it reports ready, and on exit
unmounts lazily (so a failing test never leaves a stuck mount), stops the server, and kills
it if it does not stop.
"""

from __future__ import annotations

import ctypes
import os
import resource
import subprocess
import sys
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "mounting FUSE in tests needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


def is_mounted(path: Path, pid: int | str = "self") -> bool:
    """Whether `path` is a mount point in the mount namespace of process `pid`."""
    with open(f"/proc/{pid}/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


class ShareMount:
    def __init__(self, hostdir: Path, mountpoint: Path, *args: str, nofile: int | None = None,
                 debug: bool = False):
        self.hostdir, self.mountpoint, self.args = Path(hostdir), Path(mountpoint), args
        self.nofile, self.debug = nofile, debug
        self.proc: subprocess.Popen | None = None
        self.log = b""

    def __enter__(self) -> ShareMount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        r, w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyhv", *(["--debug"] if self.debug else []), "share", "serve",
             str(self.hostdir), "--mount", str(self.mountpoint), "--ready-fd", str(w), *self.args],
            pass_fds=(w,), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=self._limits if self.nofile else None)
        os.close(w)
        with os.fdopen(r, "rb") as ready:
            line = ready.readline()
        if line != b"ready\n":
            self.proc.wait(30)
            err = self.proc.stderr.read().decode(errors="replace")
            raise RuntimeError(f"pyhv share serve did not start: {err}")
        return self

    def _limits(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def open_fds(self) -> int:
        """How many descriptors the server process has open now."""
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if is_mounted(self.mountpoint):
            _libc.umount2(str(self.mountpoint).encode(), MNT_DETACH)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log = self.proc.stderr.read()
        self.proc.stderr.close()
        code, self.proc = self.proc.returncode, None
        return code
