"""The test harness for real Linux guests: boots the default guest under QEMU (TCG on hosts
whose KVM emulates guest kernel code), with extra QEMU arguments (netdev stream, vhost-user
devices, ...), runs one command and returns its output and exit status.

Other subsystems' tests use it: `run_guest(["ip", "addr"], qemu_args=[...])`."""

from __future__ import annotations

import io
from dataclasses import dataclass

from pyhv.guest.build import default_guest
from pyhv.guest.cmdline import guest_cmdline
from pyhv.guest.qemu import QemuRun, run_qemu


@dataclass
class GuestRun:
    status: int | None          # the command's exit status (None: it never reported one)
    output: str                 # the console, status line withheld
    panic: str | None
    timed_out: bool


def run_guest(command: list[str], qemu_args: list[str] = (), memory: int = 512 << 20,
              cpus: int = 1, append: str = "", timeout: float = 180) -> GuestRun:
    image = default_guest(progress=lambda _msg: None)
    spec = QemuRun(image.kernel, image.initrd, guest_cmdline(command, extra=append), cpus,
                   memory, extra_args=list(qemu_args))
    out = io.BytesIO()
    result = run_qemu(spec, out.write, timeout=timeout)
    return GuestRun(result.status, out.getvalue().decode(errors="replace"), result.panic,
                    result.timed_out)
