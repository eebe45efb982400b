"""The `pyhv` command. Errors are one line (the cause) unless --debug is given."""

from __future__ import annotations

import argparse
import importlib
import sys

from pyhv import __version__
from pyhv.errors import PyhvError
from pyhv.runner import DEFAULT_APPEND

# Each subsystem adds its own subcommands: `register(subparsers)` creates parsers whose
# defaults carry `handler=callable(args) -> int` (imports stay lazy inside the handlers).
SUBSYSTEM_CLIS = ("pyhv.disk.cli", "pyhv.virtio.cli", "pyhv.net.cli", "pyhv.share.cli",
                  "pyhv.guest.cli")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _size(text: str) -> int:
    from pyhv.machine.layout import parse_size

    try:
        return parse_size(text)
    except PyhvError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pyhv", description="micro-VMs on KVM")
    p.add_argument("--version", action="version", version=f"pyhv {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="boot a guest; `pyhv run -- CMD ARGS` runs CMD in the "
                         "default guest and exits with its status")
    run.add_argument("--kernel", help="bzImage or ELF vmlinux (default: the default guest, "
                     "built on first use)")
    run.add_argument("--initrd", help="initramfs / initrd image")
    run.add_argument("--append", help="kernel command line (default with --kernel: "
                     f"{DEFAULT_APPEND!r}; with the default guest: extra arguments)")
    run.add_argument("--engine", choices=["auto", "kvm", "qemu"], default="auto",
                     help="pyhv's own VMM (kvm), QEMU (qemu), or kvm where guest kernel code "
                          "runs natively (auto)")
    run.add_argument("--cpus", type=_positive_int, default=1, help="number of vCPUs")
    run.add_argument("--memory", "-m", type=_size, default=512 << 20,
                     help="guest RAM, e.g. 512m, 2g (a bare number means MiB)")
    run.add_argument("--console-log", help="write the serial console to this file")
    run.add_argument("--boot", choices=["auto", "linux64", "pvh"], default="auto",
                     help="entry protocol for ELF kernels (default: 64-bit boot protocol)")
    run.add_argument("--no-extract", action="store_true",
                     help="boot a bzImage through its own decompressor instead of "
                          "extracting the vmlinux on the host")
    run.add_argument("--timeout", type=float, help="stop the VM after this many seconds")
    run.add_argument("--network", choices=["user", "none"], default="user",
                     help="user: pyhv's user-mode network (DHCP, DNS, host sockets; "
                          "default), none: no network device")
    run.add_argument("-p", "--publish", action="append", default=[],
                     metavar="[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]",
                     help="publish a guest port on the host (127.0.0.1 unless HOSTIP)")
    run.add_argument("--disk", action="append", default=[],
                     metavar="FILE[,format=qcow2|raw][,readonly=on][,serial=S]",
                     help="attach a disk image (repeatable; /dev/vda, /dev/vdb, ...)")
    run.add_argument("-v", "--volume", action="append", default=[],
                     metavar="HOSTDIR:GUESTPATH[:ro]",
                     help="share a host folder with the guest (repeatable, virtio-fs)")
    run.add_argument("argv", nargs="*", metavar="COMMAND",
                     help="command and arguments to run in the guest (after --)")

    kernel = sub.add_parser("kernel", help="kernel image tools")
    ksub = kernel.add_subparsers(dest="kernel_command", required=True)
    extract = ksub.add_parser("extract", help="write the vmlinux inside a bzImage")
    extract.add_argument("bzimage")
    extract.add_argument("output")

    ksub.add_parser("fetch", help="download Debian's cloud kernel (cached) and print its path")

    sub.add_parser("doctor", help="report what this host can run")
    for name in SUBSYSTEM_CLIS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise           # a real import error inside the subsystem
            continue
        module.register(sub)
    return p


def cmd_run(args: argparse.Namespace) -> int:
    from pyhv.runner import run

    return run(args)


def cmd_kernel(args: argparse.Namespace) -> int:
    if args.kernel_command == "fetch":
        from pyhv.guest.debian import debian_kernel

        print(debian_kernel())
        return 0
    from pyhv.machine.kernelimage import extract_file

    elf = extract_file(args.bzimage, args.output)
    print(f"{args.output}: vmlinux, entry {elf.entry:#x}"
          + (f", PVH entry {elf.pvh_entry:#x}" if elf.pvh_entry is not None else ""))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from pyhv.machine.doctor import report

    lines, ok = report()
    print("\n".join(lines))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"run": cmd_run, "doctor": cmd_doctor, "kernel": cmd_kernel}
    try:
        handler = getattr(args, "handler", None) or handlers[args.command]
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except (PyhvError, OSError) as e:
        if args.debug:
            raise
        print(f"pyhv: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
