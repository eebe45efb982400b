"""Per-vCPU CPUID and the MSR values a Linux guest expects at entry.

KVM_GET_SUPPORTED_CPUID describes the host CPU as KVM can virtualize it, but topology fields
(APIC ids, logical processor counts, cache sharing) still describe the host. A guest that
reads them wrongly computes a wrong topology (or hangs bringing up CPUs that do not exist),
so they are rewritten here for this vCPU and this VM's CPU count; other leaves pass through.
"""

from __future__ import annotations

from typing import NamedTuple

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1  # spelling as in linux/kvm.h

# leaf 1
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_HTT = 1 << 28
CLFLUSH_LINE_8B = 8  # CLFLUSH line size in 8-byte units: 64 bytes
# leaf 6
LEAF6_ECX_ENERGY_PERF_BIAS = 1 << 3
# leaves 0xB / 0x1F: level types
TOPO_LEVEL_INVALID = 0
TOPO_LEVEL_SMT = 1
TOPO_LEVEL_CORE = 2
# KVM paravirt leaves
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_SIGNATURE_REGS = (0x4B4D564B, 0x564B4D56, 0x0000004D)  # "KVMKVMKVM\0\0\0" in ebx/ecx/edx

# MSRs (Intel SDM vol. 4)
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_MEM_TYPE_WB = 6


class CpuidEntry(NamedTuple):
    """One `struct kvm_cpuid_entry2` (without its padding)."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0


def _pow2_ceil(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _topology_leaf(function: int, cpu_index: int, num_cpus: int) -> list[CpuidEntry]:
    """Extended topology (0xB / 0x1F): one thread per core, num_cpus cores in one package."""
    flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    core_shift = (num_cpus - 1).bit_length()  # bits of x2APIC id below the package id
    return [
        CpuidEntry(function, 0, flags, 0, 1, (TOPO_LEVEL_SMT << 8) | 0, cpu_index),
        CpuidEntry(function, 1, flags, core_shift, num_cpus, (TOPO_LEVEL_CORE << 8) | 1, cpu_index),
        CpuidEntry(function, 2, flags, 0, 0, (TOPO_LEVEL_INVALID << 8) | 2, cpu_index),
    ]


def guest_cpuid(supported: list[CpuidEntry], cpu_index: int, num_cpus: int) -> list[CpuidEntry]:
    """The CPUID table for vCPU `cpu_index` (its APIC id) of a `num_cpus` VM, for KVM_SET_CPUID2.

    Topology: every vCPU is a single-threaded core of one package. Leaves not named here are
    kept exactly as KVM reported them; the KVM paravirt leaves are added if missing so the
    guest detects KVM (kvm-clock, PV EOI, ...) even on hosts that do not list them.
    """
    if not 0 <= cpu_index < num_cpus:
        raise ValueError(f"cpu_index {cpu_index} outside 0..{num_cpus - 1}")
    addressable = min(_pow2_ceil(num_cpus), 0xFF)  # logical processor ids per package
    out: list[CpuidEntry] = []
    rebuilt: set[int] = set()
    for e in supported:
        fn = e.function
        if fn == 1:
            ebx = (e.ebx & 0xFF) | (CLFLUSH_LINE_8B << 8) | (addressable << 16)
            ebx |= (cpu_index & 0xFF) << 24
            edx = (e.edx | LEAF1_EDX_HTT) if num_cpus > 1 else (e.edx & ~LEAF1_EDX_HTT)
            e = e._replace(ebx=ebx, ecx=e.ecx | LEAF1_ECX_HYPERVISOR, edx=edx)
        elif fn == 4:
            if e.eax & 0x1F:  # a real cache descriptor (type 0 ends the list)
                level = (e.eax >> 5) & 0x7
                sharing = _pow2_ceil(num_cpus) - 1 if level >= 3 else 0  # LLC is shared
                cores = min(_pow2_ceil(num_cpus), 64) - 1
                eax = (e.eax & 0x3FFF) | (min(sharing, 0xFFF) << 14) | (cores << 26)
                e = e._replace(eax=eax)
        elif fn == 6:
            e = e._replace(ecx=e.ecx & ~LEAF6_ECX_ENERGY_PERF_BIAS)
        elif fn in (0xB, 0x1F):
            if fn not in rebuilt:
                out.extend(_topology_leaf(fn, cpu_index, num_cpus))
                rebuilt.add(fn)
            continue
        out.append(e)

    functions = {e.function for e in out}
    if KVM_CPUID_SIGNATURE not in functions:
        out.append(CpuidEntry(KVM_CPUID_SIGNATURE, 0, 0, KVM_CPUID_FEATURES, *KVM_SIGNATURE_REGS))
    if KVM_CPUID_FEATURES not in functions:
        out.append(CpuidEntry(KVM_CPUID_FEATURES))
    return out


def boot_msrs() -> list[tuple[int, int]]:
    """(index, value) for KVM_SET_MSRS before the first run, as other VMMs set them: syscall
    MSRs cleared, TSC at 0, fast strings on, and MTRRs enabled with write-back as the default
    type (otherwise Linux sees all memory as uncacheable and runs very slowly).
    """
    return [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
