"""The hardware-reduced ACPI registers our FADT names: sleep control (S5 = power off),
sleep status, and the reset register. This is how `poweroff` and ACPI reboot end the VM."""

from __future__ import annotations

from collections.abc import Callable

from pyhv.machine.acpi import (
    RESET_PORT,
    RESET_VALUE,
    SLEEP_CONTROL_PORT,
    SLEEP_TYPE_S5,
    decode_sleep_control,
)

BASE_PORT = SLEEP_CONTROL_PORT
PORTS = RESET_PORT - SLEEP_CONTROL_PORT + 1


class AcpiPower:
    """Mapped at SLEEP_CONTROL_PORT (length 3)."""

    def __init__(self, on_poweroff: Callable[[], None], on_reset: Callable[[], None]):
        self._on_poweroff = on_poweroff
        self._on_reset = on_reset

    def read(self, offset: int, size: int) -> int:
        return 0        # sleep status: never "woken"; the other registers are write-only

    def write(self, offset: int, size: int, value: int) -> None:
        port = BASE_PORT + offset
        if port == SLEEP_CONTROL_PORT and decode_sleep_control(value & 0xFF) == SLEEP_TYPE_S5:
            self._on_poweroff()
        elif port == RESET_PORT and value & 0xFF == RESET_VALUE:
            self._on_reset()
