"""The data a VMM hands a Linux kernel at entry: boot_params (the "zero page") for the 64-bit
boot protocol, hvm_start_info for the PVH entry, and where the initrd goes.

Offsets follow Documentation/arch/x86/zero-page.rst and boot.rst (struct boot_params in
arch/x86/include/uapi/asm/bootparam.h) and Xen's public arch-x86/hvm/start_info.h.
"""

from __future__ import annotations

import struct

from pyhv.errors import PyhvError
from pyhv.machine.layout import PAGE_SIZE, MiB

ZERO_PAGE_SIZE = 4096

# struct boot_params offsets (zero-page.rst)
BP_ACPI_RSDP_ADDR = 0x070  # u64, boot protocol 2.14+
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SETUP_HEADER = 0x1F1  # struct setup_header starts here ...
BP_SETUP_HEADER_END = 0x290  # ... and must end before edd_mbr_sig_buffer
BP_E820_TABLE = 0x2D0
E820_ENTRY_SIZE = 20  # packed { u64 addr; u64 size; u32 type; }
E820_MAX_ENTRIES = 128  # E820_MAX_ENTRIES_ZEROPAGE

# struct setup_header fields, as absolute zero-page offsets (boot.rst)
HDR_VID_MODE = 0x1FA
HDR_BOOT_FLAG = 0x1FE
HDR_MAGIC = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_INITRD_ADDR_MAX = 0x22C
HDR_KERNEL_ALIGNMENT = 0x230
HDR_CMDLINE_SIZE = 0x238

BOOT_FLAG = 0xAA55
HDR_MAGIC_VALUE = b"HdrS"
ELF_BOOT_PROTOCOL = 0x020F  # what we claim for an ELF kernel (no setup header of its own)
ELF_KERNEL_ALIGNMENT = 0x1000000
LOADER_TYPE_UNDEFINED = 0xFF  # "boot loader has no assigned id"
LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
HEAP_END_PTR = 0xE000 - 0x200  # boot.rst: end of setup heap minus 0x200 (real-mode segment)
VID_MODE_NORMAL = 0xFFFF

# Xen hvm_start_info (version 1) for the PVH entry point
XEN_HVM_START_MAGIC = 0x336EC578
_START_INFO = struct.Struct("<IIIIQQQQII")  # magic version flags nr_modules modlist cmdline
#                                              rsdp memmap_paddr memmap_entries reserved
_MODLIST_ENTRY = struct.Struct("<QQQQ")  # paddr size cmdline_paddr reserved
_MEMMAP_ENTRY = struct.Struct("<QQII")  # addr size type reserved
_E820_ENTRY = struct.Struct("<QQI")
assert _START_INFO.size == 56 and _MODLIST_ENTRY.size == 32 and _MEMMAP_ENTRY.size == 24


def _split64(value: int) -> tuple[int, int]:
    return value & 0xFFFFFFFF, value >> 32


def build_zero_page(
    setup_header: bytes,
    e820: list[tuple[int, int, int]],
    cmdline_addr: int,
    cmdline_size: int,
    initrd_addr: int = 0,
    initrd_size: int = 0,
    rsdp_addr: int = 0,
) -> bytes:
    """The 4 KiB boot_params the 64-bit entry reads through %rsi.

    `setup_header` is the bzImage's bytes from 0x1f1 to the end of its header (or b"" for an
    ELF vmlinux, for which we fabricate the fields the kernel checks). `cmdline_size` is the
    command line length without its NUL; it is checked against the kernel's own limit.
    """
    if len(setup_header) > BP_SETUP_HEADER_END - BP_SETUP_HEADER:
        raise PyhvError(f"setup header of {len(setup_header)} bytes overruns the zero page")
    if len(e820) > E820_MAX_ENTRIES:
        raise PyhvError(f"{len(e820)} e820 entries: the zero page holds {E820_MAX_ENTRIES}")
    if cmdline_addr < 0 or initrd_addr < 0 or initrd_size < 0 or cmdline_size < 0:
        raise PyhvError("negative address or size in the boot parameters")
    zp = bytearray(ZERO_PAGE_SIZE)
    if setup_header:
        zp[BP_SETUP_HEADER : BP_SETUP_HEADER + len(setup_header)] = setup_header
        if zp[HDR_MAGIC : HDR_MAGIC + 4] != HDR_MAGIC_VALUE:
            raise PyhvError("kernel has no Linux boot header (no 'HdrS' at offset 0x202)")
        version = struct.unpack_from("<H", zp, HDR_VERSION)[0]
        header_end = BP_SETUP_HEADER + len(setup_header)
        if version >= 0x0206 and header_end >= HDR_CMDLINE_SIZE + 4:
            limit = struct.unpack_from("<I", zp, HDR_CMDLINE_SIZE)[0]
            if cmdline_size > limit:
                raise PyhvError(
                    f"kernel command line is {cmdline_size} bytes; this kernel takes {limit}"
                )
        if version < 0x020C and (cmdline_addr >> 32 or (initrd_addr + initrd_size) >> 32):
            raise PyhvError("kernel boot protocol < 2.12 cannot take data above 4 GiB")
    else:
        struct.pack_into("<H", zp, HDR_BOOT_FLAG, BOOT_FLAG)
        zp[HDR_MAGIC : HDR_MAGIC + 4] = HDR_MAGIC_VALUE
        struct.pack_into("<H", zp, HDR_VERSION, ELF_BOOT_PROTOCOL)
        zp[HDR_LOADFLAGS] = LOADED_HIGH
        struct.pack_into("<I", zp, HDR_KERNEL_ALIGNMENT, ELF_KERNEL_ALIGNMENT)
        struct.pack_into("<I", zp, HDR_CMDLINE_SIZE, cmdline_size)

    zp[HDR_TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    zp[HDR_LOADFLAGS] |= CAN_USE_HEAP  # keeps LOADED_HIGH from the kernel's header
    struct.pack_into("<H", zp, HDR_VID_MODE, VID_MODE_NORMAL)
    struct.pack_into("<H", zp, HDR_HEAP_END_PTR, HEAP_END_PTR)

    cmd_lo, cmd_hi = _split64(cmdline_addr)
    struct.pack_into("<I", zp, HDR_CMD_LINE_PTR, cmd_lo)
    struct.pack_into("<I", zp, BP_EXT_CMD_LINE_PTR, cmd_hi)
    if initrd_size:
        img_lo, img_hi = _split64(initrd_addr)
        size_lo, size_hi = _split64(initrd_size)
        struct.pack_into("<II", zp, HDR_RAMDISK_IMAGE, img_lo, size_lo)
        struct.pack_into("<II", zp, BP_EXT_RAMDISK_IMAGE, img_hi, size_hi)

    struct.pack_into("<Q", zp, BP_ACPI_RSDP_ADDR, rsdp_addr)   # spares the kernel its scan
    zp[BP_E820_ENTRIES] = len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        _E820_ENTRY.pack_into(zp, BP_E820_TABLE + i * E820_ENTRY_SIZE, addr, size, kind)
    return bytes(zp)


def build_pvh_start_info(
    base_addr: int,
    e820: list[tuple[int, int, int]],
    cmdline_addr: int,
    initrd_addr: int = 0,
    initrd_size: int = 0,
    rsdp_addr: int = 0,
) -> bytes:
    """hvm_start_info (version 1) + optional initrd module + memory map, to write at base_addr.

    The PVH entry gets its address in %ebx; every pointer inside is absolute, so it is computed
    from `base_addr` here rather than by the caller.
    """
    nr_modules = 1 if initrd_size else 0
    modlist_off = _START_INFO.size
    memmap_off = modlist_off + nr_modules * _MODLIST_ENTRY.size
    total = memmap_off + len(e820) * _MEMMAP_ENTRY.size
    if base_addr < 0 or (base_addr + total) >> 32:
        raise PyhvError(f"PVH start info at {base_addr:#x} must lie below 4 GiB")
    buf = bytearray(total)
    _START_INFO.pack_into(
        buf,
        0,
        XEN_HVM_START_MAGIC,
        1,  # version 1: has memmap_paddr/memmap_entries
        0,  # flags
        nr_modules,
        base_addr + modlist_off if nr_modules else 0,
        cmdline_addr,
        rsdp_addr,
        base_addr + memmap_off if e820 else 0,
        len(e820),
        0,
    )
    if nr_modules:
        _MODLIST_ENTRY.pack_into(buf, modlist_off, initrd_addr, initrd_size, 0, 0)
    for i, (addr, size, kind) in enumerate(e820):
        _MEMMAP_ENTRY.pack_into(buf, memmap_off + i * _MEMMAP_ENTRY.size, addr, size, kind, 0)
    return bytes(buf)


def initrd_address(
    initrd_size: int, mem_low_end: int, initrd_addr_max: int, kernel_end: int
) -> int:
    """Highest page-aligned address for the initrd: as far from the kernel as possible, so the
    decompressor and early allocations above the kernel do not run into it.

    `initrd_addr_max` comes from the setup header (0x37ffffff for protocol < 2.03, 0xffffffff
    for an ELF kernel); `mem_low_end` is layout.low_ram_end(mem_size). Returns 0 for no initrd.
    """
    if initrd_size <= 0:
        return 0
    limit = min(initrd_addr_max + 1, mem_low_end)
    addr = (limit - initrd_size) & ~(PAGE_SIZE - 1)
    if addr < kernel_end or addr < 0:
        raise PyhvError(
            f"initrd ({round(initrd_size / MiB, 1):g} MiB) does not fit in guest RAM"
            f" below {limit:#x} above the kernel (ends at {kernel_end:#x})"
        )
    return addr
