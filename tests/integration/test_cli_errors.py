"""Bad input to `pyhv run` and `pyhv kernel extract`: one line naming the cause, non-zero."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers.pyhvrun import PYHV, pyhv

pytestmark = pytest.mark.usefixtures("kvm_available")


def vmm(*args: str, **kw) -> subprocess.CompletedProcess:
    """`pyhv run --engine kvm ...`: these are the VMM's own checks."""
    return pyhv("run", "--engine", "kvm", *args, **kw)


def one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture
def garbage(tmp_path):
    path = tmp_path / "garbage.bin"
    path.write_bytes(os.urandom(64 << 10))
    return path


def test_missing_kernel(tmp_path):
    one_line_error(vmm("--kernel", str(tmp_path / "nope")), "nope", "No such file")


def test_not_a_kernel(garbage):
    one_line_error(vmm("--kernel", str(garbage)), "not a Linux kernel")


def _address_space(limit: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


@pytest.mark.parametrize("size, needle", [(64 << 10, "not a Linux kernel"),
                                          ((2 << 30) + 1, "larger than")])
def test_kernel_read_allocates_no_more_than_the_file(tmp_path, size, needle):
    """With 1 GiB of address space, a small file and a huge sparse one are both one-line
    errors: reading with read(MAX_IMAGE + 1) allocated 2 GiB first (a MemoryError)."""
    path = tmp_path / "kernel.bin"
    with open(path, "wb") as f:
        f.truncate(size)
    one_line_error(vmm("--kernel", str(path), preexec_fn=_address_space(1 << 30)),
                   "kernel.bin", needle)


def test_truncated_bzimage(debian_kernel, tmp_path):
    cut = tmp_path / "cut"
    cut.write_bytes(debian_kernel.read_bytes()[: 256 << 10])
    one_line_error(vmm("--kernel", str(cut)), "truncated")


def test_initrd_larger_than_guest_ram(debian_kernel, tmp_path):
    initrd = tmp_path / "huge.img"
    with open(initrd, "wb") as f:
        f.truncate(200 << 20)      # sparse: 200 MiB without using the disk
    one_line_error(vmm("--kernel", str(debian_kernel), "--initrd", str(initrd),
                        "--memory", "128m"), "initrd", "does not fit")


def test_missing_initrd(debian_kernel, tmp_path):
    one_line_error(vmm("--kernel", str(debian_kernel), "--initrd",
                        str(tmp_path / "none.img")), "initrd", "No such file")


@pytest.mark.parametrize("memory, needle", [("1m", "too small"), ("100t", "too large"),
                                             ("lots", "size"), ("0", "too small")])
def test_bad_memory(debian_kernel, memory, needle):
    one_line_error(vmm("--kernel", str(debian_kernel), "--memory", memory), needle)


@pytest.mark.parametrize("cpus", ["0", "-1", "two", "100000"])
def test_bad_cpus(debian_kernel, cpus):
    one_line_error(vmm("--kernel", str(debian_kernel), "--cpus", cpus), "cpus")


def test_command_line_too_long(debian_kernel):
    one_line_error(vmm("--kernel", str(debian_kernel), "--append", "x" * 5000),
                   "command line", "at most")


def test_extract_of_garbage(garbage, tmp_path):
    out = tmp_path / "out"
    one_line_error(pyhv("kernel", "extract", str(garbage), str(out)), "not a Linux kernel")
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root to drop to the nobody user with setpriv")
def test_unreadable_kernel_and_kvm_permission_as_normal_user(debian_kernel):
    tmp_path = Path(tempfile.mkdtemp(prefix="pyhv-nobody-"))   # pytest's tmp is root-only
    os.chmod(tmp_path, 0o755)
    private = tmp_path / "private-vmlinuz"
    shutil.copy(debian_kernel, private)
    os.chmod(private, 0o600)
    public = tmp_path / "public-vmlinuz"
    shutil.copy(debian_kernel, public)
    os.chmod(public, 0o644)
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HOME": str(tmp_path)}
    done = subprocess.run([*as_nobody, *PYHV, "run", "--engine", "kvm", "--kernel", str(private)],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    one_line_error(done, "private-vmlinuz", "ermission denied")
    if os.stat("/dev/kvm").st_mode & 0o006 == 0o006:
        pytest.skip("/dev/kvm is world-accessible here; the group hint cannot be provoked")
    done = subprocess.run([*as_nobody, *PYHV, "run", "--engine", "kvm", "--kernel", str(public)],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    one_line_error(done, "/dev/kvm", "kvm' group")
    shutil.rmtree(tmp_path)


def test_missing_dev_kvm_and_missing_capability_messages():
    from hvcore.errors import KvmUnavailable
    from hvcore.kvm import Kvm

    with pytest.raises(KvmUnavailable, match="does not exist: KVM is not available"):
        Kvm("/nonexistent/kvm")
    with pytest.raises(KvmUnavailable, match="lacks required capability: KVM_CAP_IMAGINARY"):
        Kvm(required={"KVM_CAP_IRQCHIP": 0, "KVM_CAP_IMAGINARY": 100000})


def test_version():
    done = pyhv("--version")
    assert done.returncode == 0 and done.stdout.strip() == "pyhv 0.1.0"


def test_doctor_reports_kvm_and_what_runs_guest_kernel_code():
    from pyhv.machine.hostkvm import host_kvm

    host = host_kvm()
    done = pyhv("doctor")
    assert done.returncode == 0, done.stderr
    assert "API version 12" in done.stdout
    kind = "native" if host.native else "emulated"
    assert f"guest kernel code: {kind} ({host.reason})" in done.stdout.splitlines()
    assert "tool qemu-system-x86_64:" in done.stdout


@pytest.mark.parametrize("args, needle", [(["--memory", "1m"], "too small"),
                                          (["--cpus", "100000"], "cpus"),
                                          (["--initrd", "/nonexistent/initrd"], "initrd")])
def test_bad_arguments_are_refused_before_any_engine_starts(args, needle):
    one_line_error(pyhv("run", "--engine", "qemu", *args, "--", "true"), needle)
