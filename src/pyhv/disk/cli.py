"""`pyhv img ...`: qemu-img's subcommands, options, output and exit codes.

pyhv.disk.cmdline parses the command line as qemu-img's getopt does; messages start with
the program's name (cliutil.program). Handlers import their modules lazily so
`pyhv --help` stays fast."""

from __future__ import annotations

import argparse
import sys

from pyhv.disk.errors import DiskError, UsageError
from pyhv.errors import PyhvError

_CACHES = ("none", "writeback", "writethrough", "directsync", "unsafe")
USAGE = """usage: pyhv img [-h] [-V] command [command options]   (qemu-img's command lines)
  create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
  info [-f fmt] [--output=human|json] [--backing-chain] [-U] filename
  check [-q] [-f fmt] [--output=human|json] [-r leaks|all] [-U] filename
  map [-f fmt] [--output=human|json] [-U] filename
  convert [-c] [-p] [-q] [-n] [-f fmt] [-O output_fmt] [-B backing_file [-F backing_fmt]]
          [-o options] [-S sparse_size] [-t cache] [-T src_cache] [-m num_coroutines] [-W]
          [-U] filename output_filename
  compare [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2
  resize [-f fmt] [-q] [--shrink] filename [+|-]size
  commit [-q] [-f fmt] [-t cache] [-b base] [-d] [-p] filename
  rebase [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F fmt] filename
  snapshot [-l | -a snapshot | -c snapshot | -d snapshot] [-f fmt] [-U] filename
  dd [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output
  bench [-c count] [-d depth] [-f fmt] [-i aio] [-n] [-o offset] [-q] [-s buffer_size]
        [-S step_size] [-t cache] [-w [--pattern=pattern] [--flush-interval=N] [--no-drain]]
        filename"""


def register(subparsers) -> None:
    # qemu-img's own getopt parses everything after `img` (pyhv.disk.cmdline)
    img = subparsers.add_parser("img", help="disk image tool (qemu-img compatible)",
                                add_help=False, prefix_chars="\0")
    img.add_argument("argv", nargs=argparse.REMAINDER)
    img.set_defaults(handler=run)


def main() -> int:
    """The `pyhv-img` program: `pyhv img` under a name of its own, used in its messages."""
    from pyhv.cli import main as pyhv_main

    return pyhv_main(["img", *sys.argv[1:]])


def run(args: argparse.Namespace) -> int:
    """`pyhv img ARGV`: qemu-img's global options, then the subcommand; every error is
    one line starting with the program's name, and exits 1 unless the command says else."""
    from pyhv.disk import cmdline
    from pyhv.disk.cliutil import error, program

    argv = list(args.argv)
    try:
        while argv and argv[0].startswith("-") and argv[0] != "-":
            opt = argv.pop(0)
            if opt in ("-h", "--help"):
                print(USAGE)
                return 0
            if opt in ("-V", "--version"):
                from pyhv import __version__
                print(f"pyhv img {__version__} (qemu-img 7.2 compatible)")
                return 0
            if opt in ("-T", "--trace") and argv:
                argv.pop(0)
            elif not opt.startswith(("-T", "--trace=")):
                raise UsageError(f"unrecognized option '{opt}'")
        if not argv:
            raise UsageError("Not enough arguments")
        ns = cmdline.parse(argv[0], argv[1:])
        if ns.help:
            print(USAGE)
            return 0
        if ns.image_opts:
            _image_opts(ns)
        ns.secrets = _secrets(ns.object or [], ns.img_command)
        return HANDLERS[ns.img_command](ns)
    except UsageError as e:
        if getattr(args, "debug", False):
            raise
        error(str(e))
        name = "pyhv img" if program() == "pyhv" else "qemu-img"
        print(f"Try '{name} --help' for more information", file=sys.stderr)
        return 1
    except (PyhvError, OSError) as e:
        if getattr(args, "debug", False):
            raise
        error(str(e), getattr(e, "end", "\n"))
        return 1
    except KeyboardInterrupt:
        return 130


def _image_opts(ns: argparse.Namespace) -> None:
    """--image-opts: each image named as `driver=FMT,file.driver=file,file.filename=PATH`
    (QEMU's option syntax; pyhv takes a format over a plain file, nothing else)."""
    from pyhv.disk.createopts import split_list

    for name in ("filename", "filename1", "filename2", "source"):
        text = getattr(ns, name, None)
        if text is None:
            continue
        opts = dict(split_list(text))
        path = opts.pop("file.filename", None) or opts.pop("file", None)
        fmt = opts.pop("driver", None)
        if opts.pop("file.driver", "file") != "file" or opts or not path or not fmt:
            raise DiskError(f"pyhv img does not support --image-opts '{text}'")
        setattr(ns, name, path)
        dest = {"filename2": "fmt2", "filename1": "fmt1"}.get(name, "fmt")
        setattr(ns, dest, fmt)


def _secrets(objects: list[str], command: str) -> frozenset[str]:
    """The ids of `--object secret,id=ID,...` (create names them for AES encryption);
    other objects pyhv does not implement."""
    ids = set()
    for text in objects:
        kind, _, rest = text.partition(",")
        fields = dict(f.partition("=")[::2] for f in rest.split(",") if f)
        if kind.removeprefix("qom-type=") != "secret" or command != "create" or \
                "id" not in fields:
            raise DiskError(f"pyhv img does not support --object {kind} for {command}")
        ids.add(fields["id"])
    return frozenset(ids)


def _choice(value: str | None, choices, message: str) -> str | None:
    if value is not None and value not in choices:
        raise DiskError(message)
    return value


def _number(text: str, message: str, low: int = 0) -> int:
    if not text.isdigit() or int(text) < low:
        raise DiskError(message)
    return int(text)


def _unsupported(args: argparse.Namespace, *options: tuple[str, str]) -> None:
    """qemu-img options pyhv img parses but does not implement: a one-line refusal."""
    for dest, text in options:
        if getattr(args, dest, None):
            raise DiskError(f"pyhv img does not support {args.img_command} {text} yet")


def cmd_create(args: argparse.Namespace) -> int:
    from pyhv.disk.cliutil import cvtnum
    from pyhv.disk.create import create
    from pyhv.disk.createopts import formatting_line, plan, split_list

    texts = args.options or []
    for text in texts:
        split_list(text)
    size = cvtnum(args.size) if args.size is not None else None
    if size is not None and any(n == "size" for t in texts for n, _ in split_list(t)):
        raise DiskError(f"{args.filename}: The image size must be specified only once")
    try:
        opts = plan(args.filename, args.fmt, size, texts, args.backing, args.backing_fmt,
                    bool(args.unsafe))
        if not args.quiet:
            print(formatting_line(args.filename, args.fmt, opts), flush=True)
        size = int(opts.pop("size"))
        create(args.filename, args.fmt, size, opts, opts.get("backing_file"),
               opts.get("backing_fmt"), args.secrets)
    except DiskError as e:
        raise DiskError(f"{args.filename}: {e}", e.end) from None
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from pyhv.disk.info import info

    print(info(args.filename, args.fmt, args.output, bool(args.backing_chain)))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from pyhv.disk.check import check

    if args.repair not in (None, "leaks", "all"):
        raise UsageError("Unknown option value for -r (expecting 'leaks' or 'all'): "
                         f"{args.repair}")
    _choice(args.src_cache, _CACHES, f"Invalid source cache option: {args.src_cache}")
    try:
        errors, text, status = check(args.filename, args.fmt, args.repair, args.output)
    except DiskError as e:
        if str(e) != "This image format does not support checks":
            raise
        from pyhv.disk.cliutil import error
        error(str(e))
        return 63                   # qemu-img's status for ENOTSUP
    if errors:
        print(errors, file=sys.stderr, flush=True)
    if not args.quiet:
        print(text)
    return status


def cmd_map(args: argparse.Namespace) -> int:
    from pyhv.disk.info import map_image

    _unsupported(args, ("start_offset", "--start-offset"), ("max_length", "--max-length"))
    print(map_image(args.filename, args.fmt, args.output))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pyhv.disk.cliutil import cvtnum
    from pyhv.disk.convert import convert

    _unsupported(args, ("snapshot", "-l"),
                 ("target_image_opts", "--target-image-opts"),
                 ("target_is_zero", "--target-is-zero"), ("salvage", "--salvage"),
                 ("bitmaps", "--bitmaps"))
    workers = _number(args.workers, "Invalid number of coroutines. Allowed number of "
                      "coroutines is between 1 and 16", 1)
    if workers > 16:
        raise DiskError("Invalid number of coroutines. Allowed number of coroutines is "
                        "between 1 and 16")
    _choice(args.cache, _CACHES, f"Invalid cache option: {args.cache}")
    _choice(args.src_cache, _CACHES, f"Invalid source cache option: {args.src_cache}")
    options = _options(args)
    for name, value in (("backing_file", args.backing), ("backing_fmt", args.backing_fmt)):
        if value is not None:
            options[name] = value
    convert(args.source, args.target, args.fmt, args.out_fmt, bool(args.compress),
            bool(args.progress and not args.quiet),
            cvtnum(args.sparse, "buffer size for sparse output"), options,
            args.cache, workers, bool(args.skip_create))
    return 0


def _options(args) -> dict[str, str]:
    from pyhv.disk.create import parse_options

    opts: dict[str, str] = {}
    for text in getattr(args, "options", None) or []:
        opts.update(parse_options(text))
    return opts


def cmd_compare(args: argparse.Namespace) -> int:
    from pyhv.disk.cliutil import error
    from pyhv.disk.compare import compare

    try:
        _choice(args.src_cache, _CACHES, f"Invalid source cache option: {args.src_cache}")
        text, status = compare(args.filename1, args.filename2, args.fmt1, args.fmt2,
                               bool(args.strict), bool(args.progress))
    except (PyhvError, OSError) as e:
        error(str(e), getattr(e, "end", "\n"))
        return 2
    if not args.quiet:
        print(text)
    return status


def cmd_resize(args: argparse.Namespace) -> int:
    from pyhv.disk.ops import resize

    if args.preallocation not in (None, "off"):
        raise DiskError("pyhv img does not support resize --preallocation yet")
    try:
        resize(args.filename, args.fmt, args.size, bool(args.shrink))
    except DiskError as e:
        if not str(e).startswith("Use the --shrink option"):
            raise
        from pyhv.disk.cliutil import error, warn
        error(str(e))
        warn("Shrinking an image will delete all data beyond the shrunken image's end. "
             "Before performing such an operation, make sure there is no important data "
             "there.")
        return 1
    if not args.quiet:
        print("Image resized.")
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    from pyhv.disk.ops import commit

    _choice(args.cache, _CACHES, f"Invalid cache option: {args.cache}")
    commit(args.filename, args.fmt, bool(args.drop), bool(args.progress and not args.quiet),
           args.base)
    if not args.quiet:
        print("Image committed.")
    return 0


def cmd_rebase(args: argparse.Namespace) -> int:
    from pyhv.disk.ops import rebase

    if args.backing is None and not args.unsafe:
        raise UsageError("Must specify backing file (-b) or use unsafe mode (-u)")
    if args.unsafe and args.backing and not args.backing_fmt:
        raise DiskError(f"Could not change the backing file to '{args.backing}': "
                        "backing format must be specified")
    _choice(args.cache, _CACHES, f"Invalid cache option: {args.cache}")
    _choice(args.src_cache, _CACHES, f"Invalid source cache option: {args.src_cache}")
    rebase(args.filename, args.fmt, args.backing or "", args.backing_fmt, bool(args.unsafe),
           bool(args.progress and not args.quiet))
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    import pyhv.disk
    from pyhv.disk.info import snapshot_table

    actions = [a for a in ("list", "apply", "create", "delete") if getattr(args, a)]
    if len(actions) > 1:
        raise UsageError("Cannot mix '-l', '-a', '-c', '-d'")
    if actions and actions[0] != "list":
        from pyhv.disk import snapshot
        key = getattr(args, actions[0])
        with pyhv.disk.open(args.filename, args.fmt, backing=False) as disk:
            if disk.format != "qcow2":
                raise DiskError(f"Could not {actions[0]} snapshot '{key}': "
                                "Operation not supported")
            try:
                getattr(snapshot, actions[0])(disk, key)
            except (PyhvError, OSError) as e:
                raise DiskError(f"Could not {actions[0]} snapshot '{key}': {e}") from None
        return 0
    with pyhv.disk.open(args.filename, args.fmt, readonly=True, backing=False) as disk:
        snaps = getattr(disk, "snapshots", [])
    if snaps:
        print(snapshot_table(snaps))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pyhv.disk.bench import bench
    from pyhv.disk.cliutil import cvtnum

    count = _number(args.count, "Invalid request count specified", 1)
    depth = _number(args.depth, "Invalid queue depth specified", 1)
    pattern = _number(args.pattern, "Invalid pattern byte specified")
    if pattern > 255:
        raise DiskError("Invalid pattern byte specified")
    interval = _number(args.flush_interval, "Invalid flush interval specified")
    _choice(args.aio, ("threads", "native", "io_uring"), f"Invalid aio option: {args.aio}")
    _choice(args.cache, _CACHES, "Invalid cache mode")
    print(bench(args.filename, args.fmt, count, depth, cvtnum(args.bufsize, "buffer size"),
                cvtnum(args.step, "step_size") if args.step else None, bool(args.write),
                cvtnum(args.offset, "offset"), pattern, interval, args.cache,
                bool(args.quiet), "native" if args.native else args.aio))
    return 0


def cmd_dd(args: argparse.Namespace) -> int:
    from pyhv.disk.dd import dd, parse_operands

    _unsupported(args, ("target_image_opts", "--target-image-opts"))
    dd(parse_operands(args.operands), args.fmt, args.out_fmt)
    return 0


HANDLERS = {"create": cmd_create, "info": cmd_info, "check": cmd_check, "map": cmd_map,
            "convert": cmd_convert, "compare": cmd_compare, "resize": cmd_resize,
            "commit": cmd_commit, "rebase": cmd_rebase, "snapshot": cmd_snapshot,
            "bench": cmd_bench, "dd": cmd_dd}
