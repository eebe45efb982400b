"""`pyhv guest build`: the default guest's kernel and initramfs."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    guest = sub.add_parser("guest", help="the default guest (kernel + initramfs)")
    gsub = guest.add_subparsers(dest="guest_command", required=True)
    build = gsub.add_parser("build", help="build (or reuse from the cache) the default guest")
    build.add_argument("--output", type=Path, help="also copy vmlinuz and initrd.img here")
    build.add_argument("--from-deb", type=Path, action="append", default=[], metavar="DEB",
                       help="use this linux-image-* or busybox-static .deb instead of "
                            "downloading it (repeatable)")
    build.set_defaults(handler=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    from pyhv.guest.build import build_guest

    image = build_guest(output=args.output, from_debs=args.from_deb)
    print(f"kernel {image.kernel}")
    print(f"initrd {image.initrd}")
    print(f"release {image.kernel_release}")
    return 0
