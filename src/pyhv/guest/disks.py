"""The guest's disks for `pyhv run --disk`: each image served by `pyhv disk serve` in a
child process and attached to QEMU as `vhost-user-blk-pci` (guest RAM then comes from a
shared memfd, which vhost-user needs), so QEMU never opens the image itself. The guest
sees them as /dev/vda, /dev/vdb, ... in the order given."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pyhv.errors import PyhvError

READY = b"pyhv disk: ready"
START_TIMEOUT = 20.0


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


class DiskService:
    """Context manager: serves each disk, yields the QEMU arguments that attach them."""

    def __init__(self, disks: list[DiskSpec], memory: int):
        self.disks, self.memory = disks, memory
        self._dir = None
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> list[str]:
        if not self.disks:
            return []
        self._dir = tempfile.TemporaryDirectory(prefix="pyhv-disk-")
        args = ["-object", f"memory-backend-memfd,id=pyhv-mem,size={self.memory},share=on",
                "-numa", "node,memdev=pyhv-mem"]
        try:
            for i, disk in enumerate(self.disks):
                sock = Path(self._dir.name) / f"disk{i}.sock"
                argv = [sys.executable, "-m", "pyhv", "disk", "serve", disk.path,
                        "--socket", str(sock), "--ready"]
                argv += ["-f", disk.format] if disk.format else []
                argv += ["--readonly"] if disk.readonly else []
                argv += ["--serial", disk.serial] if disk.serial else []
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
                self._procs.append(proc)
                _wait_ready(proc, disk.path)
                args += ["-chardev", f"socket,id=pyhv-disk{i},path={sock}",
                         "-device", f"vhost-user-blk-pci,chardev=pyhv-disk{i}"]
        except BaseException:
            self.__exit__()
            raise
        return args

    def __exit__(self, *exc) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        self._procs = []
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def _wait_ready(proc: subprocess.Popen, path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    out, seen = proc.stdout.fileno(), b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([out], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(out, 4096)
        seen += chunk
        if READY in seen:
            return
        if not chunk:
            break
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    err = proc.stderr.read().decode(errors="replace").strip().splitlines()
    cause = err[-1].removeprefix("pyhv: ") if err else "no output"
    raise PyhvError(f"the disk service for {path} did not start: {cause}")
