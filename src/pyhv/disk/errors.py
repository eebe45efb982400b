"""Disk errors: one line naming the cause, printed by the CLI as `pyhv: <message>`."""

from pyhv.errors import PyhvError


class DiskError(PyhvError):
    """A disk image cannot be opened, read or changed as asked."""
