"""Pieces of the default guest that need no VM: cpio writer, module order, command
encoding, console scanning."""

from __future__ import annotations

import base64
import gzip
import io
import shlex
import subprocess

import pytest

from pyhv.errors import PyhvError
from pyhv.guest import initramfs as cpio
from pyhv.guest.cmdline import encode_command, guest_cmdline
from pyhv.guest.modules import load_order, parse_modules_dep
from pyhv.guest.status import ConsoleScanner


def test_cpio_archive_extracts_with_gnu_cpio(tmp_path):
    archive = tmp_path / "initrd.img"
    cpio.write_initramfs(archive, [cpio.directory("etc"), cpio.file("etc/a", b"x" * 5, 0o600),
                                   cpio.file("init", b"#!/bin/sh\n", 0o755),
                                   cpio.symlink("etc/b", "a"), cpio.file("empty", b"")])
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(f"zcat {archive} | cpio -id --quiet", shell=True, cwd=out, check=True)
    assert (out / "etc/a").read_bytes() == b"xxxxx"
    assert (out / "etc/a").stat().st_mode & 0o777 == 0o600
    assert (out / "init").stat().st_mode & 0o777 == 0o755
    assert (out / "etc/b").readlink().as_posix() == "a"
    assert (out / "empty").read_bytes() == b""


def test_cpio_is_deterministic():
    entries = [cpio.file("a", b"1"), cpio.file("b", b"22")]
    one, two = io.BytesIO(), io.BytesIO()
    cpio.write_cpio(one, entries)
    cpio.write_cpio(two, entries)
    assert one.getvalue() == two.getvalue()
    assert one.getvalue().rstrip(b"\0").endswith(b"TRAILER!!!")
    assert len(one.getvalue()) % 4 == 0
    assert gzip.decompress(gzip.compress(one.getvalue())) == one.getvalue()


DEP = """kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko \
kernel/fs/fuse/fuse.ko
kernel/fs/fuse/fuse.ko:
"""


def test_load_order_puts_dependencies_first_and_each_once():
    order = [p.rsplit("/", 1)[1] for p in load_order(parse_modules_dep(DEP),
                                                     ("virtio_pci", "virtiofs"))]
    assert order.index("virtio_ring.ko") < order.index("virtio.ko") < order.index(
        "virtio_pci.ko")
    assert order.index("fuse.ko") < order.index("virtiofs.ko")
    assert len(order) == len(set(order)) == 7


def test_load_order_names_a_missing_module_and_a_loop():
    with pytest.raises(PyhvError, match="no module virtio_net"):
        load_order(parse_modules_dep(DEP), ("virtio_net",))
    with pytest.raises(PyhvError, match="loop"):
        load_order(parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n"), ("a",))


@pytest.mark.parametrize("argv", [["uname", "-r"], ["printf", "%s", "a  b", "it's", "é✓"],
                                  ["sh", "-c", "exit 7"], ["echo", ""]])
def test_command_encoding_round_trips(argv):
    param = encode_command(argv)
    assert " " not in param and param.startswith("pyhv.cmd=")
    decoded = base64.b64decode(param.removeprefix("pyhv.cmd=")).decode()
    assert shlex.split(decoded) == argv


def test_guest_cmdline_has_console_reset_and_command():
    line = guest_cmdline(["true"], extra="loglevel=3", shares=["src:/src"])
    assert line.startswith("console=ttyS0") and "reboot=k" in line
    assert "pyhv.share=src:/src" in line and "loglevel=3" in line
    assert line.endswith(encode_command(["true"]))


def test_scanner_withholds_the_status_line_and_what_follows():
    seen = []
    s = ConsoleScanner(seen.append)
    for chunk in (b"out", b"put\nmore\r\nPYHV-EXIT-", b"STATUS: 42\r\n[ 1.0] reboot: Restart",
                  b"ing system\n"):
        s.feed(chunk)
    s.close()
    assert b"".join(seen) == b"output\nmore\r\n"
    assert s.status == 42 and s.panic is None


def test_scanner_recognises_a_panic_and_keeps_a_last_partial_line():
    seen = []
    s = ConsoleScanner(seen.append)
    s.feed(b"[ 2.1] Kernel panic - not syncing: VFS: Unable to mount root fs\r\nno newline")
    s.close()
    assert s.panic == "VFS: Unable to mount root fs" and s.status is None
    assert b"".join(seen).endswith(b"no newline")


def test_scanner_passes_a_prompt_on_before_its_line_ends():
    seen = []
    s = ConsoleScanner(seen.append)
    s.feed(b"banner\n~ # ")
    assert b"".join(seen) == b"banner\n~ # "          # a shell's prompt has no newline
    s.feed(b"echo hi\r\nhi\r\n")
    assert b"".join(seen) == b"banner\n~ # echo hi\r\nhi\r\n"   # nothing twice


def test_scanner_holds_only_what_could_still_be_the_status_line():
    seen = []
    s = ConsoleScanner(seen.append)
    s.feed(b"PYHV-EXIT")
    assert seen == []
    s.feed(b"-STATUS: 1")
    assert seen == []
    s.feed(b"x\n")                                     # not a status line after all
    assert b"".join(seen) == b"PYHV-EXIT-STATUS: 1x\n" and s.status is None
    s.feed(b"PYHV-EXIT-STATUS: 3\r")
    s.feed(b"\n[ 9.9] reboot: Restarting system\n")
    assert b"".join(seen) == b"PYHV-EXIT-STATUS: 1x\n" and s.status == 3


def test_scanner_long_partial_lines_stay_bounded_and_whole():
    seen = []
    s = ConsoleScanner(seen.append)
    for _ in range(40):
        s.feed(b"x" * (8 << 10))
    s.feed(b" Kernel panic - not syncing: late\n")
    assert b"".join(seen) == b"x" * (320 << 10) + b" Kernel panic - not syncing: late\n"
    assert s.panic == "late"


@pytest.mark.parametrize("status, panic, timed_out, ended_ok, needs, expected", [
    (7, None, False, True, True, 7),            # the command's own status wins
    (None, None, False, True, True, 125),       # default guest reset without a status line
    (None, None, False, True, False, 0),        # --kernel: a clean reset is success
    (None, None, True, False, True, 124),       # --timeout
    (None, "oops", False, True, True, 125),     # panic named on stderr
    (None, None, False, False, False, 125),     # the VMM failed
])
def test_exit_status_from_how_the_guest_ended(status, panic, timed_out, ended_ok, needs,
                                              expected, capsys):
    from pyhv.runner import finish

    assert finish(status, panic, timed_out, ended_ok, "why", needs_status=needs) == expected
    err = capsys.readouterr().err
    assert len(err.splitlines()) == (0 if expected in (0, 7) else 1)
