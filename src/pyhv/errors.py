"""The one exception type the CLI turns into a one-line message (no traceback unless --debug)."""


class PyhvError(Exception):
    """A user-facing failure: its message names the cause in one line."""
