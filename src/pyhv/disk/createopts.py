"""`create -o` options as QEMU's QemuOpts takes them: typed values (sizes, numbers in any C
base, on/off), qemu's error texts, and the "Formatting 'F', fmt=..." line, which lists the
options of the format (and of the file protocol) in QEMU's order, with their defaults."""

from __future__ import annotations

import re

from pyhv.disk.cliutil import strtosz
from pyhv.disk.errors import DiskError

# (name, type, default printed when unset), in the order qemu-img 7.2 prints them
_FILE = (("nocow", "bool", None), ("extent_size_hint", "size", None))
QCOW2 = (
    ("encryption", "bool", None), ("encrypt.format", "str", None),
    ("encrypt.key-secret", "str", None), ("encrypt.cipher-alg", "str", None),
    ("encrypt.cipher-mode", "str", None), ("encrypt.ivgen-alg", "str", None),
    ("encrypt.ivgen-hash-alg", "str", None), ("encrypt.hash-alg", "str", None),
    ("encrypt.iter-time", "number", None), ("cluster_size", "size", "65536"),
    ("extended_l2", "bool", "off"), ("preallocation", "str", None),
    ("compression_type", "str", "zlib"), ("size", "size", None), ("compat", "str", None),
    ("backing_file", "str", None), ("backing_fmt", "str", None), ("data_file", "str", None),
    ("data_file_raw", "bool", None), ("lazy_refcounts", "bool", "off"),
    ("refcount_bits", "number", "16"), *_FILE,
)
RAW = (("size", "size", None), ("nocow", "bool", None), ("preallocation", "str", None),
       ("extent_size_hint", "size", None))
TABLES = {"qcow2": QCOW2, "raw": RAW}
_SIZE_HINT = ("expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E "
              "means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.")


def split_list(text: str) -> list[tuple[str, str | None]]:
    """'a=b,c,d=e,,f' into [(a, b), (c, None), (d, 'e,f')]; qemu's is_valid_option_list
    refuses empty items."""
    items = text.replace(",,", "\0").split(",")
    if any(not item for item in items):
        raise DiskError(f"Invalid option list: {text}")
    out = []
    for item in items:
        name, eq, value = item.partition("=")
        out.append((name.replace("\0", ","), value.replace("\0", ",") if eq else None))
    return out


def _typed(name: str, kind: str, value: str | None) -> str:
    """The value as QEMU stores it: sizes and numbers as integers, booleans as given."""
    if kind == "size":
        try:
            return str(strtosz(value or ""))
        except (ValueError, OverflowError):
            raise DiskError(f"Parameter '{name}' {_SIZE_HINT}") from None
    if kind == "number":            # strtoull with base 0: hex, octal or decimal
        text = value or ""
        for pattern, base in ((r"0[xX][0-9a-fA-F]+", 16), (r"0[0-7]*", 8), (r"[1-9]\d*", 10)):
            if re.fullmatch(pattern, text) and int(text, base) < 1 << 64:
                return str(int(text, base))
        raise DiskError(f"Parameter '{name}' expects a number")
    if kind == "bool":
        if value is None:
            return "on"
        if value not in ("on", "off", "yes", "no", "true", "false", "y", "n"):
            raise DiskError(f"Parameter '{name}' expects 'on' or 'off'")
    return value or ""


def parse(fmt: str, texts: list[str]) -> dict[str, str]:
    """The -o lists (in order, later ones winning) for format `fmt`, typed."""
    table = {name: kind for name, kind, _ in TABLES.get(fmt, RAW)}
    out: dict[str, str] = {}
    for text in texts:
        for name, value in split_list(text):
            if name not in table:
                raise DiskError(f"Invalid parameter '{name}'")
            out[name] = _typed(name, table[name], value)
    return out


def is_on(value: str | None) -> bool:
    return value in ("on", "yes", "true", "y")


def formatting_line(path: str, fmt: str, opts: dict[str, str]) -> str:
    """"Formatting 'F', fmt=qcow2 cluster_size=65536 ..." exactly as qemu-img prints it."""
    shown = []
    for name, _kind, default in TABLES.get(fmt, RAW):
        value = opts.get(name, default)
        if value is not None:
            shown.append(f"{name}={value.replace(',', ',,')}")
    return f"Formatting '{path}', fmt={fmt} " + " ".join(shown)


def plan(path: str, fmt: str, size: int | None, texts: list[str], backing: str | None,
         backing_fmt: str | None, unsafe: bool) -> dict[str, str]:
    """What bdrv_img_create settles before its Formatting line: every option, the size
    (from the backing file when not given), the backing file opened unless -u."""
    if fmt not in TABLES:
        raise DiskError(f"Unknown file format '{fmt}'")
    opts = parse(fmt, texts)
    if size is not None:
        opts["size"] = str(size)
    for name, value in (("backing_file", backing), ("backing_fmt", backing_fmt)):
        if value is not None:
            if fmt != "qcow2":
                what = "Backing file" if name == "backing_file" else "Backing file format"
                raise DiskError(f"{what} not supported for file format '{fmt}'")
            opts[name] = value
    backing, backing_fmt = opts.get("backing_file"), opts.get("backing_fmt")
    if backing is not None:
        if backing == path:
            raise DiskError("Error: Trying to create an image with the same filename as "
                            "the backing file")
        if not backing:
            raise DiskError("Expected backing file name, got empty string")
        if unsafe and not backing_fmt:
            raise DiskError("Backing file specified without backing format")
        if not unsafe:
            length = _backing_length(path, backing, backing_fmt)
            opts.setdefault("size", str(length))
    if "size" not in opts:
        raise DiskError("Image creation needs a size parameter")
    return opts


def _backing_length(path: str, backing: str, fmt: str | None) -> int:
    import pyhv.disk
    from pyhv.disk import backing_path

    full = backing_path(path, backing)
    hint = "\nCould not open backing image."
    if fmt is not None and fmt not in TABLES:
        raise DiskError(f"Unknown driver '{fmt}'{hint}")
    try:
        with open(full, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise DiskError(f"Could not open '{full}': {e.strerror}{hint}") from None
    if fmt is None:
        probed = "qcow2" if magic == b"QFI\xfb" else "raw"
        raise DiskError(f"Backing file specified without backing format\n"
                        f"Detected format of {probed}.", end="")
    try:
        with pyhv.disk.open(full, fmt, readonly=True, backing=False) as disk:
            return disk.size
    except DiskError as e:
        raise DiskError(f"{e}{hint}") from None
