"""Disk errors: one line naming the cause, printed by the CLI as `<program>: <message>`;
further lines are qemu's hints, printed as they are."""

from pyhv.errors import PyhvError


class DiskError(PyhvError):
    """A disk image cannot be opened, read or changed as asked. `end` follows the message
    (qemu prints some hints without a final newline)."""

    def __init__(self, message: str = "", end: str = "\n"):
        super().__init__(message)
        self.end = end


class UsageError(DiskError):
    """A malformed command line: qemu-img adds "Try 'qemu-img --help'" and exits 1."""
