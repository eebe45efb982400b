"""`pyhv img ...`: qemu-img's subcommands, options, output and exit codes.

Handlers import their modules lazily so `pyhv --help` stays fast."""

from __future__ import annotations

import argparse
import sys

from pyhv.errors import PyhvError


def register(subparsers) -> None:
    img = subparsers.add_parser("img", help="disk image tool (qemu-img compatible)")
    sub = img.add_subparsers(dest="img_command", required=True)

    p = sub.add_parser("create", help="create a new image")
    p.add_argument("-f", dest="fmt", default="raw")
    p.add_argument("-b", dest="backing")
    p.add_argument("-F", dest="backing_fmt")
    p.add_argument("-o", dest="options", action="append")
    p.add_argument("-u", dest="unsafe", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename")
    p.add_argument("size", nargs="?")
    p.set_defaults(handler=cmd_create)

    p = sub.add_parser("info", help="describe an image")
    p.add_argument("-f", dest="fmt")
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("--backing-chain", action="store_true")
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("filename")
    p.set_defaults(handler=cmd_info)

    p = sub.add_parser("check", help="check (and repair) an image's metadata")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-r", dest="repair", choices=["leaks", "all"])
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename")
    p.set_defaults(handler=cmd_check)

    p = sub.add_parser("map", help="show where an image's data lives")
    p.add_argument("-f", dest="fmt")
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("filename")
    p.set_defaults(handler=cmd_map)

    p = sub.add_parser("convert", help="copy an image, changing its format")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-O", dest="out_fmt", default="raw")
    p.add_argument("-c", dest="compress", action="store_true")
    p.add_argument("-m", dest="workers", type=_workers, default=8,
                   help="parallel workers (qemu-img's coroutines), 1-16")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-S", dest="sparse", default="4k")
    p.add_argument("-t", dest="cache", default="unsafe",
                   choices=["none", "writeback", "writethrough", "directsync", "unsafe"])
    p.add_argument("-T", dest="src_cache", help="accepted for compatibility")
    p.add_argument("-o", dest="options", action="append")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("source")
    p.add_argument("target")
    p.set_defaults(handler=cmd_convert)

    p = sub.add_parser("compare", help="compare two images' contents")
    p.add_argument("-f", dest="fmt1")
    p.add_argument("-F", dest="fmt2")
    p.add_argument("-s", dest="strict", action="store_true")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename1")
    p.add_argument("filename2")
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser("resize", help="change an image's virtual size")
    p.add_argument("-f", dest="fmt")
    p.add_argument("--shrink", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename")
    p.add_argument("size")
    p.set_defaults(handler=cmd_resize)

    p = sub.add_parser("commit", help="write an overlay's data into its backing file")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-d", dest="drop", action="store_true", help="keep the overlay's data")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename")
    p.set_defaults(handler=cmd_commit)

    p = sub.add_parser("rebase", help="change an image's backing file")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-b", dest="backing", required=True)
    p.add_argument("-F", dest="backing_fmt")
    p.add_argument("-u", dest="unsafe", action="store_true")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename")
    p.set_defaults(handler=cmd_rebase)

    p = sub.add_parser("snapshot", help="list internal snapshots")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-l", dest="list", action="store_true", required=True)
    p.add_argument("filename")
    p.set_defaults(handler=cmd_snapshot)

    p = sub.add_parser("bench", help="run a simple I/O benchmark on an image")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-c", dest="count", type=int, default=75000)
    p.add_argument("-d", dest="depth", type=int, default=64)
    p.add_argument("-s", dest="bufsize", default="4k")
    p.add_argument("-S", dest="step")
    p.add_argument("-w", dest="write", action="store_true")
    p.add_argument("-o", dest="offset", default="0")
    p.add_argument("-t", dest="cache", default="writeback",
                   choices=["none", "writeback", "writethrough", "directsync", "unsafe"])
    p.add_argument("-i", dest="aio", default="threads",
                   choices=["threads", "native", "io_uring"])
    p.add_argument("-n", dest="native", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("--pattern", type=int, default=0)
    p.add_argument("--flush-interval", type=int, default=0)
    p.add_argument("--no-drain", action="store_true",
                   help="accepted for qemu-img compatibility (flushes always drain)")
    p.add_argument("filename")
    p.set_defaults(handler=cmd_bench)


def _options(args) -> dict[str, str]:
    from pyhv.disk.create import parse_options

    opts: dict[str, str] = {}
    for text in getattr(args, "options", None) or []:
        opts.update(parse_options(text))
    return opts


def cmd_create(args: argparse.Namespace) -> int:
    from pyhv.disk.cliutil import parse_size
    from pyhv.disk.create import create

    size = parse_size(args.size) if args.size else None
    opts = _options(args)
    create(args.filename, args.fmt, size, opts, args.backing, args.backing_fmt)
    if not args.quiet:
        shown = ", ".join(f"{k}={v}" for k, v in opts.items())
        print(f"Formatting '{args.filename}', fmt={args.fmt}"
              + (f" {shown}" if shown else "")
              + (f" size={size}" if size is not None else "")
              )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from pyhv.disk.info import info

    print(info(args.filename, args.fmt, args.output, args.backing_chain))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from pyhv.disk.check import check

    try:
        errors, text, status = check(args.filename, args.fmt, args.repair, args.output)
    except PyhvError as e:
        print(f"pyhv: {e}", file=sys.stderr)
        return 1
    if errors:
        print(errors, file=sys.stderr, flush=True)
    if not args.quiet:
        print(text)
    return status


def cmd_map(args: argparse.Namespace) -> int:
    from pyhv.disk.info import map_image

    print(map_image(args.filename, args.fmt, args.output))
    return 0


def _workers(text: str) -> int:
    n = int(text) if text.isdigit() else 0
    if not 1 <= n <= 16:
        raise argparse.ArgumentTypeError(
            "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
    return n


def cmd_convert(args: argparse.Namespace) -> int:
    from pyhv.disk.cliutil import parse_size
    from pyhv.disk.convert import convert

    convert(args.source, args.target, args.fmt, args.out_fmt, args.compress,
            args.progress and not args.quiet, parse_size(args.sparse), _options(args),
            args.cache, args.workers)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pyhv.disk.compare import compare

    try:
        text, status = compare(args.filename1, args.filename2, args.fmt1, args.fmt2,
                               args.strict, args.progress)
    except (PyhvError, OSError) as e:
        print(f"pyhv: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(text)
    return status


def cmd_resize(args: argparse.Namespace) -> int:
    from pyhv.disk.ops import resize

    resize(args.filename, args.fmt, args.size, args.shrink)
    if not args.quiet:
        print("Image resized.")
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    from pyhv.disk.ops import commit

    commit(args.filename, args.fmt, args.drop, args.progress and not args.quiet)
    if not args.quiet:
        print("Image committed.")
    return 0


def cmd_rebase(args: argparse.Namespace) -> int:
    from pyhv.disk.ops import rebase

    rebase(args.filename, args.fmt, args.backing, args.backing_fmt, args.unsafe,
           args.progress and not args.quiet)
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    import pyhv.disk
    from pyhv.disk.info import snapshot_table

    with pyhv.disk.open(args.filename, args.fmt, readonly=True, backing=False) as disk:
        snaps = getattr(disk, "snapshots", [])
    if snaps:
        print(snapshot_table(snaps))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pyhv.disk.bench import bench
    from pyhv.disk.cliutil import parse_size

    print(bench(args.filename, args.fmt, args.count, args.depth, parse_size(args.bufsize),
                parse_size(args.step) if args.step else None, args.write,
                parse_size(args.offset), args.pattern, args.flush_interval, args.cache,
                args.quiet, "native" if args.native else args.aio))
    return 0
