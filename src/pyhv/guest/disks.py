"""The guest's disks for `pyhv run --disk`: each image served by `pyhv disk serve` in a
child process (`children.Child`) and attached to QEMU as `vhost-user-blk-pci`, so QEMU
never opens the image itself. The guest
sees them as /dev/vda, /dev/vdb, ... in the order given."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pyhv.errors import PyhvError
from pyhv.guest.children import Child


@dataclass(frozen=True)
class DiskSpec:
    path: str
    format: str | None = None
    readonly: bool = False
    serial: str = ""


def parse_disk(text: str) -> DiskSpec:
    """FILE[,format=qcow2|raw][,readonly=on|off][,serial=S], as QEMU's -drive spells them."""
    path, *options = text.split(",")
    if not path:
        raise PyhvError(f"--disk {text!r}: no file name")
    fields: dict[str, str] = {}
    for item in options:
        name, eq, value = item.partition("=")
        if not eq or name not in ("format", "readonly", "serial"):
            raise PyhvError(f"--disk {text!r}: unknown option {item!r} "
                            "(format=, readonly=, serial=)")
        fields[name] = value
    fmt = fields.get("format")
    if fmt not in (None, "qcow2", "raw"):
        raise PyhvError(f"--disk {text!r}: format must be qcow2 or raw")
    ro = fields.get("readonly", "off")
    if ro not in ("on", "off"):
        raise PyhvError(f"--disk {text!r}: readonly must be on or off")
    if len(fields.get("serial", "").encode()) > 20:
        raise PyhvError(f"--disk {text!r}: a serial has at most 20 bytes")
    if not os.access(path, os.R_OK if ro == "on" else os.R_OK | os.W_OK):
        why = "no such file" if not os.path.exists(path) else "permission denied"
        raise PyhvError(f"--disk {path}: {why}")
    return DiskSpec(path, fmt, ro == "on", fields.get("serial", ""))


def disk_devices(disks: list[DiskSpec], sockets: Path) -> list[tuple[Child, list[str]]]:
    """(the service, the QEMU arguments that attach it) for each disk, in order."""
    out = []
    for i, disk in enumerate(disks):
        sock = sockets / f"disk{i}.sock"
        serve = ["disk", "serve", disk.path, "--socket", str(sock), "--ready"]
        serve += ["-f", disk.format] if disk.format else []
        serve += ["--readonly"] if disk.readonly else []
        serve += ["--serial", disk.serial] if disk.serial else []
        out.append((Child(serve, b"pyhv disk: ready", f"disk service for {disk.path}"),
                    ["-chardev", f"socket,id=pyhv-disk{i},path={sock}",
                     "-device", f"vhost-user-blk-pci,chardev=pyhv-disk{i}"]))
    return out
