"""Boot structures a VMM writes into guest memory: memory map, zero page, PVH start info,
MP table, page tables, GDT, CPUID. Each is checked against the spec offsets independently of
the builder's own constants, or read back by a separate reference reader/walker.
"""

from __future__ import annotations

import struct

import pytest

from pyhv.errors import PyhvError
from pyhv.machine import bootparams, cpuid, layout, longmode, mptable
from pyhv.machine.cpuid import CpuidEntry

MiB, GiB = 1 << 20, 1 << 30


# ---------------------------------------------------------------- layout ----------------------


@pytest.mark.parametrize("mem_size", [64 * MiB, 3 * GiB, 8 * GiB, 3 * GiB + 4096])
def test_e820_sorted_disjoint_and_accounts_for_all_ram(mem_size: int) -> None:
    e820 = layout.e820_map(mem_size)
    assert e820 == sorted(e820)
    for (a, s, _), (b, _, _) in zip(e820, e820[1:], strict=False):
        assert a + s <= b, "entries overlap"
    ram = [(a, s) for a, s, t in e820 if t == 1]
    reserved_low = layout.HIMEM_START - layout.EBDA_START
    assert sum(s for _, s in ram) == mem_size - reserved_low
    assert (0, 0x9FC00) in ram
    assert (0x9FC00, 0x100000 - 0x9FC00, 2) in e820
    # nothing usable inside the MMIO hole
    for a, s in ram:
        assert a + s <= 0xC000_0000 or a >= 1 << 32
    if mem_size > 3 * GiB:
        assert ((1 << 32), mem_size - 3 * GiB) in ram
        assert layout.ram_regions(mem_size) == [(0, 3 * GiB), (1 << 32, mem_size - 3 * GiB)]
    else:
        assert max(a + s for a, s in ram) == mem_size
        assert layout.ram_regions(mem_size) == [(0, mem_size)]


def test_layout_low_structures_do_not_overlap() -> None:
    ranges = sorted(
        [
            (layout.BOOT_GDT, layout.BOOT_GDT + len(longmode.gdt())),
            (layout.BOOT_IDT, layout.BOOT_IDT + longmode.IDT_LIMIT + 1),
            (layout.PVH_START_INFO, layout.PVH_START_INFO + 0x1000),
            (layout.ZERO_PAGE, layout.ZERO_PAGE + 0x1000),
            (layout.PML4_START, layout.PML4_START + longmode.PAGE_TABLES_SIZE),
            (layout.CMDLINE_START, layout.CMDLINE_START + layout.CMDLINE_MAX_SIZE),
            (layout.MPTABLE_START, layout.MPTABLE_LIMIT),
        ]
    )
    for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert end <= start
    assert layout.PML4_START + longmode.PAGE_TABLES_SIZE == layout.PAGE_TABLES_END
    assert layout.BOOT_STACK_TOP < layout.PML4_START


_SIZES = {"512m": 512 * MiB, "512M": 512 * MiB, "2G": 2 * GiB, "2g": 2 * GiB, "1GiB": GiB,
          "1gb": GiB, "1024": GiB, "64k": 64 << 10, "4096b": 4096, "4096B": 4096,
          "1t": 1 << 40, " 256MiB ": 256 * MiB, "1.5g": 3 * GiB // 2}  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), _SIZES.items())  # "1024": bare = MiB, as QEMU -m
def test_parse_size(text: str, expected: int) -> None:
    assert layout.parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "abc", "12x", "-5", "g", "1.5b", "0.1k", "12 m", "5iB", "0x100", "1e3", "1..5g"]
)
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(PyhvError, match="size"):
        layout.parse_size(text)


def test_validate_memory() -> None:
    layout.validate_memory(64 * MiB, host_total=8 * GiB)
    with pytest.raises(PyhvError, match="too small"):
        layout.validate_memory(4 * MiB, host_total=8 * GiB)
    with pytest.raises(PyhvError, match="exceeds the host"):
        layout.validate_memory(16 * GiB, host_total=8 * GiB)
    with pytest.raises(PyhvError, match="too large"):
        layout.validate_memory(2 << 40, host_total=4 << 40)
    with pytest.raises(PyhvError):
        layout.validate_memory(64 * MiB + 1, host_total=8 * GiB)
    # the real host: 16 MiB always fits, a petabyte never does
    layout.validate_memory(layout.MIN_MEMORY)
    with pytest.raises(PyhvError):
        layout.validate_memory(1 << 50)


# ---------------------------------------------------------------- zero page -------------------


def _fake_setup_header(version: int = 0x020F, cmdline_max: int = 2047) -> bytes:
    """A bzImage setup header 0x1f1..0x26c with recognisable bytes in untouched fields."""
    hdr = bytearray(range(1, 0x26C - 0x1F1 + 1))

    def put(fmt: str, off: int, *v: int | bytes) -> None:
        struct.pack_into(fmt, hdr, off - 0x1F1, *v)

    put("<4s", 0x202, b"HdrS")
    put("<H", 0x206, version)
    put("<B", 0x211, 0x01)  # LOADED_HIGH
    put("<I", 0x238, cmdline_max)
    put("<I", 0x22C, 0x7FFFFFFF)
    return bytes(hdr)


def test_zero_page_fields_at_documented_offsets() -> None:
    hdr = _fake_setup_header()
    e820 = layout.e820_map(8 * GiB)
    zp = bootparams.build_zero_page(hdr, e820, 0x20000, 100, 0x3F000000, 0x123456)
    assert len(zp) == 4096
    u8 = lambda off: zp[off]  # noqa: E731
    u16 = lambda off: struct.unpack_from("<H", zp, off)[0]  # noqa: E731
    u32 = lambda off: struct.unpack_from("<I", zp, off)[0]  # noqa: E731
    assert u8(0x210) == 0xFF  # type_of_loader
    assert u8(0x211) == 0x81  # LOADED_HIGH kept, CAN_USE_HEAP set
    assert u32(0x228) == 0x20000  # cmd_line_ptr
    assert u32(0x0C8) == 0  # ext_cmd_line_ptr
    assert (u32(0x218), u32(0x21C)) == (0x3F000000, 0x123456)  # ramdisk_image/size
    assert (u32(0x0C0), u32(0x0C4)) == (0, 0)
    assert u16(0x1FA) == 0xFFFF  # vid_mode
    assert u16(0x224) == 0xDE00  # heap_end_ptr
    assert u8(0x1E8) == len(e820)
    for i, entry in enumerate(e820):
        assert struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) == entry
    assert zp[0x2D0 + 20 * len(e820) : 0x2D0 + 20 * len(e820) + 20] == bytes(20)
    # everything else in the header region is the kernel's, byte for byte
    changed = {0x1FA, 0x1FB, 0x210, 0x211, *range(0x218, 0x220), 0x224, 0x225, *range(0x228, 0x22C)}
    for off in range(0x1F1, 0x26C):
        if off not in changed:
            assert zp[off] == hdr[off - 0x1F1], hex(off)
    assert zp[:0x0C0] == bytes(0x0C0)


def test_zero_page_high_addresses_use_ext_fields() -> None:
    zp = bootparams.build_zero_page(
        _fake_setup_header(), [], 0x1_2345_6000, 10, 0x2_0000_1000, 0x1_0000_0001
    )

    def lo_hi(lo: int, hi: int) -> int:
        return struct.unpack_from("<I", zp, lo)[0] | struct.unpack_from("<I", zp, hi)[0] << 32

    assert lo_hi(0x228, 0x0C8) == 0x1_2345_6000
    assert lo_hi(0x218, 0x0C0) == 0x2_0000_1000
    assert lo_hi(0x21C, 0x0C4) == 0x1_0000_0001


def test_zero_page_for_elf_kernel_fabricates_header() -> None:
    zp = bootparams.build_zero_page(b"", layout.e820_map(64 * MiB), 0x20000, 42)
    assert zp[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", zp, 0x1FE)[0] == 0xAA55
    assert struct.unpack_from("<H", zp, 0x206)[0] == 0x020F
    assert struct.unpack_from("<I", zp, 0x230)[0] == 0x1000000
    assert struct.unpack_from("<I", zp, 0x238)[0] == 42
    assert zp[0x210] == 0xFF and zp[0x211] & 0x80
    assert struct.unpack_from("<II", zp, 0x218) == (0, 0)


def test_zero_page_errors() -> None:
    with pytest.raises(PyhvError, match="e820"):
        bootparams.build_zero_page(b"", [(0, 4096, 1)] * 129, 0x20000, 1)
    with pytest.raises(PyhvError, match="command line"):
        bootparams.build_zero_page(_fake_setup_header(cmdline_max=255), [], 0x20000, 256)
    with pytest.raises(PyhvError, match="HdrS"):
        bootparams.build_zero_page(bytes(0x7B), [], 0x20000, 1)
    with pytest.raises(PyhvError):
        bootparams.build_zero_page(bytes(0x200), [], 0x20000, 1)


# ---------------------------------------------------------------- PVH -------------------------


@pytest.mark.parametrize("initrd", [(0, 0), (0x3000_0000, 5 * MiB)])
def test_pvh_start_info_layout(initrd: tuple[int, int]) -> None:
    base = layout.PVH_START_INFO
    e820 = layout.e820_map(8 * GiB)
    blob = bootparams.build_pvh_start_info(base, e820, 0x20000, *initrd)
    magic, version, flags, nr_mod, modlist, cmdline, rsdp, memmap, nmem, _ = struct.unpack_from(
        "<IIIIQQQQII", blob, 0
    )
    assert (magic, version, flags, cmdline, rsdp) == (0x336EC578, 1, 0, 0x20000, 0)
    assert nmem == len(e820)
    inside = lambda addr, size: base <= addr and addr + size <= base + len(blob)  # noqa: E731
    assert inside(memmap, 24 * nmem) and memmap >= base + 56
    for i, (addr, size, kind) in enumerate(e820):
        assert struct.unpack_from("<QQII", blob, memmap - base + 24 * i) == (addr, size, kind, 0)
    if initrd[1]:
        assert nr_mod == 1 and inside(modlist, 32)
        assert struct.unpack_from("<QQQQ", blob, modlist - base) == (*initrd, 0, 0)
        assert not (modlist < memmap + 24 * nmem and memmap < modlist + 32)
    else:
        assert (nr_mod, modlist) == (0, 0)
    assert len(blob) <= 0x1000  # fits in its page below the zero page


# ---------------------------------------------------------------- initrd ----------------------


def test_initrd_address_is_highest_aligned_fit() -> None:
    size = 5 * MiB + 123
    addr = bootparams.initrd_address(size, 64 * MiB, 0x7FFFFFFF, 20 * MiB)
    assert addr % 4096 == 0
    assert addr + size <= 64 * MiB and addr + size > 64 * MiB - 4096
    assert addr >= 20 * MiB
    # initrd_addr_max is the last usable byte
    addr = bootparams.initrd_address(size, 3 * GiB, 0x37FFFFFF, 20 * MiB)
    assert addr + size <= 0x38000000 and addr % 4096 == 0
    assert addr + size > 0x38000000 - 4096
    assert bootparams.initrd_address(0, 64 * MiB, 0x7FFFFFFF, 20 * MiB) == 0


def test_initrd_too_big() -> None:
    with pytest.raises(PyhvError, match=r"initrd \(50 MiB\) does not fit in guest RAM below"):
        bootparams.initrd_address(50 * MiB, 64 * MiB, 0x7FFFFFFF, 20 * MiB)
    with pytest.raises(PyhvError):
        bootparams.initrd_address(128 * MiB, 64 * MiB, 0x7FFFFFFF, 0)


# ---------------------------------------------------------------- MP table --------------------


@pytest.mark.parametrize("num_cpus", [1, 2, 64, mptable.MAX_CPUS])
def test_mptable_round_trip(num_cpus: int) -> None:
    pci = [(1, 0, 16), (2, 1, 17), (3, 3, 18)]
    blob = mptable.build_mptable(layout.MPTABLE_START, num_cpus, pci_interrupts=pci)
    t = mptable.parse_mptable(blob, layout.MPTABLE_START)
    assert t["cpus"] == list(range(num_cpus))
    assert t["bsp"] == 0
    assert t["ioapic"] == (num_cpus, 0xFEC00000)
    assert t["lapic_addr"] == 0xFEE00000
    assert t["buses"] == {0: "PCI", 1: "ISA"}
    assert t["oem"] == "PYHV"
    isa = {e.src_irq: e.dest_pin for e in t["irqs"] if e.src_bus == 1}
    assert isa == {0: 2, **{i: i for i in range(1, 16) if i != 2}}
    assert all(e.dest_apic == num_cpus and e.kind == mptable.MP_INT for e in t["irqs"])
    pci_seen = [(e.src_irq >> 2, e.src_irq & 3, e.dest_pin, e.flags) for e in t["irqs"]
                if e.src_bus == 0]  # fmt: skip
    assert pci_seen == [(s, p, i, 0x0F) for s, p, i in pci]
    lints = {(e.kind, e.dest_pin): e.dest_apic for e in t["lints"]}
    assert lints == {(mptable.MP_EXTINT, 0): 0, (mptable.MP_NMI, 1): 0xFF}
    assert len(blob) <= mptable.mptable_max_size(num_cpus, len(pci))
    assert layout.MPTABLE_START + len(blob) <= layout.MPTABLE_LIMIT


def test_mptable_floating_pointer_where_linux_scans() -> None:
    assert 0x9FC00 <= layout.MPTABLE_START <= 0xA0000 - 16
    # small machines keep the whole table in the EBDA KiB
    blob = mptable.build_mptable(layout.MPTABLE_START, 8)
    assert layout.MPTABLE_START + len(blob) <= 0xA0000
    assert blob[:4] == b"_MP_" and struct.unpack_from("<I", blob, 4)[0] == 0x9FC10
    assert blob[16:20] == b"PCMP" and blob[8] == 1 and blob[9] == 4


def test_mptable_max_cpus_stays_in_reserved_area() -> None:
    assert mptable.MAX_CPUS >= 64
    assert mptable.MAX_CPUS <= 254  # 8-bit APIC ids, 0xff broadcast, one for the IOAPIC
    pci = [(s, p, 16 + (s + p) % 8) for s in range(32) for p in range(4)]
    blob = mptable.build_mptable(layout.MPTABLE_START, mptable.MAX_CPUS, pci_interrupts=pci)
    end = layout.MPTABLE_START + len(blob)
    assert end <= layout.MPTABLE_LIMIT <= layout.HIMEM_START
    reserved = [(a, a + s) for a, s, t in layout.e820_map(64 * MiB) if t == 2]
    assert any(a <= layout.MPTABLE_START and end <= b for a, b in reserved)
    assert len(mptable.parse_mptable(blob)["irqs"]) == 15 + 128


def test_mptable_pci_pin_shadows_isa_irq() -> None:
    blob = mptable.build_mptable(0x9FC00, 2, pci_interrupts=[(4, 0, 5)])
    irqs = mptable.parse_mptable(blob)["irqs"]
    assert [(e.src_bus, e.src_irq) for e in irqs if e.dest_pin == 5] == [(0, 16)]


def test_mptable_timer_pin_0_for_default_kvm_routing() -> None:
    blob = mptable.build_mptable(0x9FC00, 1, timer_pin=0)
    isa = {e.src_irq: e.dest_pin for e in mptable.parse_mptable(blob)["irqs"]}
    assert isa == {i: i for i in range(16)}


@pytest.mark.parametrize("offset", [0, 5, 10, 16, 30, 60, -1])
def test_mptable_checksums_detect_corruption(offset: int) -> None:
    blob = bytearray(mptable.build_mptable(0x9FC00, 4))
    assert sum(blob[:16]) % 256 == 0 and sum(blob[16:]) % 256 == 0
    blob[offset] ^= 0x01
    with pytest.raises(ValueError):
        mptable.parse_mptable(bytes(blob))


def test_mptable_other_base_address() -> None:
    blob = mptable.build_mptable(0xF0000, 3)
    assert mptable.parse_mptable(blob, 0xF0000)["cpus"] == [0, 1, 2]
    with pytest.raises(ValueError):
        mptable.parse_mptable(blob, 0x9FC00)


@pytest.mark.parametrize("n", [0, -1, mptable.MAX_CPUS + 1, 1000])
def test_mptable_cpu_count_limits(n: int) -> None:
    with pytest.raises(PyhvError, match="vCPUs"):
        mptable.build_mptable(layout.MPTABLE_START, n)


def test_mptable_bad_pci_route() -> None:
    with pytest.raises(PyhvError):
        mptable.build_mptable(layout.MPTABLE_START, 1, pci_interrupts=[(32, 0, 16)])
    with pytest.raises(PyhvError):
        mptable.build_mptable(layout.MPTABLE_START, 1, pci_interrupts=[(1, 4, 16)])


# ---------------------------------------------------------------- paging / GDT ----------------


def _translate(mem: dict[int, bytes], cr3: int, va: int) -> int | None:
    """Reference 4-level walker (Intel SDM 4.5) over a {page address: page bytes} memory."""

    def entry(table: int, index: int) -> int:
        page = mem.get(table & ~0xFFF & ((1 << 52) - 1))
        if page is None:
            raise AssertionError(f"table at {table:#x} outside the page-table blob")
        return struct.unpack_from("<Q", page, index * 8)[0]

    table = cr3
    for level, shift in enumerate((39, 30, 21, 12)):
        e = entry(table, (va >> shift) & 0x1FF)
        if not e & 1:
            return None
        assert e & 2, "not writable"
        if level in (1, 2) and e & 0x80:  # 1 GiB or 2 MiB page
            frame = e & ((1 << 52) - 1) & ~((1 << shift) - 1)
            return frame | (va & ((1 << shift) - 1))
        assert not e & 0x80 or level == 3
        table = e & 0x000FFFFFFFFFF000
    return (table) | (va & 0xFFF)


def test_identity_page_tables_map_4gib() -> None:
    base = layout.PML4_START
    blob = longmode.identity_page_tables(base)
    assert len(blob) == 6 * 4096
    mem = {base + i: blob[i : i + 4096] for i in range(0, len(blob), 4096)}
    for va in [0, 0x7000, 0x1FFFFF, 0x200000, 0x1000000 + 0x1234, 0xBFFFFFFF, 0xFEE00000,
               0xFFFFFFFF, 0x12345678]:  # fmt: skip
        assert _translate(mem, base, va) == va, hex(va)
    assert _translate(mem, base, 1 << 32) is None
    assert _translate(mem, base, 0x7FFF_FFFF_F000) is None
    with pytest.raises(ValueError):
        longmode.identity_page_tables(base + 8)


def test_gdt_and_segments() -> None:
    table = longmode.gdt()
    assert struct.unpack_from("<Q", table, 0x10)[0] == 0x00AF9B000000FFFF
    assert struct.unpack_from("<Q", table, 0x18)[0] == 0x00CF93000000FFFF
    cs = longmode.segment(0x10)
    assert cs == {"base": 0, "limit": 0xFFFFFFFF, "selector": 0x10, "type": 0xB, "present": 1,
                  "dpl": 0, "db": 0, "s": 1, "l": 1, "g": 1, "avl": 0, "unusable": 0}  # fmt: skip
    ds = longmode.segment(0x18)
    assert (ds["type"], ds["db"], ds["l"], ds["limit"], ds["s"]) == (3, 1, 0, 0xFFFFFFFF, 1)
    cs32 = longmode.segment(0x08)
    assert (cs32["type"], cs32["db"], cs32["l"], cs32["limit"]) == (0xB, 1, 0, 0xFFFFFFFF)
    tr = longmode.segment(0x20)
    assert (tr["type"], tr["s"], tr["present"], tr["limit"], tr["g"]) == (0xB, 0, 1, 0x67, 0)
    assert longmode.segment(0)["unusable"] == 1
    # base and limit scattered over the descriptor
    desc = struct.pack("<Q", 0x12CF9A345678ABCD)
    seg = longmode.segment(0, desc)
    assert seg["base"] == 0x12345678 and seg["limit"] == 0xFABCD << 12 | 0xFFF
    with pytest.raises(ValueError):
        longmode.segment(0x100)


def test_long_mode_sregs() -> None:
    s = longmode.long_mode_sregs(0x9000, layout.BOOT_GDT, layout.BOOT_IDT)
    assert s["cr0"] & 0x80000001 == 0x80000001
    assert (s["cr3"], s["cr4"], s["efer"]) == (0x9000, 0x20, 0x500)
    assert s["cs"]["selector"] == 0x10 and s["cs"]["l"] == 1
    assert all(s[r]["selector"] == 0x18 for r in ("ds", "es", "fs", "gs", "ss"))
    assert s["gdt"] == {"base": 0x500, "limit": len(longmode.gdt()) - 1}
    assert s["idt"]["base"] == layout.BOOT_IDT
    assert s["tr"]["selector"] == 0x20
    p = longmode.protected_mode_sregs(layout.BOOT_GDT, layout.BOOT_IDT)
    assert p["cr0"] & 0x80000001 == 1 and p["efer"] == 0 and p["cr4"] == 0
    assert p["cs"]["db"] == 1 and p["cs"]["l"] == 0 and p["cs"]["limit"] == 0xFFFFFFFF
    assert p["ss"]["selector"] == 0x18


# ---------------------------------------------------------------- CPUID -----------------------

HOST = [
    CpuidEntry(0, 0, 0, 0x1F, 0x756E6547, 0x6C65746E, 0x49656E69),
    CpuidEntry(1, 0, 0, 0x806C1, 0x12100800, 0x7FFAFBFF, 0xBFEBFBFF & ~(1 << 28)),
    CpuidEntry(4, 0, 1, 0x1C004121, 0x1C0003F, 0x3F, 0),
    CpuidEntry(4, 1, 1, 0x1C004122, 0x1C0003F, 0x3F, 0),
    CpuidEntry(4, 2, 1, 0x1C004143, 0x1C0003F, 0x3FF, 0),
    CpuidEntry(4, 3, 1, 0x1C03C163, 0x3C0003F, 0x3FFF, 6),
    CpuidEntry(4, 4, 1, 0, 0, 0, 0),
    CpuidEntry(6, 0, 0, 0x77, 2, 0x9, 0),
    CpuidEntry(7, 0, 1, 0, 0xF3BFA7EB, 0x18C05FCE, 0xFC100010),
    CpuidEntry(0xB, 0, 1, 1, 2, 0x100, 0x13),
    CpuidEntry(0xB, 1, 1, 4, 8, 0x201, 0x13),
    CpuidEntry(0x80000000, 0, 0, 0x80000008),
]


def _leaf(entries: list[CpuidEntry], fn: int, index: int = 0) -> CpuidEntry:
    (e,) = [e for e in entries if e.function == fn and e.index == index]
    return e


@pytest.mark.parametrize(("cpu", "ncpus"), [(0, 1), (3, 4), (5, 6)])
def test_cpuid_leaf1_topology(cpu: int, ncpus: int) -> None:
    out = cpuid.guest_cpuid(HOST, cpu, ncpus)
    e = _leaf(out, 1)
    assert e.ebx >> 24 == cpu
    assert (e.ebx >> 16) & 0xFF == (1 << (ncpus - 1).bit_length())
    assert (e.ebx >> 8) & 0xFF == 8
    assert e.ecx >> 31 == 1  # hypervisor
    assert bool(e.edx & (1 << 28)) == (ncpus > 1)
    assert e.eax == 0x806C1  # family/model/stepping untouched


def test_cpuid_extended_topology_and_caches() -> None:
    out = cpuid.guest_cpuid(HOST, 2, 6)
    smt, core, end = (_leaf(out, 0xB, i) for i in range(3))
    assert all(e.edx == 2 for e in (smt, core, end))
    assert ((smt.ecx >> 8) & 0xFF, smt.ebx & 0xFFFF, smt.eax & 0x1F) == (1, 1, 0)
    assert ((core.ecx >> 8) & 0xFF, core.ebx & 0xFFFF, core.eax & 0x1F) == (2, 6, 3)
    assert (end.ecx >> 8) & 0xFF == 0 and end.ecx & 0xFF == 2
    assert len([e for e in out if e.function == 0xB]) == 3
    for i in range(4):
        e = _leaf(out, 4, i)
        assert e.eax >> 26 == 7  # 8 addressable core ids per package - 1
        assert e.eax & 0x3FFF == HOST[2 + i].eax & 0x3FFF
    assert _leaf(out, 4, 4).eax == 0
    assert _leaf(out, 6).ecx & (1 << 3) == 0 and _leaf(out, 6).ecx & 1 == 1


def test_cpuid_other_leaves_untouched() -> None:
    out = cpuid.guest_cpuid(HOST, 0, 2)
    for fn in (0, 7, 0x80000000):
        assert _leaf(out, fn) == _leaf(HOST, fn)


def test_cpuid_kvm_leaves_added_when_missing() -> None:
    out = cpuid.guest_cpuid(HOST, 0, 1)
    sig = _leaf(out, 0x40000000)
    assert struct.pack("<III", sig.ebx, sig.ecx, sig.edx) == b"KVMKVMKVM\0\0\0"
    assert sig.eax >= 0x40000001
    assert _leaf(out, 0x40000001).eax == 0


def test_cpuid_kvm_leaves_kept_when_present() -> None:
    kvm = [CpuidEntry(0x40000000, 0, 0, 0x40000001, *struct.unpack("<III", b"KVMKVMKVM\0\0\0")),
           CpuidEntry(0x40000001, 0, 0, 0x01007AFB, 0, 0, 0)]  # fmt: skip
    out = cpuid.guest_cpuid(HOST + kvm, 1, 2)
    assert _leaf(out, 0x40000000) == kvm[0]
    assert _leaf(out, 0x40000001) == kvm[1]
    assert len(out) == len(HOST) + 1 + 2  # one extra 0xB terminator subleaf


def test_cpuid_rejects_bad_index() -> None:
    with pytest.raises(ValueError):
        cpuid.guest_cpuid(HOST, 2, 2)


def test_boot_msrs() -> None:
    msrs = dict(cpuid.boot_msrs())
    assert msrs[0x1A0] == 1  # MISC_ENABLE fast strings
    assert msrs[0x2FF] == (1 << 11) | 6  # MTRRs on, default write-back
    assert msrs[0x10] == 0
    for idx in (0x174, 0x175, 0x176, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000102):
        assert msrs[idx] == 0
    assert len(msrs) == len(cpuid.boot_msrs())
