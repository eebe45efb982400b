"""RLIMIT_NOFILE for the share server, as virtiofsd's `--rlimit-nofile` sets it.

Every inode the client holds costs the server an O_PATH descriptor while it sits in the
descriptor cache (a quarter of the limit; the rest of an inode is a file handle, reopened
with one more syscall per revalidation), and every open file one more. Distributions ship
a hard limit of a few thousand to half a million; a 50k-file checkout needs more than the
former. So by default the server asks for `fs.nr_open` (at most NOFILE_DEFAULT_MAX), which
raising the hard limit needs CAP_SYS_RESOURCE for; without it, the soft limit rises to the
hard one."""

from __future__ import annotations

import logging
import resource

NOFILE_DEFAULT_MAX = 1_000_000
NOFILE_MIN = 64       # /dev/fuse clones, io_uring queues, inotify, the runtime need these
log = logging.getLogger(__name__)


def nr_open() -> int:
    """The kernel's ceiling for RLIMIT_NOFILE (fs.nr_open)."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return NOFILE_DEFAULT_MAX


def set_nofile(want: int | None) -> None:
    """Set RLIMIT_NOFILE (soft and hard) to `want` (None: the default above; 0: leave it
    as it is). An explicit `want` the process may not have is reported at warning level;
    the default's shortfall only at debug."""
    if want == 0:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(nr_open(), NOFILE_DEFAULT_MAX) if want is None else want
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
        return
    except (OSError, ValueError) as e:
        level = logging.DEBUG if want is None else logging.WARNING
        log.log(level, "cannot set the open file limit to %d (%s): using %d", target,
                e.strerror if isinstance(e, OSError) else e, hard)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
