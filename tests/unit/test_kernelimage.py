"""Kernel image parsing: the real Debian cloud kernel, recompressed variants, and bad files."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
from pathlib import Path

import pytest

from pyhv.errors import PyhvError
from pyhv.guest import debian
from pyhv.machine import kernelimage
from pyhv.machine.kernelimage import (
    BzImage,
    ElfKernel,
    KernelImageError,
    cached_vmlinux,
    extract_file,
    load_kernel,
)

FORMATS = {
    "gzip": ["gzip", "-9", "-c"],
    "xz": ["xz", "--check=crc32", "-c"],
    "lzma": ["lzma", "-c"],
    "lz4": ["lz4", "-l", "-9", "-c"],
    "zstd": ["zstd", "-19", "-q", "-c"],
    "bzip2": ["bzip2", "-c"],
}
LEAD = 0x200  # bytes of fake decompressor code before the payload in synthetic bzImages


# --- helpers ---------------------------------------------------------------------------


def error_of(fn, *args, **kwargs) -> str:
    """Run fn expecting KernelImageError; return its message after checking it is one line."""
    with pytest.raises(KernelImageError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert msg and "\n" not in msg, repr(msg)
    assert isinstance(info.value, PyhvError)
    return msg


def fake_setup(version: int = 0x20F, setup_sects: int = 1) -> bytearray:
    """A minimal real-mode setup with a valid boot protocol header (no real kernel needed)."""
    s = bytearray((setup_sects + 1) * 512)
    s[0x1F1] = setup_sects
    struct.pack_into("<H", s, 0x1FE, 0xAA55)
    s[0x200:0x202] = b"\xeb\x6a"  # jmp to 0x26c: header is 0x1f1..0x26c
    s[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", s, 0x206, version)
    s[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", s, 0x214, 0x100000)
    struct.pack_into("<I", s, 0x230, 0x200000)
    s[0x234] = 1
    struct.pack_into("<H", s, 0x236, 0x7F)
    struct.pack_into("<I", s, 0x238, 2047)
    return s


def make_bzimage(setup: bytes, compressed: bytes, size: int) -> bytes:
    """Wrap a compressed payload (+ the kernel's 4-byte size trailer) in a consistent bzImage."""
    payload = compressed + struct.pack("<I", size)
    kernel = b"\x90" * LEAD + payload
    kernel += b"\0" * (-len(kernel) % 16)
    s = bytearray(setup)
    struct.pack_into("<I", s, 0x1F4, len(kernel) // 16)  # syssize
    struct.pack_into("<II", s, 0x248, LEAD, len(payload))  # payload_offset, payload_length
    return bytes(s) + kernel


def tiny_elf(segments: list[tuple[int, int, int, int]], entry: int = 0x1000000) -> bytes:
    """An ELF64 x86-64 ET_EXEC with PT_LOAD (offset, paddr, filesz, memsz) and 64 data bytes."""
    phoff = 64
    data_at = phoff + 56 * len(segments)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + bytes(9), 2, 62, 1, entry, phoff, 0, 0, 64, 56,
        len(segments), 64, 0, 0,
    )  # fmt: skip
    phdrs = b"".join(
        struct.pack("<IIQQQQQQ", 1, 5, off, paddr, paddr, filesz, memsz, 0x1000)
        for off, paddr, filesz, memsz in segments
    )
    assert len(ehdr) + len(phdrs) == data_at
    return ehdr + phdrs + bytes(range(64))


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# --- fixtures: the real kernel, fetched once per cache ---------------------------------


@pytest.fixture(scope="session")
def real_path() -> Path:
    try:
        return debian.debian_kernel()
    except PyhvError as e:  # no network / no apt: nothing here can be checked
        pytest.skip(f"cannot fetch the Debian kernel: {e}")


@pytest.fixture(scope="session")
def real(real_path: Path) -> BzImage:
    image = load_kernel(real_path)
    assert isinstance(image, BzImage)
    return image


@pytest.fixture(scope="session")
def vmlinux(real: BzImage) -> bytes:
    return real.extract_vmlinux()


@pytest.fixture(scope="session")
def recompressed(vmlinux: bytes, tmp_path_factory) -> dict[str, bytes]:
    """The real vmlinux compressed by each CLI tool, all tools running in parallel."""
    d = tmp_path_factory.mktemp("recompressed")
    src = write(d, "vmlinux", vmlinux)
    procs = {}
    for fmt, argv in FORMATS.items():
        with open(src, "rb") as fin, open(d / fmt, "wb") as fout:
            procs[fmt] = subprocess.Popen(argv, stdin=fin, stdout=fout)
    for fmt, p in procs.items():
        assert p.wait() == 0, f"{FORMATS[fmt]} failed"
    return {fmt: (d / fmt).read_bytes() for fmt in FORMATS}


# --- the real Debian kernel ------------------------------------------------------------


@pytest.mark.kernel
def test_real_header_fields(real: BzImage, real_path: Path) -> None:
    data = real_path.read_bytes()
    h = real.header
    assert h.version >= 0x20F
    assert h.xloadflags & kernelimage.XLF_KERNEL_64
    assert h.loadflags & kernelimage.LOADED_HIGH
    assert h.relocatable_kernel == 1
    assert h.kernel_alignment and h.kernel_alignment & (h.kernel_alignment - 1) == 0
    assert h.cmdline_size > 255 and h.init_size > 0 and h.pref_address >= 0x100000
    assert h.raw == data[0x1F1 : 0x202 + data[0x201]]
    assert real.setup == data[: (h.setup_sects + 1) * 512]
    assert real.kernel == data[len(real.setup) :]
    assert len(real.kernel) >= h.syssize * 16


@pytest.mark.kernel
def test_real_compression_and_extract(real: BzImage, vmlinux: bytes) -> None:
    assert real.compression() in FORMATS
    payload = real.payload()
    # The kernel build appends the uncompressed size: it must match what we produced.
    assert struct.unpack("<I", payload[-4:])[0] == len(vmlinux)
    kernel = ElfKernel.parse(vmlinux, "vmlinux")
    assert kernel.segments
    assert any(p <= kernel.entry < p + m for p, _, m in kernel.segments)
    for paddr, data, memsz in kernel.segments:
        assert paddr >= 0x100000 and len(data) <= memsz


@pytest.mark.kernel
def test_real_pvh_entry(vmlinux: bytes) -> None:
    kernel = ElfKernel.parse(vmlinux, "vmlinux")
    # Independent check: the raw Xen PHYS32_ENTRY note header appears iff a PVH entry is found.
    has_note = any(struct.pack("<III", 4, size, 18) + b"Xen\0" in vmlinux for size in (4, 8))
    if has_note:
        assert kernel.pvh_entry is not None
        assert kernel.pvh_entry < 1 << 32
        assert any(p <= kernel.pvh_entry < p + m for p, _, m in kernel.segments)
    else:
        assert kernel.pvh_entry is None


@pytest.mark.kernel
def test_real_progress_reports_total(real: BzImage, vmlinux: bytes) -> None:
    seen: list[tuple[int, int]] = []
    real.extract_vmlinux(progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(vmlinux), len(vmlinux))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


@pytest.mark.kernel
@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_recompressed_formats(
    fmt: str, real: BzImage, vmlinux: bytes, recompressed: dict[str, bytes], tmp_path: Path
) -> None:
    path = write(
        tmp_path, f"bzImage-{fmt}", make_bzimage(real.setup, recompressed[fmt], len(vmlinux))
    )
    image = load_kernel(path)
    assert isinstance(image, BzImage)
    assert image.compression() == fmt
    assert image.payload()[:-4] == recompressed[fmt]
    assert image.extract_vmlinux() == vmlinux


@pytest.mark.kernel
def test_extract_file_atomic(real_path: Path, vmlinux: bytes, tmp_path: Path) -> None:
    out = tmp_path / "out" / "vmlinux"
    out.parent.mkdir()
    out.write_bytes(b"old")
    old_inode = out.stat().st_ino
    kernel = extract_file(real_path, out)
    assert out.read_bytes() == vmlinux
    assert out.stat().st_ino != old_inode  # replaced by rename, not rewritten in place
    assert os.listdir(out.parent) == ["vmlinux"]  # no temp file left behind
    assert kernel.path == out and kernel.entry == ElfKernel.parse(vmlinux, "v").entry

    # A failing extraction leaves the previous output untouched and no temp file.
    bad = bytearray(real_path.read_bytes())
    struct.pack_into("<I", bad, 0x24C, 100)  # payload_length: the stream now ends early
    with pytest.raises(KernelImageError):
        extract_file(write(tmp_path, "bad", bytes(bad)), out)
    assert out.read_bytes() == vmlinux and os.listdir(out.parent) == ["vmlinux"]

    # An ELF source is copied as is.
    copy = tmp_path / "copy.elf"
    assert extract_file(out, copy).segments == kernel.segments
    assert copy.read_bytes() == vmlinux
    assert isinstance(load_kernel(copy), ElfKernel)


@pytest.mark.kernel
def test_cached_vmlinux_reuses(
    real_path: Path, vmlinux: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = cached_vmlinux(real_path)
    assert first.is_relative_to(tmp_path / "cache" / "pyhv" / "vmlinux")
    assert first.read_bytes() == vmlinux
    mtime = first.stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("extracted again")

    monkeypatch.setattr(BzImage, "extract_vmlinux", boom)
    assert cached_vmlinux(real_path) == first
    assert first.stat().st_mtime_ns == mtime
    assert cached_vmlinux(first) == first  # an ELF is its own vmlinux


# --- bad inputs ------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    msg = error_of(load_kernel, tmp_path / "vmlinuz")
    assert "vmlinuz" in msg and "no such file" in msg


def test_directory(tmp_path: Path) -> None:
    msg = error_of(load_kernel, tmp_path)
    assert str(tmp_path) in msg and "directory" in msg


def test_unreadable(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        path = write(tmp_path, "vmlinuz", b"x")
        path.chmod(0)
    else:  # root ignores mode bits on ordinary files, but not on write-only sysctls
        path = Path("/proc/sys/vm/compact_memory")
        try:
            path.open("rb").close()
            pytest.skip("running as root and no write-only /proc file denies reading")
        except PermissionError:
            pass
        except OSError as e:
            pytest.skip(f"running as root and {path} is unusable: {e}")
    msg = error_of(load_kernel, path)
    assert path.name in msg and "permission denied" in msg


def test_empty(tmp_path: Path) -> None:
    msg = error_of(load_kernel, write(tmp_path, "vmlinuz", b""))
    assert "vmlinuz" in msg and "empty" in msg


def test_huge_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "vmlinuz"
    with open(path, "wb") as f:
        f.truncate(kernelimage.MAX_IMAGE + 1)       # sparse: no disk, and never read
    msg = error_of(load_kernel, path)
    assert f"vmlinuz: {kernelimage.MAX_IMAGE + 1} bytes, larger than" in msg


def test_random_bytes(tmp_path: Path) -> None:
    msg = error_of(load_kernel, write(tmp_path, "vmlinuz", os.urandom(64 << 10)))
    assert "vmlinuz: not a Linux kernel" in msg and "HdrS" in msg


def test_no_boot_flag(tmp_path: Path) -> None:
    s = fake_setup()
    s[0x1FE:0x200] = b"\0\0"
    msg = error_of(load_kernel, write(tmp_path, "k", make_bzimage(s, b"x", 1)))
    assert "boot_flag" in msg


@pytest.mark.kernel
def test_truncated(real_path: Path, real: BzImage, tmp_path: Path) -> None:
    path = write(tmp_path, "short", real_path.read_bytes()[: 64 << 10])
    msg = error_of(load_kernel, path)
    have = (64 << 10) - len(real.setup)
    assert "short: bzImage truncated" in msg
    assert f"{real.header.syssize * 16} bytes of protected-mode code, file has {have}" in msg


@pytest.mark.kernel
def test_old_protocol(real_path: Path, tmp_path: Path) -> None:
    data = bytearray(real_path.read_bytes())
    struct.pack_into("<H", data, 0x206, 0x0204)
    msg = error_of(load_kernel, write(tmp_path, "old", bytes(data)))
    assert "boot protocol 2.04 is too old: pyhv needs 2.06 or newer" in msg


@pytest.mark.kernel
def test_not_64bit(real_path: Path, tmp_path: Path) -> None:
    data = bytearray(real_path.read_bytes())
    data[0x236] &= ~1
    msg = error_of(load_kernel, write(tmp_path, "k32", bytes(data)))
    assert "no 64-bit entry point (XLF_KERNEL_64 not set)" in msg


def test_not_loaded_high(tmp_path: Path) -> None:
    s = fake_setup()
    s[0x211] = 0
    msg = error_of(load_kernel, write(tmp_path, "zImage", make_bzimage(s, b"x", 1)))
    assert "LOADED_HIGH" in msg


def test_payload_outside_image(tmp_path: Path) -> None:
    data = bytearray(make_bzimage(fake_setup(), gzip.compress(b"x"), 1))
    struct.pack_into("<I", data, 0x24C, 1 << 20)
    msg = error_of(load_kernel, write(tmp_path, "k", bytes(data)))
    assert "payload" in msg and "does not fit" in msg


@pytest.mark.kernel
@pytest.mark.parametrize("fmt", ["gzip", "xz", "zstd", "bzip2"])  # formats with checksums
def test_corrupt_payload(
    fmt: str, real: BzImage, vmlinux: bytes, recompressed: dict[str, bytes], tmp_path: Path
) -> None:
    data = bytearray(make_bzimage(real.setup, recompressed[fmt], len(vmlinux)))
    mid = len(real.setup) + LEAD + len(recompressed[fmt]) // 2
    data[mid : mid + 64] = bytes(b ^ 0x5A for b in data[mid : mid + 64])
    image = load_kernel(write(tmp_path, f"bad-{fmt}", bytes(data)))
    msg = error_of(image.extract_vmlinux)
    assert f"bad-{fmt}: corrupt {fmt} payload" in msg


@pytest.mark.kernel
def test_corrupt_real_lz4_block_size(real_path: Path, real: BzImage, tmp_path: Path) -> None:
    if real.compression() != "lz4":
        pytest.skip(f"Debian kernel payload is {real.compression()}, not lz4")
    data = bytearray(real_path.read_bytes())
    first_block = len(real.setup) + real.header.payload_offset + 4
    struct.pack_into("<I", data, first_block, 0x7FFFFFFF)
    msg = error_of(load_kernel(write(tmp_path, "k", bytes(data))).extract_vmlinux)
    assert "corrupt lz4 payload: bad block size" in msg


def compress(fmt: str, data: bytes) -> bytes:
    return subprocess.run(FORMATS[fmt], input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_small_roundtrip(fmt: str, tmp_path: Path) -> None:
    elf = b"\x7fELF" + os.urandom(1 << 16) + bytes(1 << 20)
    image = load_kernel(write(tmp_path, "k", make_bzimage(fake_setup(), compress(fmt, elf), 0)))
    assert image.compression() == fmt
    assert image.extract_vmlinux() == elf


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_truncated_stream(fmt: str, tmp_path: Path) -> None:
    body = compress(fmt, b"\x7fELF" + os.urandom(1 << 16))
    cut = make_bzimage(fake_setup(), body[: len(body) // 2], 1 << 16)
    msg = error_of(load_kernel(write(tmp_path, "k", cut)).extract_vmlinux)
    assert f"k: corrupt {fmt} payload" in msg


def test_payload_not_elf(tmp_path: Path) -> None:
    image = load_kernel(write(tmp_path, "k", make_bzimage(fake_setup(), gzip.compress(b"hi"), 2)))
    assert error_of(image.extract_vmlinux).endswith("is not an ELF vmlinux (starts with 68 69)")


def test_unknown_compression(tmp_path: Path) -> None:
    image = load_kernel(write(tmp_path, "k", make_bzimage(fake_setup(), b"\x89LZO\0", 1)))
    assert "lzo" in error_of(image.compression)
    image = load_kernel(write(tmp_path, "k", make_bzimage(fake_setup(), b"QQQQ", 1)))
    assert "unknown payload compression" in error_of(image.extract_vmlinux)


def test_decompression_bomb(tmp_path: Path) -> None:
    bomb = gzip.compress(bytes(64 << 20), compresslevel=9)  # ~64 KiB in, 64 MiB out
    image = load_kernel(write(tmp_path, "bomb", make_bzimage(fake_setup(), bomb, 64 << 20)))
    msg = error_of(image.extract_vmlinux, limit=8 << 20)
    assert "more than 8388608 bytes" in msg and "bomb" in msg


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_bomb_bound_every_format(fmt: str, tmp_path: Path) -> None:
    zeros = bytes(32 << 20)
    image = load_kernel(write(tmp_path, fmt, make_bzimage(fake_setup(), compress(fmt, zeros), 0)))
    assert image.compression() == fmt
    assert "bomb" in error_of(image.extract_vmlinux, limit=4 << 20)


# --- ELF files -------------------------------------------------------------------------


def test_elf_valid_and_high_entry(tmp_path: Path) -> None:
    elf = tiny_elf([(120, 0x1000000, 64, 0x2000)])
    kernel = load_kernel(write(tmp_path, "vmlinux", elf))
    assert isinstance(kernel, ElfKernel)
    assert kernel.segments == [(0x1000000, bytes(range(64)), 0x2000)]
    assert kernel.entry == 0x1000000 and kernel.pvh_entry is None
    # tiny_elf uses vaddr == paddr; a high-half entry must be in some segment's vaddr range.
    high = tiny_elf([(120, 0x1000000, 64, 0x2000)], entry=0xFFFFFFFF81000000)
    assert "in no PT_LOAD segment" in error_of(load_kernel, write(tmp_path, "hi", high))


def test_elf_segment_past_end(tmp_path: Path) -> None:
    path = write(tmp_path, "vmlinux", tiny_elf([(120, 0x1000000, 4096, 4096)]))
    msg = error_of(load_kernel, path)
    assert "vmlinux: segment 0" in msg and "past the end of the file" in msg


def test_elf_filesz_over_memsz(tmp_path: Path) -> None:
    msg = error_of(load_kernel, write(tmp_path, "v", tiny_elf([(120, 0x1000000, 64, 32)])))
    assert "p_filesz 64 > p_memsz 32" in msg


def test_elf_phdrs_past_end(tmp_path: Path) -> None:
    elf = tiny_elf([(120, 0x1000000, 64, 64)])
    msg = error_of(load_kernel, write(tmp_path, "v", elf[:80]))
    assert "program header table" in msg and "past the end" in msg


def test_elf_wrong_machine_and_type(tmp_path: Path) -> None:
    elf = bytearray(tiny_elf([(120, 0x1000000, 64, 64)]))
    struct.pack_into("<H", elf, 18, 3)  # EM_386
    assert "not x86-64" in error_of(load_kernel, write(tmp_path, "v", bytes(elf)))
    elf = bytearray(tiny_elf([(120, 0x1000000, 64, 64)]))
    struct.pack_into("<H", elf, 16, 3)  # ET_DYN
    assert "not an executable" in error_of(load_kernel, write(tmp_path, "v", bytes(elf)))


def test_elf_entry_outside_segments(tmp_path: Path) -> None:
    elf = tiny_elf([(120, 0x1000000, 64, 64)], entry=0x2000000)
    assert "outside every PT_LOAD" in error_of(load_kernel, write(tmp_path, "v", elf))


# --- cache location --------------------------------------------------------------------


def test_cache_dir_honours_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert debian.cache_dir() == tmp_path / "pyhv"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # invalid per the XDG spec
    assert debian.cache_dir() == Path.home() / ".cache" / "pyhv"
