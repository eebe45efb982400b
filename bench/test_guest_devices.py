"""The devices as a QEMU guest sees them (TCG here, so the guest's own cost weighs in):
timed inside the guest, the same guest and command against pyhv's backend and against
QEMU's own, interleaved, best of 3.

- disk: sequential 1 MiB direct writes and reads of 128 MiB on /dev/vda, pyhv's
  vhost-user-blk (`pyhv disk serve`) vs QEMU's built-in qcow2 driver (`-drive
  format=qcow2` + virtio-blk-pci) on the same image. Target 1.0x.
- folder: a create/stat/unlink loop of 500 files and 64 MiB written then read back,
  pyhv's vhost-user-fs (`pyhv share serve --socket`) vs QEMU 7.2's virtiofsd, cache=auto.
  Target 1.0x."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.guest import run_guest
from tests.helpers.serving import listening

ROUNDS = 3
MEM = ["-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa",
       "node,memdev=mem"]
# the guest's clock in centiseconds (/proc/uptime: busybox's date has no %N)
NOW = "$(u=$(cut -d' ' -f1 /proc/uptime); echo ${{u%.*}}${{u#*.}})"    # (braces: .format)
CLOCK = "t0=" + NOW + "; {cmd}; t1=" + NOW + "; echo {tag}-ms=$(( (t1 - t0) * 10 ))"


def timed(parts: dict[str, str]) -> str:
    return "; ".join(CLOCK.format(cmd=cmd, tag=tag) for tag, cmd in parts.items())


def times(output: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"(\w+)-ms=(\d+)", output)}




def _guest(command: str, args: list[str], append: str = "") -> dict[str, int]:
    result = run_guest(["sh", "-c", command], qemu_args=args, append=append, timeout=600)
    assert result.status == 0, result.output[-2000:]
    return times(result.output)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("guestdev")


def test_guest_disk_sequential_1m(workdir, record, benchmark):
    image = workdir / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "256M"], check=True)
    command = timed({"write": "dd if=/dev/zero of=/dev/vda bs=1M count=128 oflag=direct "
                              "2>/dev/null",
                     "read": "dd if=/dev/vda of=/dev/null bs=1M count=128 iflag=direct "
                             "2>/dev/null"})
    ours, theirs = [], []

    def once():
        theirs.append(_guest(command, ["-drive", f"file={image},format=qcow2,if=none,"
                                                 "id=d0,cache=writeback",
                                       "-device", "virtio-blk-pci,drive=d0"]))
        sock = workdir / "blk.sock"
        with listening([sys.executable, "-m", "pyhv", "disk", "serve", str(image),
                        "--socket", str(sock)], sock):
            ours.append(_guest(command, MEM + ["-chardev", f"socket,id=c0,path={sock}",
                                               "-device", "vhost-user-blk-pci,chardev=c0"]))
        sock.unlink(missing_ok=True)

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    for kind in ("write", "read"):
        mine = min(r[kind] for r in ours)
        anchor = min(r[kind] for r in theirs)
        record(f"guest disk sequential 1 MiB {kind}s (TCG guest)", "MB/s",
               pyhv=128_000 / mine, anchor=128_000 / anchor,
               anchor_name="QEMU's qcow2 driver (virtio-blk-pci)", target=1.0,
               runs={"pyhv_ms": [r[kind] for r in ours],
                     "qemu_ms": [r[kind] for r in theirs]})


def test_guest_folder_metadata_and_data(workdir, record, benchmark):
    shared = workdir / "shared"
    shared.mkdir()
    command = "cd /m && " + timed({
        "meta": "i=0; while [ $i -lt 500 ]; do : > f$i; stat f$i >/dev/null; rm f$i; "
                "i=$((i+1)); done",
        "write": "dd if=/dev/zero of=big bs=1M count=64 conv=fsync 2>/dev/null",
        "read": "echo 3 > /proc/sys/vm/drop_caches; dd if=big of=/dev/null bs=1M "
                "2>/dev/null"}) + "; rm big"
    ours, theirs = [], []

    def one(argv: list[str], sock: Path, out: list) -> None:
        with listening(argv, sock):
            out.append(_guest(command, MEM + [
                "-chardev", f"socket,id=c0,path={sock}",
                "-device", "vhost-user-fs-pci,chardev=c0,tag=bench"],
                append="pyhv.share=bench:/m"))      # the default guest mounts it
        sock.unlink(missing_ok=True)

    def once():
        sock = workdir / "fs.sock"
        one(["/usr/lib/qemu/virtiofsd", f"--socket-path={sock}", "-o", f"source={shared}",
             "-o", "cache=auto", "-o", "sandbox=chroot"], sock, theirs)
        one([sys.executable, "-m", "pyhv", "share", "serve", str(shared), "--socket",
             str(sock), "--tag", "bench"], sock, ours)

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    rows = {"meta": ("guest folder create+stat+unlink (TCG guest)", "files/s", 500_000),
            "write": ("guest folder 64 MiB write (TCG guest)", "MB/s", 64_000),
            "read": ("guest folder 64 MiB read (TCG guest)", "MB/s", 64_000)}
    for kind, (name, unit, scale) in rows.items():
        mine = min(r[kind] for r in ours)
        anchor = min(r[kind] for r in theirs)
        record(name, unit, pyhv=scale / mine, anchor=scale / anchor,
               anchor_name="virtiofsd (QEMU 7.2)", target=1.0,
               runs={"pyhv_ms": [r[kind] for r in ours],
                     "virtiofsd_ms": [r[kind] for r in theirs]})
