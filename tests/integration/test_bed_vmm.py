"""The default guest on pyhv's own VMM, end to end: `pyhv run --engine kvm -- CMD`.

Needs a KVM that runs guest kernel code natively. Where the host's does (VT-x/AMD-V), the
cases run here; where it is PVM, they run in the hardware-virtualisation test bed
(tests/helpers/bed.py: QEMU TCG with nested SVM), all in one boot of it, since each L2 boot
costs ~15-20 s there. Each test then checks one case's recorded status and output.
"""

from __future__ import annotations

import re
import sys

import pytest

from tests.helpers import bed as bedlib
from tests.helpers.pyhvrun import pyhv

# the first test also waits for the bed's one boot, which runs every case
pytestmark = [pytest.mark.bed, pytest.mark.kernel, pytest.mark.slow, pytest.mark.timeout(1500)]

MARK = "echo MARK-$((6*7)); echo CPUS-$(nproc); exit 7"
ODD_ARGS = ["a  b", "it's", 'double "quoted"', "héllo wörld ✓", "", "$HOME", "*", "x\ty"]
KVM = ["run", "--engine", "kvm"]
KERN_WARNING = 4
# what `pyhv run --kernel` needs to boot the default guest's init with a command
KERNEL_APPEND = "console=ttyS0 quiet reboot=k panic=-1 i8042.noaux pyhv.net=0"


def _cases(image, vmlinux) -> dict[str, list[str]]:
    own = ["--initrd", str(image.initrd), "--append", KERNEL_APPEND]
    pyhv_cases = {
        "mark": [*KVM, "--cpus", "2", "--", "sh", "-c", MARK],
        "mark_qemu": ["run", "--engine", "qemu", "--cpus", "2", "--", "sh", "-c", MARK],
        "auto": ["run", "--", "uname", "-r"],
        "true": [*KVM, "--", "true"],
        "false": [*KVM, "--", "false"],
        "args": [*KVM, "--", "printf", "[%s]\\n", *ODD_ARGS],
        "no_status": [*KVM, "--", "reboot", "-f"],
        "panic": [*KVM, "--", "sh", "-c", "echo c > /proc/sysrq-trigger"],
        "timeout": [*KVM, "--timeout", "8", "--", "sleep", "600"],
        "cpus1": [*KVM, "--cpus", "1", "--memory", "256m", "--", "sh", "-c",
                  "nproc; grep MemTotal /proc/meminfo"],
        "cpus4": [*KVM, "--cpus", "4", "--memory", "1536m", "--", "sh", "-c",
                  "nproc; grep MemTotal /proc/meminfo"],
        "warn_kvm": [*KVM, "--", "dmesg", "-r"],
        "warn_qemu": ["run", "--engine", "qemu", "--", "dmesg", "-r"],
        "bzimage": [*KVM, "--kernel", str(image.kernel), *own, "--", "sh", "-c", "exit 3"],
        "bzimage_no_extract": [*KVM, "--kernel", str(image.kernel), "--no-extract", *own,
                               "--", "sh", "-c", "exit 4"],
        "vmlinux": [*KVM, "--kernel", str(vmlinux), *own, "--", "sh", "-c", "exit 5"],
        "reset": ["--debug", *KVM, "--kernel", str(vmlinux), *own, "--", "reboot", "-f"],
        "poweroff": ["--debug", *KVM, "--kernel", str(vmlinux), *own, "--", "poweroff", "-f"],
        "doctor": ["doctor"],
    }
    cases = {name: bedlib.pyhv_argv(*args) for name, args in pyhv_cases.items()}
    cases["pty"] = [sys.executable, "-m", "tests.helpers.ptyrun", *KVM]
    return cases


@pytest.fixture(scope="session")
def vmm_runs(tmp_path_factory):
    """Every case's CaseResult, by name: run here, or in one boot of the bed (which needs
    no KVM on this host: L1 is TCG)."""
    from pyhv.guest.build import build_guest
    from pyhv.guest.debian import KERNEL_PACKAGE, fetch_deb, unpack_deb
    from pyhv.guest.modules import modules_dir
    from pyhv.machine.hostkvm import host_kvm

    image = build_guest(progress=lambda _m: None)
    work = tmp_path_factory.mktemp("bed")
    vmlinux = work / "vmlinux"          # (the work directory is writable in the bed too)
    done = pyhv("kernel", "extract", str(image.kernel), str(vmlinux))
    assert done.returncode == 0, done.stderr
    cases = _cases(image, vmlinux)
    if host_kvm().native:
        return bedlib.run_here(cases), image, ""
    reason = bedlib.unavailable()
    if reason:
        pytest.skip(f"this host's KVM does not run guest kernel code natively and the test "
                    f"bed cannot run: {reason}")
    modules = modules_dir(unpack_deb(fetch_deb(KERNEL_PACKAGE)))
    results, run = bedlib.Bed(image, modules, work).run_cases(cases, timeout=1200)
    ended = f"the bed ended with status {run.status} (timed out: {run.timed_out}); its " \
            f"console:\n{run.console[-3000:]}"
    return results, image, ended


def _case(vmm_runs, name: str) -> bedlib.CaseResult:
    result = vmm_runs[0][name]
    assert result.status is not None, f"case {name} never finished; {vmm_runs[2]}"
    return result


def test_command_output_and_status_reach_the_host(vmm_runs):
    r = _case(vmm_runs, "mark")
    assert r.status == 7, r.stderr
    assert r.stdout.splitlines() == ["MARK-42", "CPUS-2"], r.stdout + r.stderr


def test_qemu_in_the_same_place_agrees(vmm_runs):
    r = _case(vmm_runs, "mark_qemu")
    assert r.status == 7, r.stderr
    assert r.stdout.splitlines() == ["MARK-42", "CPUS-2"]


def test_auto_engine_takes_kvm_where_guest_kernel_code_runs_natively(vmm_runs):
    r = _case(vmm_runs, "auto")
    assert r.status == 0, r.stderr
    assert r.stdout.strip() == vmm_runs[1].kernel_release
    assert "pyhv: engine kvm:" in r.stderr


@pytest.mark.parametrize("name, status", [("true", 0), ("false", 1)])
def test_exit_status_is_the_commands(vmm_runs, name, status):
    r = _case(vmm_runs, name)
    assert r.status == status, r.stderr
    assert r.stdout == ""           # the status line and the reset message are withheld


def test_arguments_survive_intact(vmm_runs):
    r = _case(vmm_runs, "args")
    assert r.status == 0, r.stderr
    assert r.stdout.splitlines() == [f"[{a}]" for a in ODD_ARGS]


def test_guest_that_resets_without_a_status_line_is_125(vmm_runs):
    r = _case(vmm_runs, "no_status")
    assert r.status == 125, r.stderr
    assert "without reporting its command's status" in r.stderr.splitlines()[-1]


def test_guest_panic_is_125_and_named(vmm_runs):
    r = _case(vmm_runs, "panic")
    assert r.status == 125
    assert "pyhv: guest kernel panicked: sysrq triggered crash" in r.stderr.splitlines()


def test_timeout_is_124(vmm_runs):
    r = _case(vmm_runs, "timeout")
    assert r.status == 124, r.stderr
    assert "pyhv: stopped by --timeout" in r.stderr.splitlines()


@pytest.mark.parametrize("name, cpus, memory", [("cpus1", 1, 256 << 20), ("mark", 2, None),
                                                ("cpus4", 4, 1536 << 20)])
def test_guest_sees_the_cpus_and_memory_asked_for(vmm_runs, name, cpus, memory):
    r = _case(vmm_runs, name)
    if name == "mark":
        assert f"CPUS-{cpus}" in r.stdout.splitlines()
        return
    assert r.status == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == str(cpus)
    total = int(re.fullmatch(r"MemTotal:\s+(\d+) kB", lines[1]).group(1)) << 10
    # the kernel keeps its own image, page tables and reserved ranges out of MemTotal
    assert memory - (96 << 20) < total <= memory     # the default is 512 MiB


@pytest.mark.parametrize("name, status", [("bzimage", 3), ("bzimage_no_extract", 4),
                                          ("vmlinux", 5)])
def test_kernel_and_initrd_given_explicitly(vmm_runs, name, status):
    """bzImage extracted on the host, bzImage through its own decompressor, ELF vmlinux."""
    r = _case(vmm_runs, name)
    assert r.status == status, r.stderr


def test_doctor_says_guest_kernel_code_is_native(vmm_runs):
    r = _case(vmm_runs, "doctor")
    assert r.status == 0, r.stderr
    assert re.search(r"^guest kernel code: native", r.stdout, re.M), r.stdout



def test_reset_and_poweroff_end_the_vmm_with_status_0(vmm_runs):
    """With --kernel no status line is expected: how the guest ended is the status."""
    for name, how in (("reset", "guest reset the machine"),
                      ("poweroff", "guest powered off (ACPI S5)")):
        r = _case(vmm_runs, name)
        assert r.status == 0, r.stderr
        assert any(line.startswith(f"pyhv: {how}") for line in r.stderr.splitlines()), r.stderr


def _warnings(dmesg: str) -> set[str]:
    """The kernel's messages at warning level or worse, from `dmesg -r` ("<prio>[time] text";
    busybox's dmesg has no -l). A WARN() splat counts as its "WARNING ... at FILE:LINE"
    alone: its registers, stack and the XSAVE warning's CPUID dump differ by VMM."""
    found, in_splat = set(), False
    for line in dmesg.splitlines():
        m = re.match(r"<(\d+)>\[\s*[\d.]+\]\s?(.*)", line)
        if not m or int(m.group(1)) > KERN_WARNING:       # facility 0: the kernel's own
            continue
        text = m.group(2)
        if "[ cut here ]" in text:
            in_splat = True
        elif text.startswith("---[ end trace"):
            in_splat = False
        elif w := re.match(r"WARNING: CPU: \d+ PID: \d+ at (\S+)", text):
            found.add(f"WARNING at {w.group(1)}")
        elif not in_splat and not re.match(r"CPUID\[[0-9a-f]+, [0-9a-f]+\]:", text):
            found.add(text)
    return found


def test_no_kernel_warnings_beyond_qemus(vmm_runs):
    """Warnings and errors the guest kernel logged on pyhv's VMM, against the same kernel
    under QEMU in the same place (TCG's CPUID leaf 0xD draws an XSAVE warning in both)."""
    ours, qemus = _case(vmm_runs, "warn_kvm"), _case(vmm_runs, "warn_qemu")
    assert ours.status == 0 and qemus.status == 0, ours.stderr + qemus.stderr
    assert re.search(r"^<\d+>\[", qemus.stdout, re.M), "not dmesg -r: " + qemus.stdout[:500]
    extra = _warnings(ours.stdout) - _warnings(qemus.stdout)
    assert not extra, "\n".join(sorted(extra))


def test_interactive_terminal_runs_what_is_typed_and_ctrl_a_x_quits(vmm_runs):
    r = _case(vmm_runs, "pty")
    assert r.status == 0, r.stdout[-3000:] + r.stderr
    # only the shell says 42: the terminal's echo of the typed line shows $((40+2))
    assert re.search(r"^PTY-42\r?$", r.stdout, re.M), r.stdout[-2000:]
    assert r.stdout.rstrip().endswith("PTYRUN-STATUS: 0"), r.stdout[-2000:]
