"""`pyhv ARGS` on a pseudo-terminal, driven as a user at a terminal would: wait for the
guest shell's prompt, type a command, wait for its output, then quit with Ctrl-A x.

    python -m tests.helpers.ptyrun [pyhv args...]

Prints what the terminal showed and "PTYRUN-STATUS: N" (pyhv's exit status), or exits 99
naming the text that never appeared. A script, so the test bed can run it inside L1.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import time

PROMPT = b"# "                       # busybox ash's prompt for root
COMMAND = b"echo PTY-$((40+2))\r"    # the echo shows the expression; only the shell says 42
ANSWER = b"PTY-42"
QUIT = b"\x01x"


def _wait_for(fd: int, seen: bytearray, needle: bytes, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:              # EIO: the child closed the terminal
                return needle in seen
            if not chunk:
                return needle in seen
            seen += chunk
    return True


def _status(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    return None


def main(args: list[str]) -> int:
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "pyhv", *args])
    seen, status = bytearray(), None
    try:
        for needle, then, timeout in ((PROMPT, COMMAND, 180), (ANSWER + b"\r\n", QUIT, 60)):
            if not _wait_for(fd, seen, needle, timeout):
                sys.stdout.write(seen.decode(errors="replace"))
                print(f"\nPTYRUN: never saw {needle!r}")
                return 99
            time.sleep(0.2)          # let the guest's shell settle before typing
            os.write(fd, then)
        status = _status(pid, 30)
        _wait_for(fd, seen, b"\0", 0.5)  # drain what is left
        sys.stdout.write(seen.decode(errors="replace"))
        print(f"\nPTYRUN-STATUS: {status}")
        return 0 if status is not None else 98
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
