"""uid/gid translation between the client (guest) and the host.

With `--uid-map GUEST:HOST:COUNT` (repeatable) guest ids in a range map to host ids; host ids
outside every range show as the overflow id 65534 (as in a user namespace) and setting an
unmapped guest id fails with EINVAL. With no map: a root server uses identity; a non-root
server shows files owned by its own user as owned by the caller (as osxfs did), and everything
else as 65534, and creates files as itself (it cannot do otherwise).
"""

from __future__ import annotations

import errno
import os

from pyhv.errors import PyhvError

OVERFLOW = 65534
UNCHANGED = 0xFFFFFFFF


def parse_ranges(specs: list[str] | None, what: str) -> list[tuple[int, int, int]]:
    ranges = []
    for spec in specs or ():
        parts = spec.split(":")
        try:
            guest, host, count = (int(p) for p in parts)
        except ValueError:
            raise PyhvError(f"--{what}-map wants GUEST:HOST:COUNT, got {spec!r}") from None
        if min(guest, host) < 0 or count < 1 or max(guest, host) + count > 1 << 32:
            raise PyhvError(f"--{what}-map {spec!r}: ids must be >= 0 and COUNT >= 1")
        for g, _h, c in ranges:
            if guest < g + c and g < guest + count:
                raise PyhvError(f"--{what}-map {spec!r} overlaps another guest range")
        ranges.append((guest, host, count))
    return ranges


class _Axis:
    """One of uid / gid."""

    def __init__(self, ranges: list[tuple[int, int, int]], own: int, root: bool):
        self.ranges = ranges
        self.own = own
        self.identity = not ranges and root
        self.caller = not ranges and not root   # the osxfs-style default for a normal user

    def to_guest(self, host: int, caller: int) -> int:
        if self.identity:
            return host
        if self.caller:
            return caller if host == self.own else OVERFLOW
        for g, h, c in self.ranges:
            if h <= host < h + c:
                return g + host - h
        return OVERFLOW

    def to_host(self, guest: int) -> int:
        """Guest id for a chown or a new file; raises EINVAL when it has no host id."""
        if guest == UNCHANGED or self.identity:
            return guest
        if self.caller:
            return self.own
        for g, h, c in self.ranges:
            if g <= guest < g + c:
                return h + guest - g
        raise OSError(errno.EINVAL, f"id {guest} is not mapped to the host")


class IdMap:
    def __init__(self, uid_map: list[str] | None = None, gid_map: list[str] | None = None):
        root = os.geteuid() == 0
        self.uid = _Axis(parse_ranges(uid_map, "uid"), os.geteuid(), root)
        self.gid = _Axis(parse_ranges(gid_map, "gid"), os.getegid(), root)
        self.identity = self.uid.identity and self.gid.identity
