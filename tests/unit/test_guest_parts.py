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
