"""One writer per image, as QEMU enforces it: `pyhv disk serve` takes QEMU's lock bytes, so
qemu-img, qemu-io and QEMU see pyhv's use of an image and pyhv sees theirs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.disk_qemu import qemu_img
from tests.helpers.serving import listening


def serve(image: Path, sock: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "pyhv", "disk", "serve", str(image), "--socket", str(sock),
            *options]


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "l.qcow2"
    qemu_img("create", "-f", "qcow2", path, "16M")
    return path


def test_qemu_tools_see_pyhvs_writer(image, tmp_path):
    with listening(serve(image, tmp_path / "a.sock"), tmp_path / "a.sock"):
        info = qemu_img("info", image, check=False)
        assert info.returncode == 1
        assert 'Failed to get shared "write" lock' in info.stderr
        io = subprocess.run(["qemu-io", "-c", "write 0 512", str(image)], capture_output=True,
                            text=True)
        assert 'Failed to get "write" lock' in io.stdout + io.stderr
        assert qemu_img("info", "-U", image).returncode == 0      # force-share still reads
        second = subprocess.run(serve(image, tmp_path / "b.sock"), capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 1
        assert second.stderr.strip() == (
            'pyhv: Failed to get "write" lock: is another process using the image '
            f"{image}?")
    assert qemu_img("info", image).returncode == 0                 # released at exit


def test_pyhv_sees_a_qemu_writer(image, tmp_path):
    sock = tmp_path / "qsd.sock"
    qsd = ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f,filename={image}",
           "--blockdev", "driver=qcow2,node-name=q,file=f", "--export",
           f"type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={sock},"
           "writable=on"]
    with listening(qsd, sock):
        for options in ([], ["--readonly"]):
            done = subprocess.run(serve(image, tmp_path / "p.sock", *options),
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 1
            assert "lock: is another process using the image" in done.stderr
            assert len(done.stderr.strip().splitlines()) == 1


def test_readers_share_an_image(image, tmp_path):
    with listening(serve(image, tmp_path / "r1.sock", "--readonly"), tmp_path / "r1.sock"), \
            listening(serve(image, tmp_path / "r2.sock", "--readonly"), tmp_path / "r2.sock"):
        writer = subprocess.run(serve(image, tmp_path / "w.sock"), capture_output=True,
                                text=True, timeout=60)
        assert writer.returncode == 1 and 'Failed to get "write" lock' in writer.stderr
