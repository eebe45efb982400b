"""CPUID policy on top of guest_cpuid: features hidden where the host cannot honour them."""

from pyhv.machine.cpu import CPUID_1_ECX_CX16, hide_features, host_is_pvm
from pyhv.machine.cpuid import CpuidEntry


def test_hide_features_clears_only_leaf1_ecx_bits():
    entries = [CpuidEntry(1, 0, 0, 1, 2, 0xFFFF_FFFF, 4), CpuidEntry(7, 0, 1, 0, 0, 0xFFFF, 0)]
    out = hide_features(entries, CPUID_1_ECX_CX16)
    assert out[0].ecx == 0xFFFF_FFFF & ~CPUID_1_ECX_CX16
    assert out[0][:3] == entries[0][:3] and out[0].edx == 4
    assert out[1] == entries[1]


def test_pvm_probe_reads_the_module_directory(tmp_path):
    assert host_is_pvm(str(tmp_path)) is True
    assert host_is_pvm(str(tmp_path / "absent")) is False
