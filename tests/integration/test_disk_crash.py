"""kill -9 in the middle of random allocating writes: `qemu-img check` exits 0 (clean) or
3 (leaked clusters), never 2 (corruption), and pyhv opens and writes the image again."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pyhv.disk
from pyhv.disk.create import create
from tests.helpers.disk_qemu import qemu_img

ROOT = Path(__file__).resolve().parents[2]
WRITER = [sys.executable, "-m", "tests.helpers.disk_crash_writer"]


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"cluster_size": "4096"},
                                     {"cluster_size": "512", "refcount_bits": "8"},
                                     {"extended_l2": "on"}],
                         ids=["4k", "512-rc8", "extl2"])
def test_kill_9_leaves_no_corruption(tmp_path, options):
    rng = random.Random(str(options))
    path = tmp_path / "crash.qcow2"
    create(str(path), "qcow2", 16 << 20, dict(options))
    statuses = []
    for round_ in range(12):
        proc = subprocess.Popen([*WRITER, str(path), str(round_)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rng.uniform(0.01, 0.3))
        proc.kill()
        proc.wait()
        done = qemu_img("check", path, check=False)
        statuses.append(done.returncode)
        assert done.returncode in (0, 3), done.stdout
        if done.returncode == 3:
            qemu_img("check", "-r", "leaks", path, check=False)
    with pyhv.disk.open(str(path), "qcow2") as disk:     # still usable
        disk.write(0, b"ok" * 1000)
    assert qemu_img("check", path, check=False).returncode == 0
