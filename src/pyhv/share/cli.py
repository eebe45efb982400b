"""`pyhv share serve HOSTDIR --mount MOUNTPOINT ...`: serve a host directory over FUSE."""

from __future__ import annotations

import argparse

from pyhv.errors import PyhvError


def register(subparsers) -> None:
    share = subparsers.add_parser("share", help="share a host directory over FUSE")
    sub = share.add_subparsers(dest="share_command", required=True)
    serve = sub.add_parser("serve", help="serve HOSTDIR: mounted here, or to a VM")
    serve.add_argument("hostdir", help="the directory to share")
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--mount", metavar="MOUNTPOINT",
                       help="where to mount it (through /dev/fuse)")
    where.add_argument("--socket", metavar="PATH",
                       help="serve it as a vhost-user-fs device on this Unix socket (for "
                            "QEMU's vhost-user-fs-pci, in place of virtiofsd)")
    serve.add_argument("--tag", default="pyhv",
                       help="the virtio-fs tag the guest mounts (--socket; default pyhv)")
    serve.add_argument("--queues", type=int, default=1,
                       help="virtio-fs request queues (--socket; default 1)")
    serve.add_argument("--cache", choices=["never", "auto", "always"], default="auto",
                       help="client caching: never (no cache), auto (1 s metadata, "
                            "close-to-open data; default), always (long-lived)")
    serve.add_argument("--readonly", action="store_true", help="refuse every change")
    serve.add_argument("--writeback", action="store_true",
                       help="let the kernel cache writes (FUSE writeback cache)")
    serve.add_argument("--allow-devices", action="store_true",
                       help="allow MKNOD of device nodes (and use them)")
    serve.add_argument("--uid-map", action="append", metavar="GUEST:HOST:COUNT",
                       help="map guest uids to host uids (repeatable)")
    serve.add_argument("--gid-map", action="append", metavar="GUEST:HOST:COUNT",
                       help="map guest gids to host gids (repeatable)")
    serve.add_argument("--threads", type=int, default=16,
                       help="most requests served at once (default 16)")
    serve.add_argument("--no-io-uring", dest="io_uring", action="store_false",
                       help="serve through /dev/fuse reads only, not FUSE over io_uring "
                            "(per-CPU queues, Linux 6.14+; as root pyhv sets the fuse "
                            "module's enable_uring)")
    serve.add_argument("--rlimit-nofile", type=int, metavar="N",
                       help="open file limit to run with (default: fs.nr_open, at most "
                            "1000000, where permitted; 0 leaves it unchanged), as virtiofsd")
    serve.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import os
    import signal

    from pyhv.share.devfuse import DevFuse
    from pyhv.share.idmap import IdMap
    from pyhv.share.nofile import NOFILE_MIN, set_nofile
    from pyhv.share.options import ShareOptions
    from pyhv.share.server import FuseServer
    from pyhv.share.watch import HostWatch

    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="pyhv share: %(message)s")
    if not os.path.isdir(args.hostdir):
        raise PyhvError(f"{args.hostdir}: not a directory")
    if args.threads < 1:
        raise PyhvError("--threads must be at least 1")
    os.umask(0)       # the client applies the caller's umask; modes arrive final
    if args.rlimit_nofile is not None and 0 != args.rlimit_nofile < NOFILE_MIN:
        raise PyhvError(f"--rlimit-nofile must be 0 (unchanged) or at least {NOFILE_MIN}")
    set_nofile(args.rlimit_nofile)       # before the inode table sizes its descriptor cache
    opts = ShareOptions(os.path.abspath(args.hostdir), cache=args.cache,
                        readonly=args.readonly, writeback=args.writeback,
                        allow_devices=args.allow_devices,
                        idmap=IdMap(args.uid_map, args.gid_map))
    server = FuseServer(opts)
    if args.socket:
        return _serve_vhost_user(server, args)
    transport = DevFuse(server, args.mount, readonly=args.readonly,
                        allow_devices=args.allow_devices, max_threads=args.threads,
                        io_uring=args.io_uring)
    watch = HostWatch(server) if opts.policy.watch else None
    transport.mount()
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum
        transport.unmount()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        if watch is not None:
            watch.start()
        transport.start()
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)
        while not transport.wait(timeout=1.0):
            if stop["signal"] is not None and not transport.wait(timeout=5.0):
                transport.abort()      # still busy after a signal: end the connection
    finally:
        transport.unmount()
        if watch is not None:
            watch.stop()
        transport.close()
        server.close()
    return 0


def _serve_vhost_user(server, args: argparse.Namespace) -> int:
    """The share as a vhost-user-fs backend, until SIGINT or SIGTERM (no host watch:
    virtio-fs cannot carry its invalidations; pyhv.share.virtiofs)."""
    import os
    import signal
    import sys

    from pyhv.share.virtiofs import FsDevice
    from pyhv.virtio.vhost_user import Backend

    if not 1 <= args.queues <= 16:
        raise PyhvError(f"--queues {args.queues}: between 1 and 16")
    try:
        device = FsDevice(server, args.tag, args.queues)
    except ValueError as e:
        raise PyhvError(str(e)) from None
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(0))
    backend = Backend(device, args.socket)
    try:
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)
        print("pyhv share: ready", flush=True)
        backend.serve_forever()
    finally:
        backend.close()
        server.close()
    return 0
