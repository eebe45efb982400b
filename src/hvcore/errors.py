"""Exceptions raised by the Cython core; messages are one line and name the cause."""


class HvError(OSError):
    """A hypervisor call failed (errno kept when there is one)."""

    def __init__(self, message: str, errno: int = 0):
        super().__init__(errno, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class KvmUnavailable(HvError):
    """/dev/kvm is missing, not accessible, too old, or lacks a capability pyhv needs."""
