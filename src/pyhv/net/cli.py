"""`pyhv net serve | expose | unexpose | list | stats`."""

from __future__ import annotations

import argparse
import json
import sys

from pyhv.errors import PyhvError


def register(subparsers) -> None:
    net = subparsers.add_parser("net", help="user-mode network (the VPNKit equivalent)")
    sub = net.add_subparsers(dest="net_command", required=True)

    serve = sub.add_parser("serve", help="run a network for a guest on a frame port")
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--tap", metavar="IFNAME", help="open (or create) this TAP device")
    where.add_argument("--stream", metavar="PATH",
                       help="listen here for QEMU -netdev stream (4-byte length framing)")
    where.add_argument("--dgram", metavar="PATH",
                       help="bind a unix datagram socket here (one frame per datagram)")
    serve.add_argument("--netns", help="with --tap: namespace name or path (/proc/PID/ns/net)")
    serve.add_argument("--configure", action="store_true",
                       help="with --tap: set the namespace's address, route and resolv.conf "
                            "instead of leaving it to DHCP")
    serve.add_argument("--no-offload", action="store_true",
                       help="with --tap: no IFF_VNET_HDR (no TSO/checksum offload)")
    serve.add_argument("--subnet", default="192.168.65.0/24")
    serve.add_argument("--gateway", default="192.168.65.1",
                       help="gateway, DHCP and DNS server address")
    serve.add_argument("--guest-ip", default="192.168.65.2", help="the first DHCP lease")
    serve.add_argument("--host-loopback", default="192.168.65.254",
                       help="address whose connections go to the host's 127.0.0.1")
    serve.add_argument("--no-host-loopback", action="store_true")
    serve.add_argument("--mtu", type=int, default=65520)
    serve.add_argument("--dns-upstream", action="append", default=[], metavar="ADDR[:PORT]",
                       help="forward DNS here instead of /etc/resolv.conf's servers")
    serve.add_argument("-p", "--publish", action="append", default=[],
                       metavar="[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]", help="port forward")
    serve.add_argument("--control", metavar="PATH", help="control socket (JSON lines)")
    serve.add_argument("--pcap", metavar="FILE", help="write the guest's traffic here")
    serve.add_argument("--connect-timeout", type=float, default=10.0)
    serve.add_argument("--max-connecting", type=int, default=1024)
    serve.add_argument("--busy-poll", type=int, default=50, metavar="USEC",
                       help="keep polling up to USEC after each event before sleeping, "
                            "adaptively (0: off; default 50)")
    serve.set_defaults(handler=cmd_serve)

    for name, helptext in (("expose", "add a port forward"),
                           ("unexpose", "remove a port forward")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("spec", metavar="[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]")
        p.add_argument("--control", required=True, metavar="PATH")
        p.set_defaults(handler=cmd_control)
    for name, helptext in (("list", "list port forwards"), ("stats", "print counters")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--control", required=True, metavar="PATH")
        p.set_defaults(handler=cmd_control)


def cmd_serve(args: argparse.Namespace) -> int:
    from pyhv.net.config import NetConfig, parse_forward, parse_upstream
    from pyhv.net.ports import DgramPort, FdPort, StreamPort
    from pyhv.net.service import NetService, run

    cfg = NetConfig(subnet=args.subnet, gateway=args.gateway, guest_ip=args.guest_ip,
                    host_loopback=None if args.no_host_loopback else args.host_loopback,
                    mtu=args.mtu, dns_upstream=[parse_upstream(u) for u in args.dns_upstream],
                    connect_timeout=args.connect_timeout, max_connecting=args.max_connecting,
                    busy_poll_us=args.busy_poll)
    forwards = [parse_forward(p) for p in args.publish]
    if (args.netns or args.configure) and not args.tap:
        raise PyhvError("--netns and --configure go with --tap")
    if args.tap:
        from pyhv.net.tap import configure, open_tap

        port = FdPort(open_tap(args.tap, args.netns, offload=not args.no_offload),
                      offload=not args.no_offload)
        if args.configure:
            configure(args.tap, args.netns, cfg)
    elif args.stream:
        port = StreamPort(args.stream)
    else:
        port = DgramPort(args.dgram)
    service = NetService(cfg, port, forwards, args.control, args.pcap)

    def ready() -> None:
        print("pyhv net: ready", flush=True)

    run(service, ready)
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    from pyhv.net.config import parse_forward
    from pyhv.net.control import request

    if args.net_command in ("expose", "unexpose"):
        parse_forward(args.spec)              # a bad spec is reported before connecting
        request(args.control, {"op": args.net_command, "spec": args.spec})
        return 0
    reply = request(args.control, {"op": args.net_command})
    if args.net_command == "list":
        for f in reply["forwards"]:
            print(f"{f['spec']}\tconnections={f['connections']} active={f['active']} "
                  f"in={f['bytes_in']} out={f['bytes_out']}")
    else:
        json.dump(reply, sys.stdout, indent=2)
        print()
    return 0
