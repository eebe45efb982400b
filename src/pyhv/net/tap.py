"""TAP devices, opened inside a network namespace (as slirp4netns does) and optionally
configured there. Only setup lives here; the open fd becomes a `ports.FdPort`."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

from pyhv.errors import PyhvError
from pyhv.net.config import NetConfig

TUNSETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ = 0x400454CA, 0x400454D0, 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 1, 2, 4, 8
CLONE_NEWNET = 0x40000000


def netns_path(netns: str) -> str:
    """A namespace name (as `ip netns add NAME`) or a path (/proc/PID/ns/net)."""
    return netns if "/" in netns else f"/run/netns/{netns}"


@contextlib.contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Run the body (and processes it starts) in another network namespace. setns(2)
    changes the calling thread only, so the caller's thread goes back afterwards."""
    if netns is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    path = netns_path(netns)
    try:
        target = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise PyhvError(f"cannot open network namespace {path}: {e.strerror}") from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise PyhvError(f"cannot enter network namespace {path}: "
                            f"{os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "cannot return to the original namespace")
    finally:
        os.close(target)
        os.close(own)


def open_tap(ifname: str, netns: str | None = None, offload: bool = True) -> int:
    """Open (creating if needed) TAP `ifname`; with `offload`, frames carry virtio_net_hdr
    and the kernel may hand over and accept TSO and checksum-offloaded frames."""
    if len(ifname.encode()) >= 16:
        raise PyhvError(f"interface name too long: {ifname!r}")
    with in_netns(netns):
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise PyhvError(f"cannot open /dev/net/tun: {e.strerror}") from None
        try:
            flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), flags))
            if offload:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", 10))
                fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN)
        except OSError as e:
            os.close(fd)
            raise PyhvError(f"cannot set up TAP {ifname}: {e.strerror}") from None
    return fd


def configure(ifname: str, netns: str | None, cfg: NetConfig) -> None:
    """Give the namespace the guest address, the default route and resolv.conf (instead of
    DHCP). resolv.conf goes to /etc/netns/NAME/, which `ip netns exec NAME` mounts."""
    prefix = ipaddress.IPv4Network(cfg.subnet).prefixlen
    cmds = [["ip", "link", "set", "lo", "up"],
            ["ip", "link", "set", ifname, "mtu", str(cfg.mtu), "up"],
            ["ip", "addr", "replace", f"{cfg.guest_ip}/{prefix}", "dev", ifname],
            ["ip", "route", "replace", "default", "via", cfg.gateway, "dev", ifname]]
    with in_netns(netns):
        for cmd in cmds:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise PyhvError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    name = netns if netns and "/" not in netns else None
    if netns and os.path.dirname(netns) in ("/run/netns", "/var/run/netns"):
        name = os.path.basename(netns)
    if name:
        etc = Path("/etc/netns") / name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {cfg.gateway}\n")
