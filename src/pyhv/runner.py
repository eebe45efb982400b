"""`pyhv run`: pick the kernel (given, or the default guest), the engine, the command line;
run; and turn how the guest ended into pyhv's exit status.

Exit status: the guest command's own status when the default guest ran one; 0 when a
guest resets or powers off (or the user quits); 124 when --timeout cut the run short;
125 when the guest ended without reporting a status (kernel panic, VMM error, or the
default guest resetting before its init printed the status line).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pyhv.errors import PyhvError
from pyhv.guest.cmdline import encode_command, guest_cmdline
from pyhv.guest.status import ConsoleScanner

TIMEOUT_STATUS = 124
GUEST_FAILED_STATUS = 125
DEFAULT_APPEND = "console=ttyS0 earlyprintk=serial reboot=k panic=1 pci=conf1 nomodeset i8042.noaux"


@dataclass
class RunSpec:
    kernel: Path
    initrd: Path | None
    append: str
    cpus: int
    memory: int
    console_log: str | None
    timeout: float | None
    scan: bool                  # watch the console for the guest's status line
    interactive: bool
    boot: str = "auto"
    extract: bool = True
    default_guest: bool = False  # its init always prints a status line before it resets
    disks: list = field(default_factory=list)      # pyhv.guest.disks.DiskSpec
    volumes: list = field(default_factory=list)    # pyhv.guest.shares.VolumeSpec


def _say(message: str) -> None:
    print(f"pyhv: {message}", file=sys.stderr, flush=True)


def prepare(args) -> RunSpec:
    """Everything checked before a VMM starts, whichever engine runs the guest."""
    from pyhv.machine.layout import validate_memory
    from pyhv.machine.mptable import validate_cpus

    validate_memory(args.memory)
    if args.publish and args.network == "none":
        raise PyhvError("-p needs a network: it cannot be used with --network none")
    if args.publish:
        from pyhv.net.config import parse_forward

        for spec in args.publish:
            parse_forward(spec)         # a bad -p is reported before anything starts
    validate_cpus(args.cpus)
    from pyhv.guest.disks import parse_disk
    from pyhv.guest.shares import mount_args, parse_volume

    disks = [parse_disk(text) for text in args.disk]   # bad specs before anything starts
    volumes = [parse_volume(text) for text in args.volume]
    if args.initrd is not None and not os.access(args.initrd, os.R_OK):
        raise PyhvError(f"cannot read initrd {args.initrd}: "
                        f"{'permission denied' if os.path.exists(args.initrd) else 'no such file'}")
    command = list(args.argv or [])
    if args.kernel is None:
        from pyhv.guest.build import default_guest

        image = default_guest()
        kernel, initrd = image.kernel, image.initrd
        extra = " ".join(filter(None, [args.append, mount_args(volumes),
                                       "" if os.isatty(0) or command else "pyhv.tty=0"]))
        append = guest_cmdline(command, extra=extra)
        scan = True
    else:
        from pyhv.machine.kernelimage import load_kernel

        load_kernel(args.kernel)   # a bad kernel is reported before anything starts
        kernel, initrd = Path(args.kernel), Path(args.initrd) if args.initrd else None
        append = args.append or DEFAULT_APPEND
        if command:
            append += " " + encode_command(command)
        scan = bool(command)
    interactive = os.isatty(0) and not command
    return RunSpec(kernel, initrd, append, args.cpus, args.memory, args.console_log,
                   args.timeout, scan, interactive, args.boot, not args.no_extract,
                   default_guest=args.kernel is None, disks=disks, volumes=volumes)


def _sink(console_log: str | None):
    if console_log is None:
        return lambda data: (sys.stdout.buffer.write(data), sys.stdout.buffer.flush())
    f = open(console_log, "ab")  # noqa: SIM115 - lives as long as the run
    return lambda data: (f.write(data), f.flush())


def finish(status: int | None, panic: str | None, timed_out: bool, ended_ok: bool,
           why: str, needs_status: bool = False) -> int:
    """pyhv's exit status; `needs_status`: the guest ends by printing one (the default
    guest's init), so ending without it is a failure even after a clean reset."""
    if status is not None:
        return status
    if timed_out:
        _say("stopped by --timeout")
        return TIMEOUT_STATUS
    if panic is not None:
        _say(f"guest kernel panicked: {panic}")
        return GUEST_FAILED_STATUS
    if not ended_ok:
        _say(why)
        return GUEST_FAILED_STATUS
    if needs_status:
        _say(f"the guest ended without reporting its command's status ({why})")
        return GUEST_FAILED_STATUS
    return 0


def run(args) -> int:
    from pyhv.guest.engine import choose, qemu_binary

    engine, reason = choose(args.engine)
    if engine == "qemu":
        qemu_binary()       # missing QEMU is reported before anything is downloaded
    spec = prepare(args)
    if args.engine == "auto":
        _say(f"engine {engine}: {reason}")
    return run_qemu(spec, args) if engine == "qemu" else run_kvm(spec, args)


def run_qemu(spec: RunSpec, args) -> int:
    import tempfile
    from contextlib import nullcontext

    from pyhv.guest.children import Children, vhost_user_memory
    from pyhv.guest.disks import disk_devices
    from pyhv.guest.network import NetworkService
    from pyhv.guest.qemu import QemuRun
    from pyhv.guest.qemu import run_qemu as launch
    from pyhv.guest.shares import share_devices

    if spec.boot != "auto" or not spec.extract:
        raise PyhvError("--boot and --no-extract apply to --engine kvm only")
    network = NetworkService(args.publish) if args.network == "user" else nullcontext([])
    with tempfile.TemporaryDirectory(prefix="pyhv-run-") as tmp:
        devices = disk_devices(spec.disks, Path(tmp)) + share_devices(spec.volumes, Path(tmp))
        attach = [a for _child, args_ in devices for a in args_]
        with network as net_args, Children([child for child, _args in devices]):
            qemu = QemuRun(spec.kernel, spec.initrd, spec.append, spec.cpus, spec.memory,
                           extra_args=net_args + (vhost_user_memory(spec.memory) + attach
                                                  if attach else []),
                           interactive=spec.interactive and spec.console_log is None)
            result = launch(qemu, _sink(spec.console_log), spec.timeout)
    ok = result.returncode == 0
    return finish(result.status, result.panic, result.timed_out, ok,
                  f"qemu-system-x86_64 exited with status {result.returncode}",
                  needs_status=spec.default_guest and not spec.interactive)


def run_kvm(spec: RunSpec, args) -> int:
    from pyhv.machine.console import Console
    from pyhv.machine.machine import Machine

    if args.publish:
        raise PyhvError("-p needs a network device, which pyhv's own VMM does not have yet: "
                        "use --engine qemu")
    if spec.disks:
        raise PyhvError("--disk needs virtio-blk, which pyhv's own VMM does not have yet: "
                        "use --engine qemu")
    if spec.volumes:
        raise PyhvError("-v needs virtio-fs, which pyhv's own VMM does not have yet: "
                        "use --engine qemu")

    reader = None
    if spec.scan:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        scanner = ConsoleScanner(_sink(spec.console_log))
        reader = threading.Thread(target=_pump, args=(read_fd, scanner), daemon=True)
        reader.start()
        console = write_fd
    else:
        console = spec.console_log
    try:
        with Machine(memory=spec.memory, cpus=spec.cpus, console=console) as m:
            m.load_linux(spec.kernel, spec.initrd, spec.append, extract=spec.extract,
                         protocol=spec.boot)

            def on_signal(signum: int, _frame) -> None:
                m.stop("stopped", f"stopped by {signal.Signals(signum).name}")

            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, on_signal)
            if spec.interactive:
                with Console(m.uart, on_quit=lambda: m.stop("quit", "quit from the console")):
                    result = m.run(timeout=spec.timeout)
            else:
                result = m.run(timeout=spec.timeout)
    finally:
        if reader is not None:
            os.close(write_fd)
            reader.join(timeout=5)
    for t in result.boot_times:
        _say(f"guest boot time {t * 1000:.1f} ms")
    if args.debug:
        _say(result.message)
    if reader is not None:
        return finish(scanner.status, scanner.panic, result.kind == "timeout", result.ok,
                      result.message,
                      needs_status=spec.default_guest and result.kind not in ("quit", "stopped"))
    if result.kind == "timeout":
        return TIMEOUT_STATUS
    if not result.ok:
        _say(result.message)
    return result.exit_code


def _pump(fd: int, scanner: ConsoleScanner) -> None:
    with os.fdopen(fd, "rb", buffering=0) as f:
        while chunk := f.read(65536):
            scanner.feed(chunk)
    scanner.close()
