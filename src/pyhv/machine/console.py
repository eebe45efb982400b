"""The interactive serial console: the terminal in raw mode feeding the UART, with QEMU's
escape: Ctrl-A x quits, Ctrl-A Ctrl-A (or Ctrl-A a) sends a literal Ctrl-A, Ctrl-A h helps."""

from __future__ import annotations

import os
import select
import termios
import threading
import time
import tty
from collections.abc import Callable

ESCAPE = 0x01
HELP = b"\r\nC-a h    print this help\r\nC-a x    exit pyhv\r\nC-a C-a  send C-a\r\n"


class Console:
    """Reads `fd` (a terminal, put in raw mode; or a pipe) and feeds the guest's UART."""

    def __init__(self, uart, on_quit: Callable[[], None], fd: int = 0, out_fd: int = 1):
        self.uart = uart
        self.on_quit = on_quit
        self.fd = fd
        self.out_fd = out_fd
        self._saved = None
        self._escape = False
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._main, name="console", daemon=True)

    def __enter__(self) -> Console:
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=2)
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _main(self) -> None:
        while True:
            ready, _, _ = select.select([self.fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                return
            if not data:
                return          # end of input: the guest keeps running without a keyboard
            if self._handle(data):
                return

    def _handle(self, data: bytes) -> bool:
        """Split input at escapes; returns True when the user asked to quit."""
        while data:
            if self._escape:
                self._escape = False
                command, data = data[0], data[1:]
                if command in b"xX":
                    self.on_quit()
                    return True
                if command in b"\x01a":
                    self._send(b"\x01")
                elif command == ord("h"):
                    os.write(self.out_fd, HELP)
                continue
            at = data.find(ESCAPE)
            if at < 0:
                self._send(data)
                return False
            self._send(data[:at])
            self._escape = True
            data = data[at + 1:]
        return False

    def _send(self, data: bytes) -> None:
        while data:
            taken = self.uart.feed(data)
            data = data[taken:]
            if data:
                time.sleep(0.01)   # the guest has not drained its FIFO yet
