"""`img create`: new raw and qcow2 images laid out as qemu-img lays them out (header,
refcount table, refcount blocks, L1 table), with qemu-img's -o options."""

from __future__ import annotations

import errno
import os
import struct

from pyhv.disk import header as hdr
from pyhv.disk.errors import DiskError

FEATURE_TABLE = [(0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
                 (0, 3, "compression type"), (0, 4, "extended L2 entries"),
                 (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data")]
OPTIONS = ("cluster_size", "compat", "lazy_refcounts", "preallocation", "compression_type",
           "extended_l2", "refcount_bits", "backing_file", "backing_fmt", "size")


def parse_options(text: str | None) -> dict[str, str]:
    """`-o a=b,c=d` (qemu's ',,' escapes a comma) into a dict, refusing unknown names."""
    out: dict[str, str] = {}
    if not text:
        return out
    for item in text.replace(",,", "\0").split(","):
        if not item:
            continue
        name, _, value = item.partition("=")
        if name not in OPTIONS:
            raise DiskError(f"Invalid parameter '{name}'")
        out[name] = value.replace("\0", ",")
    return out


def _bool(name: str, value: str) -> bool:
    if value in ("on", "true", "yes", "y", ""):
        return True
    if value in ("off", "false", "no", "n"):
        return False
    raise DiskError(f"Parameter '{name}' expects 'on' or 'off'")


def create(path: str, fmt: str, size: int | None, options: dict[str, str],
           backing: str | None = None, backing_fmt: str | None = None,
           secrets: frozenset[str] = frozenset()) -> None:
    """`secrets`: the ids of `--object secret` given (an AES-encrypted image names one)."""
    from pyhv.disk.cliutil import parse_size

    backing = backing or options.get("backing_file")
    backing_fmt = backing_fmt or options.get("backing_fmt")
    if size is None and "size" in options:
        size = parse_size(options["size"])
    if backing and size is None:
        import pyhv.disk
        from pyhv.disk import backing_path
        with pyhv.disk.open(backing_path(path, backing), backing_fmt, readonly=True) as b:
            size = b.size
    if size is None:
        raise DiskError("Image creation needs a size parameter")
    prealloc = options.get("preallocation", "off")
    if prealloc not in ("off", "metadata", "falloc", "full") or \
            fmt == "raw" and prealloc == "metadata":
        raise DiskError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
    if fmt == "raw":
        if backing:
            raise DiskError("Backing file not supported for file format 'raw'")
        _create_raw(path, size, prealloc)
        return
    if fmt != "qcow2":
        raise DiskError(f"Unknown file format '{fmt}' (pyhv creates qcow2 and raw)")
    crypt = _check_unsupported(options, secrets)
    if backing and prealloc != "off":
        if not _bool("extended_l2", options.get("extended_l2", "off")):
            raise DiskError("Backing file and preallocation can only be used at the same "
                            "time if extended_l2 is on")
        raise DiskError("pyhv img does not preallocate images with a backing file")
    if backing_fmt and not backing:
        raise DiskError("Backing format cannot be used without backing file")
    _create_qcow2(path, size, options, backing, backing_fmt, crypt)
    if prealloc != "off":
        _preallocate(path, prealloc)


def _create_raw(path: str, size: int, prealloc: str) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            if e.errno != errno.EFBIG:
                raise
            raise DiskError("The image size is too large for file format 'raw'") from None
        if prealloc in ("falloc", "full") and size:
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def _check_unsupported(o: dict[str, str], secrets: frozenset[str]) -> int:
    """The header's crypt method (1: the legacy AES, which needs only the header field);
    options pyhv does not implement are refused after the Formatting line, where qemu's
    driver would act on them."""
    crypt = 0
    enc = o.get("encrypt.format") or \
        ("aes" if _bool("encryption", o.get("encryption", "off")) else None)
    if enc:
        secret = o.get("encrypt.key-secret")
        if not secret:
            raise DiskError("Parameter 'encrypt.key-secret' is required for cipher")
        if secret not in secrets:
            raise DiskError(f"No secret with id '{secret}'")
        if enc != "aes":
            raise DiskError(f"pyhv img does not create {enc}-encrypted images")
        crypt = 1
    if o.get("data_file") or _bool("data_file_raw", o.get("data_file_raw", "off")):
        raise DiskError("pyhv img does not create images with an external data file")
    return crypt


def _create_qcow2(path: str, size: int, o: dict[str, str], backing: str | None,
                  backing_fmt: str | None, crypt: int = 0) -> None:
    from pyhv.disk.cliutil import parse_size

    cs = parse_size(o.get("cluster_size", "65536"))
    if cs < 512 or cs > 2 << 20 or cs & (cs - 1):
        raise DiskError("Cluster size must be a power of two between 512 and 2048k")
    compat = o.get("compat", "1.1")
    if compat in ("0.10", "v2"):
        version = 2
    elif compat in ("1.1", "v3"):
        version = 3
    else:
        raise DiskError(f"Parameter 'version' does not accept value '{compat}'")
    lazy = _bool("lazy_refcounts", o.get("lazy_refcounts", "off"))
    extl2 = _bool("extended_l2", o.get("extended_l2", "off"))
    ctype = o.get("compression_type", "zlib")
    if ctype not in ("zlib", "zstd"):
        raise DiskError(f"Parameter 'compression-type' does not accept value '{ctype}'")
    v3 = "compatibility level 1.1 and above (use version=v3 or greater)"
    if version == 2 and extl2:
        raise DiskError(f"Extended L2 entries are only supported with {v3}")
    rbits = int(o.get("refcount_bits", "16"))
    if rbits not in (1, 2, 4, 8, 16, 32, 64):
        raise DiskError("Refcount width must be a power of two and may not exceed 64 bits")
    if version == 2 and rbits != 16:
        raise DiskError("Different refcount widths than 16 bits require compatibility "
                        "level 1.1 or above (use version=v3 or greater)")
    if version == 2 and lazy:
        raise DiskError(f"Lazy refcounts only supported with {v3}")
    if version == 2 and ctype != "zlib":
        raise DiskError(f"Non-zlib compression type is only supported with {v3}")
    if extl2 and cs < 16384:
        raise DiskError("Extended L2 entries are only supported with cluster sizes of at "
                        "least 16384 bytes")
    size = -(-size // 512) * 512
    cbits = cs.bit_length() - 1
    order = rbits.bit_length() - 1
    entries = cs // (16 if extl2 else 8)
    l1_size = max(1, -(-size // (cs * entries)))
    if l1_size * 8 > hdr.MAX_L1_BYTES:          # qemu-img could not open it
        raise DiskError("The image size is too large for file format 'qcow2' "
                        "(try using a larger cluster size)")
    l1_clusters = -(-l1_size * 8 // cs)
    per_block = cs * 8 // rbits
    rt_clusters, blocks = 1, 1
    while True:                 # header + refcount table + blocks + L1, all counted
        total = 1 + rt_clusters + blocks + l1_clusters
        need_blocks = -(-total // per_block)
        need_rt = -(-need_blocks * 8 // cs)
        if need_blocks <= blocks and need_rt <= rt_clusters:
            break
        blocks, rt_clusters = max(blocks, need_blocks), max(rt_clusters, need_rt)
    rt_off = cs
    rb_off = rt_off + rt_clusters * cs
    l1_off = rb_off + blocks * cs
    total = 1 + rt_clusters + blocks + l1_clusters
    h = hdr.Header(version=version, backing_file_offset=0, backing_file_size=0,
                   cluster_bits=cbits, size=size, crypt_method=crypt, l1_size=l1_size,
                   l1_table_offset=l1_off, refcount_table_offset=rt_off,
                   refcount_table_clusters=rt_clusters, nb_snapshots=0, snapshots_offset=0)
    if version == 3:
        h.header_length = 112
        h.refcount_order = order
        h.compression_type = 1 if ctype == "zstd" else 0
        h.incompatible = (hdr.INCOMPAT_COMPRESSION if ctype == "zstd" else 0) | \
            (hdr.INCOMPAT_EXTL2 if extl2 else 0)
        h.compatible = hdr.COMPAT_LAZY if lazy else 0
        table = b"".join(struct.pack(">BB46s", k, b, n.encode()) for k, b, n in FEATURE_TABLE)
        h.extensions.append((hdr.EXT_FEATURES, table))
    if backing:
        h.set_backing(backing, backing_fmt)
    head = h.pack()
    rt = bytearray(rt_clusters * cs)
    for i in range(blocks):
        struct.pack_into(">Q", rt, i * 8, rb_off + i * cs)
    refs = _refblock_bytes(total, blocks * per_block, rbits)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, head, 0)
        os.pwrite(fd, bytes(rt), rt_off)
        os.pwrite(fd, refs, rb_off)
        os.ftruncate(fd, l1_off + l1_clusters * cs)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _refblock_bytes(used: int, entries: int, bits: int) -> bytes:
    """Refcount blocks giving clusters [0, used) a refcount of 1 (any width)."""
    if bits >= 8:
        one = (1).to_bytes(bits // 8, "big")
        return one * used + bytes((entries - used) * bits // 8)
    value = 0
    for i in range(used):        # `used` is a handful of clusters: no byte loop over data
        value |= 1 << (i * bits)
    return value.to_bytes(entries * bits // 8, "little")


def _preallocate(path: str, mode: str) -> None:
    from pyhv.disk.qcow2 import Qcow2Disk

    with Qcow2Disk(path) as disk:
        top = disk.core.preallocate()
        fd = disk.fd
        end = max(top, os.fstat(fd).st_size)
        if mode == "metadata":
            os.ftruncate(fd, end)
        elif mode in ("falloc", "full"):
            os.posix_fallocate(fd, 0, end)
        disk.flush()
