"""`pyhv disk serve`: a disk image as a vhost-user-blk device (qemu-storage-daemon's
`--export type=vhost-user-blk`, as pyhv), for QEMU's `-device vhost-user-blk-pci`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys


def register(subparsers) -> None:
    disk = subparsers.add_parser("disk", help="serve disk images to virtual machines")
    sub = disk.add_subparsers(dest="disk_command", required=True)
    p = sub.add_parser("serve", help="serve an image as a vhost-user-blk device")
    p.add_argument("image")
    p.add_argument("--socket", required=True, help="the Unix socket to listen on")
    p.add_argument("-f", "--format", choices=["qcow2", "raw"], help="(default: probed)")
    p.add_argument("--readonly", action="store_true")
    p.add_argument("--queues", type=int, default=1, help="virtqueues (1-16)")
    p.add_argument("--serial", default="", help="the disk's serial number (20 bytes)")
    p.add_argument("--ready", action="store_true",
                   help="print 'pyhv disk: ready' on stdout once listening")
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import pyhv.disk
    from pyhv.disk.locking import lock_image
    from pyhv.errors import PyhvError
    from pyhv.virtio.blk import BlkDevice
    from pyhv.virtio.vhost_user import Backend

    if not 1 <= args.queues <= 16:
        raise PyhvError(f"--queues {args.queues}: between 1 and 16")
    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with pyhv.disk.open(args.image, args.format, readonly=args.readonly) as disk:
        lock_image(disk.fd, args.image, write=not args.readonly)
        backend = Backend(BlkDevice(disk, args.readonly, args.queues, args.serial),
                          args.socket)
        if args.ready:
            print("pyhv disk: ready", flush=True)
        try:
            backend.serve_forever()
        finally:
            backend.close()
    return 0
