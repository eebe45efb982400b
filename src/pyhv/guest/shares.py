"""The guest's host folders for `pyhv run -v HOSTDIR:GUESTPATH[:ro]` (docker's syntax):
each served by `pyhv share serve --socket` in a child process (`children.Child`) and
attached to QEMU as `vhost-user-fs-pci` with the tag `pyhvN`; the default guest mounts
tag N at GUESTPATH (`pyhv.share=`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pyhv.errors import PyhvError
from pyhv.guest.children import Child


@dataclass(frozen=True)
class VolumeSpec:
    hostdir: str
    guestpath: str
    readonly: bool = False


def parse_volume(text: str) -> VolumeSpec:
    """HOSTDIR:GUESTPATH[:ro|:rw]"""
    parts = text.split(":")
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        mode = parts.pop()
    elif len(parts) == 2:
        mode = "rw"
    else:
        raise PyhvError(f"-v {text!r}: expected HOSTDIR:GUESTPATH[:ro]")
    hostdir, guestpath = parts
    if not guestpath.startswith("/") or any(c.isspace() for c in guestpath):
        raise PyhvError(f"-v {text!r}: the guest path must be absolute, without spaces")
    if not os.path.isdir(hostdir):
        raise PyhvError(f"-v {text!r}: {hostdir} is not a directory")
    return VolumeSpec(os.path.abspath(hostdir), guestpath, mode == "ro")


def mount_args(volumes: list[VolumeSpec]) -> str:
    """What the default guest's command line needs to mount them."""
    return " ".join(f"pyhv.share=pyhv{i}:{v.guestpath}" for i, v in enumerate(volumes))


def share_devices(volumes: list[VolumeSpec], sockets: Path) -> list[tuple[Child, list[str]]]:
    """(the service, the QEMU arguments that attach it) for each folder, in order."""
    out = []
    for i, vol in enumerate(volumes):
        sock = sockets / f"share{i}.sock"
        serve = ["share", "serve", vol.hostdir, "--socket", str(sock), "--tag", f"pyhv{i}"]
        serve += ["--readonly"] if vol.readonly else []
        out.append((Child(serve, b"pyhv share: ready", f"share of {vol.hostdir}"),
                    ["-chardev", f"socket,id=pyhv-share{i},path={sock}",
                     "-device", f"vhost-user-fs-pci,chardev=pyhv-share{i},tag=pyhv{i}"]))
    return out
