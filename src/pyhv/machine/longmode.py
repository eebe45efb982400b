"""CPU state for entering a Linux kernel directly, without firmware: boot page tables, the boot
GDT, and the special registers (as `struct kvm_sregs` fields) for the 64-bit boot protocol
entry and for the 32-bit PVH entry.

The GDT follows Linux's own boot GDT (arch/x86/boot/compressed/head_64.S): the 64-bit boot
protocol requires __BOOT_CS = 0x10 and __BOOT_DS = 0x18 as flat 4 GiB segments, and the
32-bit code segment at 0x08 serves the PVH entry, so one table fits both.
"""

from __future__ import annotations

import struct

PAGE_SIZE = 0x1000
PAGE_2M = 0x200000

# page table entry bits (Intel SDM vol. 3 4.5)
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_PS = 1 << 7  # in a PD entry: maps a 2 MiB page
IDENTITY_MAP_SIZE = 4 << 30
PAGE_TABLES_SIZE = 6 * PAGE_SIZE  # PML4 + PDPT + 4 PDs

# control registers and EFER
CR0_PE = 1 << 0  # protected mode
CR0_ET = 1 << 4  # extension type: hardwired to 1 on every CPU since the P6
CR0_PG = 1 << 31  # paging
CR4_PAE = 1 << 5  # required for long mode
EFER_LME = 1 << 8  # long mode enable
EFER_LMA = 1 << 10  # long mode active (KVM_SET_SREGS takes it as given)
LONG_MODE_CR0 = CR0_PE | CR0_ET | CR0_PG
LONG_MODE_CR4 = CR4_PAE
LONG_MODE_EFER = EFER_LME | EFER_LMA
PROTECTED_MODE_CR0 = CR0_PE | CR0_ET  # PVH ABI: PE set, paging off

# boot GDT (selectors = index * 8)
GDT_ENTRIES = (
    0x0000000000000000,  # 0x00 null
    0x00CF9B000000FFFF,  # 0x08 32-bit code, flat 4 GiB (PVH entry)
    0x00AF9B000000FFFF,  # 0x10 __BOOT_CS: 64-bit code
    0x00CF93000000FFFF,  # 0x18 __BOOT_DS: data, flat 4 GiB
    0x00008B0000000067,  # 0x20 TSS (busy, base 0, limit 0x67) ...
    0x0000000000000000,  # 0x28 ... upper half of the 16-byte long-mode TSS descriptor
)
CODE32_SELECTOR = 0x08
BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20
GDT_SIZE = 8 * len(GDT_ENTRIES)
IDT_LIMIT = 7  # one (zeroed, not-present) gate: any early exception is a triple fault


def identity_page_tables(pml4_addr: int) -> bytes:
    """PML4, PDPT and four PDs mapping 0-4 GiB 1:1 with 2 MiB pages, to write at pml4_addr.

    4 GiB covers the kernel, zero page, command line and initrd wherever the loader puts them
    in low RAM, and the MMIO hole; Linux builds its own tables right after entry.
    """
    if pml4_addr % PAGE_SIZE:
        raise ValueError(f"page tables must be page-aligned, got {pml4_addr:#x}")
    rw = PTE_PRESENT | PTE_WRITABLE
    pdpt = pml4_addr + PAGE_SIZE
    pd0 = pdpt + PAGE_SIZE
    pml4 = struct.pack("<Q", pdpt | rw).ljust(PAGE_SIZE, b"\0")
    pdpt_page = struct.pack("<4Q", *range(pd0 | rw, pd0 + 4 * PAGE_SIZE, PAGE_SIZE))
    n = IDENTITY_MAP_SIZE // PAGE_2M
    pds = struct.pack(f"<{n}Q", *range(rw | PTE_PS, IDENTITY_MAP_SIZE, PAGE_2M))
    return pml4 + pdpt_page.ljust(PAGE_SIZE, b"\0") + pds


def gdt() -> bytes:
    """The boot GDT, to write at layout.BOOT_GDT (48 bytes)."""
    return struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES)


def segment(selector: int, table: bytes | None = None) -> dict:
    """Decode the GDT descriptor for `selector` into `struct kvm_segment` fields.

    KVM_SET_SREGS loads the hidden descriptor cache from these fields instead of reading guest
    memory, so they must agree with the table the guest will later reload from.
    """
    table = gdt() if table is None else table
    index = selector >> 3
    if index * 8 + 8 > len(table):
        raise ValueError(f"selector {selector:#x} is beyond the GDT")
    (desc,) = struct.unpack_from("<Q", table, index * 8)
    limit = (desc & 0xFFFF) | ((desc >> 32) & 0xF0000)
    base = ((desc >> 16) & 0xFFFFFF) | (((desc >> 56) & 0xFF) << 24)
    access = (desc >> 40) & 0xFF
    flags = (desc >> 52) & 0xF
    g = (flags >> 3) & 1
    if g:
        limit = (limit << 12) | 0xFFF
    present = access >> 7
    return {
        "base": base,
        "limit": limit,
        "selector": selector,
        "type": access & 0xF,
        "present": present,
        "dpl": (access >> 5) & 3,
        "db": (flags >> 2) & 1,
        "s": (access >> 4) & 1,
        "l": (flags >> 1) & 1,
        "g": g,
        "avl": flags & 1,
        "unusable": 0 if present else 1,
    }


def _sregs(code: int, cr0: int, cr3: int, cr4: int, efer: int, gdt_addr: int, idt_addr: int):
    data = segment(BOOT_DS)
    return {
        "cr0": cr0,
        "cr3": cr3,
        "cr4": cr4,
        "efer": efer,
        "cs": segment(code),
        **{name: dict(data) for name in ("ds", "es", "fs", "gs", "ss")},
        "tr": segment(BOOT_TSS),
        "gdt": {"base": gdt_addr, "limit": GDT_SIZE - 1},
        "idt": {"base": idt_addr, "limit": IDT_LIMIT},
    }


def long_mode_sregs(pml4_addr: int, gdt_addr: int, idt_addr: int) -> dict:
    """Special registers for the 64-bit boot protocol entry (boot.rst "64-bit BOOT PROTOCOL"):
    paging on with the identity map, CS = __BOOT_CS, DS/ES/SS = __BOOT_DS.
    """
    return _sregs(BOOT_CS, LONG_MODE_CR0, pml4_addr, LONG_MODE_CR4, LONG_MODE_EFER,
                  gdt_addr, idt_addr)  # fmt: skip


def protected_mode_sregs(gdt_addr: int, idt_addr: int) -> dict:
    """Special registers for the PVH entry (Xen docs/misc/pvh.pandoc): 32-bit flat protected
    mode, paging off, CS 32-bit code, DS/ES/SS flat data, TR a busy 32-bit TSS with limit 0x67.
    """
    return _sregs(CODE32_SELECTOR, PROTECTED_MODE_CR0, 0, 0, 0, gdt_addr, idt_addr)
