"""Share options and the cache policy each `--cache` mode stands for (as virtiofsd documents:
never = no client caching, auto = NFS-like 1 s metadata timeout and close-to-open data,
always = long timeouts and data kept across opens).

auto's close-to-open is NFS's: an open keeps the client's cached pages when the file's
ctime, mtime and size are those of the data the client cached (read at its last open, or
written by the client itself), and drops them otherwise. virtiofsd drops them at every
open; NFS's rule reads an unchanged file (a header a build includes again, a file just
written) from the client's cache, and a host change still shows at the next open (the
kernel's multigrain timestamps, Linux 6.13+, make ctime change on every write that follows
a stat; before them a same-size write in the clock tick of the client's open is NFS's blind
spot, which the watch covers), and while the client keeps the file open, at once through
the host watch (IN_MODIFY -> INVAL_INODE). FUSE_AUTO_INVAL_DATA (the kernel drops a file's
pages when a fresh mtime differs from its own) is not asked for: it drops the pages of
every file the client writes, its own idea of the mtime never being the host's; the watch
does that job instead."""

from __future__ import annotations

from dataclasses import dataclass, field

from hvcore.fs import proto as fp
from pyhv.share.idmap import IdMap

CACHE_MODES = ("never", "auto", "always")


@dataclass(frozen=True)
class CachePolicy:
    entry_timeout: float
    attr_timeout: float
    open_flags: int        # FOPEN_* for files
    dir_open_flags: int    # FOPEN_* for directories
    watch: bool            # host changes are pushed to the client (inotify)
    close_to_open: bool = False  # an open keeps the pages of a file found unchanged

    @classmethod
    def for_mode(cls, mode: str) -> CachePolicy:
        if mode == "never":
            return cls(0.0, 0.0, fp.FOPEN["DIRECT_IO"], 0, False)
        if mode == "auto":
            return cls(1.0, 1.0, 0, 0, True, close_to_open=True)
        if mode == "always":
            return cls(86400.0, 86400.0, fp.FOPEN["KEEP_CACHE"],
                       fp.FOPEN["KEEP_CACHE"] | fp.FOPEN["CACHE_DIR"], True)
        raise ValueError(f"cache mode must be one of {', '.join(CACHE_MODES)}, not {mode!r}")


@dataclass
class ShareOptions:
    root: str
    cache: str = "auto"
    readonly: bool = False
    writeback: bool = False          # FUSE_WRITEBACK_CACHE (the kernel batches writes)
    allow_devices: bool = False      # MKNOD of block/char devices
    idmap: IdMap = field(default_factory=IdMap)
    max_write: int = 1 << 20
    fd_cache: int = 0                # cached inode descriptors (0: a quarter of RLIMIT_NOFILE)
    policy: CachePolicy = field(init=False)

    def __post_init__(self) -> None:
        self.policy = CachePolicy.for_mode(self.cache)
