"""qemu-img's command lines: each subcommand's options, parsed as glibc's getopt_long
parses them (options, operands and `--` mixed in any order; long names by unique prefix),
and qemu-img's usage errors (exit status 1, not argparse's 2).

A spec line lists `OPTION[:] DEST[+]`: `:` takes a value, `+` collects repeats."""

from __future__ import annotations

from argparse import Namespace

from pyhv.disk.errors import DiskError, UsageError

_COMMON = "-h help, --help help, --object: object+, --image-opts image_opts"
_SHARE = "-U force_share, --force-share force_share"
SPECS = {
    "create": "-F: backing_fmt, -b: backing, -f: fmt, -o: options+, -q quiet, -u unsafe",
    "info": f"-f: fmt, --format: fmt, {_SHARE}, --output: output, "
            "--backing-chain backing_chain",
    "check": f"-f: fmt, -r: repair, -T: src_cache, -q quiet, {_SHARE}, --output: output",
    "map": f"-f: fmt, --format: fmt, {_SHARE}, --output: output, "
           "--start-offset: start_offset, --max-length: max_length",
    "convert": f"-f: fmt, -O: out_fmt, -B: backing, -F: backing_fmt, -C copy_range, "
               "-c compress, -o: options+, -l: snapshot, -S: sparse, -p progress, -t: cache, "
               "-T: src_cache, -q quiet, -n skip_create, -m: workers, -W out_of_order, "
               f"-r: rate, {_SHARE}, --target-image-opts target_image_opts, "
               "--target-is-zero target_is_zero, --salvage salvage, --bitmaps bitmaps, "
               "--skip-broken-bitmaps skip_broken_bitmaps",
    "compare": f"-f: fmt1, -F: fmt2, -T: src_cache, -p progress, -q quiet, -s strict, {_SHARE}",
    "resize": "-f: fmt, -q quiet, --shrink shrink, --preallocation: preallocation",
    "commit": "-f: fmt, -t: cache, -b: base, -d drop, -p progress, -q quiet, -r: rate",
    "rebase": f"-f: fmt, -F: backing_fmt, -b: backing, -u unsafe, -p progress, -t: cache, "
              f"-T: src_cache, -q quiet, {_SHARE}",
    "snapshot": f"-l list, -a: apply, -c: create, -d: delete, -f: fmt, -q quiet, {_SHARE}",
    "dd": f"-f: fmt, -O: out_fmt, {_SHARE}, --target-image-opts target_image_opts",
    "bench": f"-c: count, -d: depth, -f: fmt, -n native, -i: aio, -o: offset, -q quiet, "
             f"-s: bufsize, -S: step, -t: cache, -w write, {_SHARE}, --pattern: pattern, "
             "--flush-interval: flush_interval, --no-drain no_drain",
}
DEFAULTS = {
    "create": {"fmt": "raw"},
    "dd": {"out_fmt": "raw"},
    "convert": {"out_fmt": "raw", "sparse": "4k", "cache": "unsafe", "workers": "8"},
    "bench": {"count": "75000", "depth": "64", "bufsize": "4k", "offset": "0",
              "cache": "writeback", "aio": "threads", "pattern": "0", "flush_interval": "0"},
}
# (operand names), how many are needed, the error when fewer, the error when more
OPERANDS = {
    "create": (("filename", "size"), 1, "Expecting image file name", None),
    "compare": (("filename1", "filename2"), 2, "Expecting two image file names",
                "Expecting two image file names"),
    "convert": (("source", "target"), 2, "Must specify image file name", None),
    "dd": ((), 0, None, None),
    "resize": (("filename", "size"), 2, "Expecting image file name and size",
               "Expecting image file name and size"),
}
ONE_FILE = (("filename",), 1, "Expecting one image file name", "Expecting one image file name")


def _table(spec: str) -> tuple[dict, dict]:
    """{letter or long name: (dest, takes a value, repeats)} for short and long options."""
    shorts, longs = {}, {}
    for item in f"{spec}, {_COMMON}".split(", "):
        opt, dest = item.split()
        entry = (dest.rstrip("+"), opt.endswith(":"), dest.endswith("+"))
        opt = opt.rstrip(":")
        (longs if opt.startswith("--") else shorts)[opt.lstrip("-")] = entry
    return shorts, longs


def getopt(argv: list[str], shorts: dict, longs: dict) -> tuple[list, list[str]]:
    """glibc getopt_long with qemu-img's ':' error mode: ([(entry, value)], operands)."""
    opts, operands, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            operands += argv[i:]
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            hits = [name] if name in longs else [n for n in longs if n.startswith(name)]
            if len({longs[n] for n in hits}) != 1:
                raise UsageError(f"unrecognized option '{arg}'")
            entry = longs[hits[0]]
            if not entry[1] and eq:
                raise UsageError(f"unrecognized option '{arg}'")
            if entry[1] and not eq:
                if i >= len(argv):
                    raise UsageError(f"missing argument for option '{arg}'")
                value, i = argv[i], i + 1
            opts.append((entry, value if entry[1] else None))
        elif arg.startswith("-") and arg != "-":
            j = 1
            while j < len(arg):
                entry = shorts.get(arg[j])
                j += 1
                if entry is None:
                    raise UsageError(f"unrecognized option '{arg}'")
                if not entry[1]:
                    opts.append((entry, None))
                    continue
                value = arg[j:]
                if not value:
                    if i >= len(argv):
                        raise UsageError(f"missing argument for option '{arg}'")
                    value, i = argv[i], i + 1
                opts.append((entry, value))
                break
        else:
            operands.append(arg)
    return opts, operands


def parse(command: str, argv: list[str]) -> Namespace:
    """The Namespace a handler takes, from `qemu-img COMMAND ARGV...`."""
    if command not in SPECS:
        raise UsageError(f"Command not found: {command}")
    if command == "resize" and argv and argv[-1] != "--":
        argv, size = argv[:-1], [argv[-1]]   # as qemu-img: a size may look like '-1G'
    else:
        size = []
    shorts, longs = _table(SPECS[command])
    ns = Namespace(**{d: None for d, _, _ in (*shorts.values(), *longs.values())})
    ns.__dict__.update(DEFAULTS.get(command, {}), img_command=command)
    ns.output = "human" if "output" in ns else None
    opts, operands = getopt(argv, shorts, longs)
    for (dest, takes, repeats), value in opts:
        if repeats:
            setattr(ns, dest, [*(getattr(ns, dest) or []), value])
        else:
            setattr(ns, dest, value if takes else True)
    operands += size
    if ns.help:
        return ns
    if command == "dd":
        ns.operands = operands          # key=value, read by pyhv.disk.dd
        return ns
    names, least, few, many = OPERANDS.get(command, ONE_FILE)
    if command == "resize" and len(argv) + len(size) < 2:
        raise UsageError("Not enough arguments")
    if len(operands) < least:
        raise UsageError(few) if command != "convert" else _plain(few)
    if len(operands) > len(names):
        if many:
            raise UsageError(many)
        if command == "create":
            raise UsageError(f"Unexpected argument: {operands[len(names)]}")
        raise _plain("pyhv img convert takes one source image")
    for name, value in zip(names, operands, strict=False):
        setattr(ns, name, value)
    for name in names[len(operands):]:
        setattr(ns, name, None)
    if ns.output not in (None, "human", "json"):
        raise _plain("--output must be used with human or json as argument.")
    return ns


def _plain(message: str) -> Exception:
    """A usage error qemu-img reports without pointing at --help."""
    return DiskError(message)
