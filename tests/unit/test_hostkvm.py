"""The engine choice reads what the host's KVM is: fake /sys/module and /proc/cpuinfo trees
for each kind of host, and this host's own answer checked against its loaded modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyhv.machine.hostkvm import cpu_flags, host_kvm

CPUINFO = "processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu vme {flags} sse2\n\n" \
          "processor\t: 1\nflags\t\t: fpu\n"


def fake_host(tmp_path: Path, modules: list[str], flags: str, vendor: str = "AuthenticAMD"):
    sysmod = tmp_path / "module"
    for m in ["kvm", *modules]:
        (sysmod / m).mkdir(parents=True)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(vendor=vendor, flags=flags))
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    return {"dev": str(dev), "sys_module": sysmod, "cpuinfo": cpuinfo}


@pytest.mark.parametrize("modules, flags, native, needle", [
    (["kvm_amd"], "svm npt", True, "kvm_amd, CPU flag svm: AMD-V"),
    (["kvm_intel"], "vmx ept", True, "kvm_intel, CPU flag vmx: VT-x"),
    (["kvm_pvm"], "hypervisor", False, "kvm_pvm is loaded"),
    (["kvm_pvm"], "svm", False, "kvm_pvm is loaded"),       # PVM wins over a flag
    ([], "hypervisor", False, "neither vmx nor svm"),
])
def test_kind_of_kvm(tmp_path, modules, flags, native, needle):
    host = host_kvm(**fake_host(tmp_path, modules, flags))
    assert host.usable and host.native is native
    assert needle in host.reason


def test_no_dev_kvm_is_not_usable(tmp_path):
    paths = fake_host(tmp_path, ["kvm_amd"], "svm")
    host = host_kvm(**{**paths, "dev": str(tmp_path / "missing")})
    assert not host.usable and not host.native and "no usable" in host.reason


def test_flags_come_from_the_first_cpu_only(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(vendor="GenuineIntel", flags="vmx"))
    assert cpu_flags(cpuinfo) == {"fpu", "vme", "vmx", "sse2"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_this_host_agrees_with_its_modules():
    host = host_kvm()
    if Path("/sys/module/kvm_pvm").is_dir():
        assert not host.native
    elif host.usable and {"vmx", "svm"} & cpu_flags(Path("/proc/cpuinfo")):
        assert host.native
