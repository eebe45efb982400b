"""Per-vCPU state a Linux guest expects before its first instruction: CPUID with the APIC
ID and KVM's paravirt leaves, boot MSRs, FPU, XCR0, and the local APIC's LINT pins."""

from __future__ import annotations

import os
import struct

from pyhv.machine.cpuid import CpuidEntry, boot_msrs, guest_cpuid

XCR0_X87, XCR0_SSE = 0x1, 0x2
LVT_LINT0, LVT_LINT1 = 0x350, 0x360
DELIVERY_EXTINT, DELIVERY_NMI = 0x7 << 8, 0x4 << 8
LVT_MASKED = 1 << 16
CPUID_1_ECX_XSAVE = 1 << 26
CPUID_1_ECX_CX16 = 1 << 13
PVM_HIDDEN_LEAF1_ECX = CPUID_1_ECX_CX16
PVM_MODULE = "/sys/module/kvm_pvm"


def host_is_pvm(module_path: str = PVM_MODULE) -> bool:
    """PVM-based KVM emulates guest supervisor code, and its emulator lacks
    `lock cmpxchg16b`: a guest kernel that uses it (Linux's per-CPU allocator does, early)
    stops with an emulation failure, so pyhv hides CX16 on PVM hosts."""
    return os.path.isdir(module_path)


def hide_features(entries: list[CpuidEntry], leaf1_ecx_mask: int) -> list[CpuidEntry]:
    """Clear CPUID.1:ECX bits the host cannot honour (the guest then takes its fallback)."""
    return [e._replace(ecx=e.ecx & ~leaf1_ecx_mask) if e.function == 1 else e for e in entries]


def configure_vcpu(vcpu, supported_cpuid: list[tuple], cpu_index: int, num_cpus: int,
                   irqchip: bool) -> None:
    """Program one vCPU; `supported_cpuid` is Kvm.supported_cpuid()."""
    entries = guest_cpuid([CpuidEntry(*e) for e in supported_cpuid], cpu_index, num_cpus)
    if host_is_pvm():
        entries = hide_features(entries, PVM_HIDDEN_LEAF1_ECX)
    vcpu.set_cpuid([tuple(e) for e in entries])
    vcpu.set_msrs(boot_msrs())
    vcpu.set_fpu()
    leaf1 = next((e for e in entries if e.function == 1), None)
    if leaf1 is not None and leaf1.ecx & CPUID_1_ECX_XSAVE:
        vcpu.set_xcr0(XCR0_X87 | XCR0_SSE)
    if irqchip:
        # As a PC's BIOS leaves them: LINT0 takes the 8259's ExtINT, LINT1 is NMI, both
        # unmasked, so a guest that never touches its local APIC still gets PIC interrupts.
        lapic = vcpu.get_lapic()
        for offset, mode in ((LVT_LINT0, DELIVERY_EXTINT), (LVT_LINT1, DELIVERY_NMI)):
            (value,) = struct.unpack_from("<I", lapic, offset)
            struct.pack_into("<I", lapic, offset, (value & ~(0x700 | LVT_MASKED)) | mode)
        vcpu.set_lapic(lapic)
