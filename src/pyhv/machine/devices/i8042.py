"""i8042 keyboard controller: only what a guest needs to find it and to reset the machine.

Linux with `reboot=k` writes the pulse-reset command 0xFE to the command port; that ends
the VM as a reset, which pyhv reports as a clean exit (Firecracker does the same).
"""

from __future__ import annotations

from collections.abc import Callable

DATA_PORT = 0x60
COMMAND_PORT = 0x64

CMD_READ_CONFIG = 0x20
CMD_WRITE_CONFIG = 0x60
CMD_SELF_TEST = 0xAA
CMD_PULSE_RESET = 0xFE
STATUS_OUTPUT_FULL = 0x01
SYSTEM_FLAG = 0x04
STATUS_UNLOCKED = 0x10   # keyboard not inhibited (clear: Linux warns "Keylock active")


class I8042:
    """Mapped at 0x60 (length 5) so offset 0 is data and offset 4 is command/status."""

    def __init__(self, on_reset: Callable[[], None]):
        self._on_reset = on_reset
        self._config = 0x00
        self._output: list[int] = []
        self._pending_cmd: int | None = None

    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return self._output.pop(0) if self._output else 0
        if offset == 4:
            return SYSTEM_FLAG | STATUS_UNLOCKED | (STATUS_OUTPUT_FULL if self._output else 0)
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 4:
            if value == CMD_PULSE_RESET:
                self._on_reset()
            elif value == CMD_READ_CONFIG:
                self._output.append(self._config)
            elif value == CMD_SELF_TEST:
                self._output.append(0x55)
            elif value == CMD_WRITE_CONFIG:
                self._pending_cmd = value
        elif offset == 0 and self._pending_cmd == CMD_WRITE_CONFIG:
            self._config = value
            self._pending_cmd = None
