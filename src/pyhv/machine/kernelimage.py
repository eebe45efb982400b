"""Parse and validate Linux x86 kernel images: bzImage (boot protocol) and ELF vmlinux.

The loader needs two things from a kernel file: the setup header (copied verbatim into
boot_params, Documentation/arch/x86/boot.rst) and, for direct 64-bit/PVH boot, the ELF
vmlinux inside the bzImage's compressed payload. Everything is checked against the file
size here, before boot, so a truncated or foreign file fails with a one-line message
instead of a guest that hangs in early boot.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import lzma
import os
import stat
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pyhv.cache import cache_dir
from pyhv.errors import PyhvError

MAX_VMLINUX = 512 << 20  # decompressed vmlinux bound: more is a bomb, not a kernel
MAX_IMAGE = 2 << 30  # largest kernel file we read (an unstripped vmlinux is < 1 GiB)
MIN_PROTOCOL = 0x206  # 2.06: cmdline_size, 32-bit initrd_addr_max semantics
LOADED_HIGH = 0x01  # loadflags: protected-mode code is loaded at 0x100000
XLF_KERNEL_64 = 0x01  # xloadflags: has the legacy 64-bit entry point at +0x200
HDR_MAGIC = b"HdrS"
BOOT_FLAG = 0xAA55
ELF_MAGIC = b"\x7fELF"
_HIGH_HALF = 0xFFFFFFFF80000000  # __START_KERNEL_map: virtual addresses of vmlinux
_CHUNK = 4 << 20  # decompression output step: bounds memory before the limit check

Progress = Callable[[int, int], None]  # (bytes produced, expected total or 0)


class KernelImageError(PyhvError):
    """A kernel file that cannot be booted; the message names the file and the cause."""


def _name(path: str | os.PathLike[str]) -> str:
    """The file's name for a one-line message (control characters escaped)."""
    return os.fsdecode(path).replace("\n", "\\n").replace("\r", "\\r")


def _proto(version: int) -> str:
    """Boot protocol version as boot.rst writes it: 0x0204 -> '2.04'."""
    return f"{version >> 8}.{version & 0xFF:02d}"


# --- bzImage setup header

_HDR_START = 0x1F1
_HDR_SPAN = 0x270 - _HDR_START  # covers every field below


def _at(offset: int, code: str) -> Any:
    """A setup header field at an absolute file offset (boot.rst's real-mode header table)."""
    return field(metadata={"at": offset - _HDR_START, "fmt": "<" + code})


@dataclass(frozen=True)
class SetupHeader:
    """The bzImage setup header; ``raw`` is what the loader copies into boot_params+0x1f1."""

    setup_sects: int = _at(0x1F1, "B")
    syssize: int = _at(0x1F4, "I")  # protected-mode code size in 16-byte units
    version: int = _at(0x206, "H")
    loadflags: int = _at(0x211, "B")
    code32_start: int = _at(0x214, "I")
    initrd_addr_max: int = _at(0x22C, "I")
    kernel_alignment: int = _at(0x230, "I")
    relocatable_kernel: int = _at(0x234, "B")
    xloadflags: int = _at(0x236, "H")
    cmdline_size: int = _at(0x238, "I")
    payload_offset: int = _at(0x248, "I")
    payload_length: int = _at(0x24C, "I")
    pref_address: int = _at(0x258, "Q")
    init_size: int = _at(0x260, "I")
    raw: bytes = field(repr=False)

    @classmethod
    def parse(cls, data: bytes, name: str) -> SetupHeader:
        """Read the header; fields past its end (older protocols) read as 0."""
        if len(data) < 0x202 or data[0x200] != 0xEB:  # the jump's offset gives the header's length
            raise KernelImageError(f"{name}: setup header has no short jump at 0x200")
        end = 0x202 + data[0x201]
        if len(data) < end:
            raise KernelImageError(f"{name}: bzImage truncated inside the setup header")
        raw = bytes(data[_HDR_START:end])
        padded = raw.ljust(_HDR_SPAN, b"\0")
        values = {
            f.name: struct.unpack_from(f.metadata["fmt"], padded, f.metadata["at"])[0]
            for f in fields(cls)
            if f.metadata
        }
        return cls(raw=raw, **values)

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode setup (boot sector included); 0 sectors means the legacy 4."""
        return ((self.setup_sects or 4) + 1) * 512


@dataclass
class BzImage:
    """A validated bzImage: real-mode setup plus the protected-mode part holding the payload."""

    header: SetupHeader
    setup: bytes
    kernel: bytes
    path: Path

    @classmethod
    def parse(cls, data: bytes, path: str | os.PathLike[str]) -> BzImage:
        """Validate a bzImage held in memory (see load_kernel for the checks)."""
        name = _name(path)
        if len(data) < 0x206 or data[0x202:0x206] != HDR_MAGIC:
            raise KernelImageError(
                f"{name}: not a Linux kernel (no 'HdrS' setup header magic and no ELF magic)"
            )
        (flag,) = struct.unpack_from("<H", data, 0x1FE)
        if flag != BOOT_FLAG:
            raise KernelImageError(f"{name}: bad boot_flag {flag:#06x} at 0x1fe (want 0xaa55)")
        hdr = SetupHeader.parse(data, name)
        if hdr.version < MIN_PROTOCOL:
            raise KernelImageError(
                f"{name}: boot protocol {_proto(hdr.version)} is too old: "
                f"pyhv needs {_proto(MIN_PROTOCOL)} or newer"
            )
        if not hdr.xloadflags & XLF_KERNEL_64:
            raise KernelImageError(
                f"{name}: kernel has no 64-bit entry point (XLF_KERNEL_64 not set)"
            )
        if not hdr.loadflags & LOADED_HIGH:
            raise KernelImageError(
                f"{name}: not a bzImage (LOADED_HIGH not set: zImage loads below 1 MiB)"
            )
        code, have = hdr.syssize * 16, max(0, len(data) - hdr.setup_size)
        if len(data) < hdr.setup_size or have < code:
            raise KernelImageError(
                f"{name}: bzImage truncated: header says {code} bytes of protected-mode code, "
                f"file has {have}"
            )
        if code == 0:
            raise KernelImageError(f"{name}: bzImage has no protected-mode code (syssize 0)")
        image = cls(hdr, bytes(data[: hdr.setup_size]), bytes(data[hdr.setup_size :]), Path(path))
        image._payload_bounds()  # a bad payload field is a bad file: say so at load
        return image

    @property
    def name(self) -> str:
        return _name(self.path)

    def _payload_bounds(self) -> tuple[int, int]:
        # payload_* exist since 2.08; XLF_KERNEL_64 (checked at parse) implies 2.12.
        off, length = self.header.payload_offset, self.header.payload_length
        if length == 0 or off + length > len(self.kernel):
            raise KernelImageError(
                f"{self.name}: payload (offset {off}, length {length}) does not fit in "
                f"the {len(self.kernel)}-byte protected-mode part"
            )
        return off, length

    def payload(self) -> bytes:
        """The compressed vmlinux (with the kernel's trailing 4-byte size), for extraction."""
        off, length = self._payload_bounds()
        return self.kernel[off : off + length]

    def compression(self) -> str:
        """Payload format by magic: gzip, xz, lzma, lz4, zstd, bzip2 (or none if plain ELF)."""
        off, length = self._payload_bounds()
        head = self.kernel[off : off + min(length, 8)]
        for fmt, magic in _MAGICS:
            if head.startswith(magic):
                return fmt
        if head.startswith(b"\x89LZO"):
            raise KernelImageError(f"{self.name}: lzo-compressed payload is not supported")
        raise KernelImageError(
            f"{self.name}: unknown payload compression (magic {head[:6].hex(' ')})"
        )

    def extract_vmlinux(self, limit: int = MAX_VMLINUX, progress: Progress | None = None) -> bytes:
        """Decompress the payload to the ELF vmlinux (relocations may follow it).

        ``limit`` bounds the output so a decompression bomb fails instead of eating RAM;
        ``progress(done, total)`` gets the kernel's own size trailer as total (0 if absent).
        """
        fmt = self.compression()
        data = self.payload()
        expected = int.from_bytes(data[-4:], "little") if len(data) >= 4 else 0
        expected = expected if expected <= limit else 0
        chunks: list[bytes] = []
        total = 0
        for chunk in _decode(fmt, data, self.name):
            total += len(chunk)
            if total > limit:
                raise KernelImageError(
                    f"{self.name}: {fmt} payload decompresses to more than {limit} bytes "
                    "(decompression bomb?)"
                )
            chunks.append(chunk)
            if progress is not None:
                progress(total, expected)
        out = b"".join(chunks)
        if not out.startswith(ELF_MAGIC):
            raise KernelImageError(
                f"{self.name}: decompressed {fmt} payload is not an ELF vmlinux "
                f"(starts with {out[:4].hex(' ') or 'nothing'})"
            )
        return out


# --- Payload decompressors: each yields output chunks so the caller can bound the total.

_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_BLOCK = 8 << 20  # legacy frame: every block decompresses to at most 8 MiB
_LZ4_BOUND = _LZ4_BLOCK + _LZ4_BLOCK // 255 + 16  # LZ4_compressBound(8 MiB)
_ZSTD_STEP = 2048  # input per zstd call: a 4-byte RLE block can make 128 KiB of output

_MAGICS = (
    ("gzip", b"\x1f\x8b"),
    ("xz", b"\xfd7zXZ\x00"),
    ("lzma", b"\x5d\x00\x00"),
    ("lz4", struct.pack("<I", _LZ4_LEGACY_MAGIC)),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("bzip2", b"BZh"),
    ("none", ELF_MAGIC),  # CONFIG_KERNEL_UNCOMPRESSED
)


def _gzip(data: memoryview) -> Iterator[bytes]:
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # stops at the member end
    buf: bytes | memoryview = data
    while not d.eof:
        out = d.decompress(buf, _CHUNK)
        buf = d.unconsumed_tail
        if out:
            yield out
        elif not buf:
            raise EOFError("stream ends before the gzip trailer")


def _stdlib(factory: Callable[[], lzma.LZMADecompressor | bz2.BZ2Decompressor], what: str):
    def decode(data: memoryview) -> Iterator[bytes]:
        d = factory()
        buf: bytes | memoryview = data
        while not d.eof:
            out = d.decompress(buf, _CHUNK)
            buf = b""
            if out:
                yield out
            elif d.needs_input:
                raise EOFError(f"stream ends before the {what} end marker")

    return decode


def _lz4(data: memoryview) -> Iterator[bytes]:
    import lz4.block  # runtime dependency; imported lazily so other formats never need it

    pos, end = 4, len(data)
    while end - pos > 4:  # what is left after the last block is the kernel's size trailer
        (size,) = struct.unpack_from("<I", data, pos)
        if size == _LZ4_LEGACY_MAGIC:  # concatenated legacy frames
            pos += 4
            continue
        if size == 0 or size > _LZ4_BOUND or pos + 4 + size > end:
            raise ValueError(f"bad block size {size} at payload offset {pos}")
        yield lz4.block.decompress(data[pos + 4 : pos + 4 + size], uncompressed_size=_LZ4_BLOCK)
        pos += 4 + size


def _zstd(data: memoryview) -> Iterator[bytes]:
    import zstandard  # runtime dependency, see _lz4

    # The kernel's zstd frames may omit the content size and are followed by the size
    # trailer, so decode in small input steps (bounded output each) and stop at frame end.
    d = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj(read_across_frames=False)
    for pos in range(0, len(data), _ZSTD_STEP):
        out = d.decompress(data[pos : pos + _ZSTD_STEP])
        if out:
            yield out
        if d.eof:
            return
    raise EOFError("stream ends before the zstd frame end")


def _decode(fmt: str, data: bytes, name: str) -> Iterator[bytes]:
    """Run one codec, turning its own error types into one-line 'corrupt payload' errors."""
    try:
        yield from _DECODERS[fmt](memoryview(data))
    except Exception as e:  # zlib.error, LZMAError, OSError (bz2), LZ4BlockError, ZstdError
        cause = " ".join(str(e).split()) or type(e).__name__
        raise KernelImageError(f"{name}: corrupt {fmt} payload: {cause}") from None


def _plain(data: memoryview) -> Iterator[bytes]:
    yield bytes(data)  # the ELF parser ignores whatever follows the segments


_DECODERS: dict[str, Callable[[memoryview], Iterator[bytes]]] = {
    "gzip": _gzip,
    "xz": _stdlib(lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ), "xz"),
    "lzma": _stdlib(lambda: lzma.LZMADecompressor(format=lzma.FORMAT_ALONE), "lzma"),
    "bzip2": _stdlib(bz2.BZ2Decompressor, "bzip2"),
    "lz4": _lz4,
    "zstd": _zstd,
    "none": _plain,
}


# --- ELF vmlinux

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr
_PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr
_NHDR = struct.Struct("<III")  # Elf64_Nhdr: namesz, descsz, type
ET_EXEC, EM_X86_64 = 2, 62
PT_LOAD, PT_NOTE = 1, 4
XEN_ELFNOTE_PHYS32_ENTRY = 18


@dataclass
class ElfKernel:
    """An x86-64 vmlinux: PT_LOAD segments at physical addresses, 64-bit and PVH entries."""

    segments: list[tuple[int, bytes, int]]  # (p_paddr, file bytes, p_memsz)
    entry: int  # physical address of startup_64
    pvh_entry: int | None  # physical 32-bit PVH entry (XEN_ELFNOTE_PHYS32_ENTRY)
    path: Path

    @classmethod
    def parse(cls, data: bytes, path: str | os.PathLike[str]) -> ElfKernel:
        """Validate the ELF headers and every segment against the file size."""
        name = _name(path)
        size = len(data)
        if not data.startswith(ELF_MAGIC):
            raise KernelImageError(f"{name}: not an ELF file (no ELF magic)")
        if size < _EHDR.size:
            raise KernelImageError(f"{name}: ELF header truncated ({size} bytes)")
        ehdr = _EHDR.unpack_from(data)
        (ident, e_type, machine, _, entry, phoff), (phentsize, phnum) = ehdr[:6], ehdr[9:11]
        if ident[4] != 2 or ident[5] != 1:
            raise KernelImageError(f"{name}: not a little-endian 64-bit ELF (x86-64 vmlinux)")
        if machine != EM_X86_64:
            raise KernelImageError(f"{name}: ELF machine {machine} is not x86-64 (62)")
        if e_type != ET_EXEC:
            raise KernelImageError(f"{name}: ELF type {e_type} is not an executable (ET_EXEC)")
        if phentsize != _PHDR.size or phnum == 0:
            raise KernelImageError(
                f"{name}: bad program header table (e_phentsize {phentsize}, e_phnum {phnum})"
            )
        if phoff + phnum * _PHDR.size > size:
            raise KernelImageError(
                f"{name}: program header table ({phnum} entries at {phoff}) runs past "
                f"the end of the file ({size} bytes)"
            )
        segments: list[tuple[int, bytes, int]] = []
        loads: list[tuple[int, int, int]] = []  # (vaddr, paddr, memsz)
        pvh: int | None = None
        for i in range(phnum):
            p_type, _, off, vaddr, paddr, filesz, memsz, _ = _PHDR.unpack_from(
                data, phoff + i * _PHDR.size
            )
            if p_type not in (PT_LOAD, PT_NOTE):
                continue
            if off + filesz > size:
                raise KernelImageError(
                    f"{name}: segment {i} (offset {off}, {filesz} bytes) runs past the end "
                    f"of the file ({size} bytes)"
                )
            if p_type == PT_NOTE:
                pvh = _pvh_note(data[off : off + filesz], name, i) if pvh is None else pvh
                continue
            if filesz > memsz:
                raise KernelImageError(
                    f"{name}: segment {i} has p_filesz {filesz} > p_memsz {memsz}"
                )
            segments.append((paddr, data[off : off + filesz], memsz))
            loads.append((vaddr, paddr, memsz))
        if not segments:
            raise KernelImageError(f"{name}: ELF has no PT_LOAD segment")
        phys = entry
        if entry >= _HIGH_HALF:
            hit = [p + entry - v for v, p, m in loads if v <= entry < v + m]
            if not hit:
                raise KernelImageError(f"{name}: entry point {entry:#x} is in no PT_LOAD segment")
            phys = hit[0]
        if not any(p <= phys < p + m for _, p, m in loads):
            raise KernelImageError(
                f"{name}: entry point {phys:#x} is outside every PT_LOAD segment"
            )
        return cls(segments, phys, pvh, Path(path))


def _pvh_note(notes: bytes, name: str, index: int) -> int | None:
    """Find XEN_ELFNOTE_PHYS32_ENTRY ('Xen', type 18) in one PT_NOTE segment's bytes."""
    pos = 0
    while pos + _NHDR.size <= len(notes):
        namesz, descsz, ntype = _NHDR.unpack_from(notes, pos)
        name_at = pos + _NHDR.size
        desc_at = name_at + ((namesz + 3) & ~3)  # name and desc are 4-byte aligned
        nxt = desc_at + ((descsz + 3) & ~3)
        if desc_at + descsz > len(notes):
            raise KernelImageError(f"{name}: note in segment {index} runs past its end")
        if ntype == XEN_ELFNOTE_PHYS32_ENTRY and notes[name_at : name_at + namesz] == b"Xen\0":
            if descsz == 4:
                return struct.unpack_from("<I", notes, desc_at)[0]
            if descsz == 8:
                return struct.unpack_from("<Q", notes, desc_at)[0]
            raise KernelImageError(f"{name}: Xen PHYS32_ENTRY note has {descsz}-byte value")
        pos = nxt
    return None


# --- Files


def _read(path: str | os.PathLike[str]) -> bytes:
    """Read a whole kernel file, mapping OS errors to one-line messages."""
    name = _name(path)
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise KernelImageError(f"{name}: is a directory, not a kernel image")
        if not stat.S_ISREG(mode):  # a FIFO would block, a device never ends
            raise KernelImageError(f"{name}: not a regular file")
        with open(path, "rb") as f:
            # the size first: read(MAX_IMAGE + 1) would allocate 2 GiB for any file
            size = os.fstat(f.fileno()).st_size
            if size > MAX_IMAGE:
                raise KernelImageError(f"{name}: {size} bytes, larger than {MAX_IMAGE}: "
                                       "not a kernel image")
            data = f.read(size)
    except FileNotFoundError:
        raise KernelImageError(f"{name}: no such file") from None
    except PermissionError:
        raise KernelImageError(f"{name}: permission denied") from None
    except OSError as e:
        raise KernelImageError(f"{name}: cannot read: {e.strerror or e}") from None
    if not data:
        raise KernelImageError(f"{name}: file is empty")
    return data


def _parse(data: bytes, path: str | os.PathLike[str]) -> BzImage | ElfKernel:
    if data.startswith(ELF_MAGIC):
        return ElfKernel.parse(data, path)
    return BzImage.parse(data, path)


def load_kernel(path: str | os.PathLike[str]) -> BzImage | ElfKernel:
    """Read and validate a kernel file (bzImage or ELF vmlinux) before any VM is built."""
    return _parse(_read(path), path)


def _write_atomic(dst: Path, data: bytes) -> None:
    """Write via a temp file in the same directory + rename: readers never see a partial file."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    except OSError as e:
        raise KernelImageError(f"{_name(dst)}: cannot write: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise KernelImageError(f"{_name(dst)}: cannot write: {e.strerror or e}") from None
        raise


def _vmlinux(data: bytes, src: str | os.PathLike[str], **kw: Any) -> tuple[bytes, ElfKernel]:
    """The ELF bytes in a kernel file's contents (extracted if a bzImage), validated."""
    image = _parse(data, src)
    if isinstance(image, ElfKernel):
        return data, image
    vmlinux = image.extract_vmlinux(**kw)
    return vmlinux, ElfKernel.parse(vmlinux, f"{_name(src)} (extracted vmlinux)")


def extract_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    progress: Progress | None = None,
    limit: int = MAX_VMLINUX,
) -> ElfKernel:
    """Write the vmlinux inside ``src`` (or a copy of an ELF ``src``) to ``dst`` atomically."""
    data, kernel = _vmlinux(_read(src), src, limit=limit, progress=progress)
    _write_atomic(Path(dst), data)
    kernel.path = Path(dst)
    return kernel


def cached_vmlinux(path: str | os.PathLike[str]) -> Path:
    """Return an extracted vmlinux for a bzImage, decompressing once per distinct image."""
    data = _read(path)
    if data.startswith(ELF_MAGIC):
        ElfKernel.parse(data, path)
        return Path(path)
    target = cache_dir() / "vmlinux" / f"{hashlib.sha256(data).hexdigest()}.elf"
    if not target.is_file():
        _write_atomic(target, _vmlinux(data, path)[0])
    return target
