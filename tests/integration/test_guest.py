"""The default guest and `pyhv run -- COMMAND`, through the QEMU harness (and pyhv's own
VMM where guest kernel code runs natively)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from pyhv.guest.build import build_guest
from tests.helpers.guest import run_guest
from tests.helpers.pyhvrun import pyhv

pytestmark = pytest.mark.slow


@pytest.fixture(params=["qemu", "kvm"])
def engine(request, guest_kernel_native):
    """Each guest test runs under QEMU and, where guest kernel code runs natively, on
    pyhv's own VMM too."""
    if request.param == "kvm" and not guest_kernel_native:
        pytest.skip("this host's KVM emulates guest kernel code: the default guest would "
                    "not reach userspace on pyhv's own VMM here; test_bed_vmm.py runs these "
                    "cases on it in the hardware-virtualisation test bed")
    return request.param


@pytest.fixture(scope="module")
def image():
    return build_guest(progress=lambda _m: None)


def test_auto_engine_says_which_and_why(image):
    done = pyhv("run", "--", "uname", "-r", timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == image.kernel_release
    assert "engine qemu:" in done.stderr or "engine kvm:" in done.stderr


def test_run_uname_prints_the_guest_kernel_release(image, engine):
    done = pyhv("run", "--engine", engine, "--", "uname", "-r", timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == image.kernel_release
    assert "PYHV-EXIT-STATUS" not in done.stdout


def test_exit_status_is_the_commands(engine):
    done = pyhv("run", "--engine", engine, "--", "sh", "-c", "exit 7", timeout=300)
    assert done.returncode == 7, done.stderr


def test_arguments_survive_intact(engine):
    args = ["a  b", "it's", 'double "quoted"', "héllo wörld ✓", "", "$HOME", "*", "x\ty"]
    done = pyhv("run", "--engine", engine, "--", "printf", "[%s]\\n", *args, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"[{a}]" for a in args]


def test_guest_panic_is_a_clear_failure(engine):
    done = pyhv("run", "--engine", engine, "--", "sh", "-c", "echo c > /proc/sysrq-trigger",
                timeout=300)
    assert done.returncode == 125
    assert "pyhv: guest kernel panicked: sysrq triggered crash" in done.stderr.splitlines()


def test_harness_passes_extra_qemu_arguments_and_loads_virtio_pci():
    run = run_guest(["sh", "-c", "cat /sys/bus/virtio/devices/*/device"],
                    qemu_args=["-device", "virtio-rng-pci"])
    assert run.status == 0, run.output
    assert "0x0004" in run.output.split()          # virtio device id 4: entropy source


def test_modules_loaded_in_dependency_order(image):
    run = run_guest(["cat", "/etc/pyhv/modules"])
    names = run.output.split()
    assert run.status == 0
    assert names.index("virtio_ring.ko") < names.index("virtio.ko") < names.index(
        "virtio_pci.ko")
    assert names.index("fuse.ko") < names.index("virtiofs.ko")
    lsmod = run_guest(["cat", "/proc/modules"]).output
    for module in ("virtio_pci", "virtio_blk", "virtio_net", "virtiofs",
                   "vmw_vsock_virtio_transport"):
        assert module + " " in lsmod


def test_guest_build_twice_reuses_the_cache(tmp_path):
    first = pyhv("guest", "build", "--output", str(tmp_path / "a"), timeout=600)
    assert first.returncode == 0, first.stderr
    second = pyhv("guest", "build", "--output", str(tmp_path / "b"), timeout=600)
    assert second.returncode == 0, second.stderr
    assert "is cached" in second.stderr
    assert (tmp_path / "a/initrd.img").read_bytes() == (tmp_path / "b/initrd.img").read_bytes()
    manifest = json.loads((build_guest(progress=lambda _m: None).kernel.parent
                           / "manifest.json").read_text())
    assert "virtiofs.ko" in manifest["modules"]


def test_initramfs_is_a_cpio_archive_gnu_cpio_reads(image, tmp_path):
    listing = subprocess.run(f"zcat {image.initrd} | cpio -t --quiet", shell=True,
                             capture_output=True, text=True, check=True).stdout.split()
    for path in ("init", "bin/busybox", "etc/pyhv/modules", "lib/modules/virtio_pci.ko"):
        assert path in listing


def test_bad_engine_and_missing_qemu(tmp_path):
    done = pyhv("run", "--engine", "vmware", "--", "true")
    assert done.returncode == 2 and "invalid choice" in done.stderr
    env = {**os.environ, "PATH": str(tmp_path)}      # no qemu-system-x86_64 on PATH
    done = pyhv("run", "--engine", "qemu", "--", "true", env=env, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "pyhv: qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")


def test_run_without_terminal_or_command_runs_a_shell_that_reads_nothing():
    done = pyhv("run", timeout=300)          # stdin is /dev/null here
    assert done.returncode == 0, done.stderr
