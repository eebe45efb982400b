"""Network settings with their documented defaults, and parsing of `-p` forward specs.

Memory bounds (documented in README): per TCP flow at most `tcp_rcv_buffer` bytes from the
guest not yet taken by the host socket (its write buffer plus out-of-order data) and
`tcp_snd_buffer` bytes (plus one host read, <= 256 KiB) from the host not yet acknowledged
by the guest; at most
`max_tcp_flows` flows, `max_udp_flows` UDP flows with `udp_queue` datagrams queued each while
their socket opens, and `max_fragments` partial datagrams of at most 64 KiB.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from pyhv.errors import PyhvError

GATEWAY_MAC = 0x5A94EFE40CDD
DOMAIN = "pyhv.internal"
MAX_BUSY_POLL_US = 1000     # beyond, polling costs more CPU than any wake-up it saves


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


@dataclass
class NetConfig:
    subnet: str = "192.168.65.0/24"
    gateway: str = "192.168.65.1"
    host_loopback: str | None = "192.168.65.254"     # None: --no-host-loopback
    guest_ip: str = "192.168.65.2"                   # the first DHCP lease
    mtu: int = 65520
    dns_upstream: list[tuple[str, int]] = field(default_factory=list)  # [] -> resolv.conf
    resolv_conf: str = "/etc/resolv.conf"
    lease_time: int = 3600
    connect_timeout: float = 10.0
    max_connecting: int = 1024
    max_connecting_per_dest: int = 64
    max_tcp_flows: int = 16384
    tcp_rcv_buffer: int = 1 << 20
    tcp_snd_buffer: int = 1 << 20
    tcp_idle_timeout: float = 7200.0
    time_wait: float = 2.0
    max_udp_flows: int = 4096
    udp_idle_timeout: float = 60.0
    udp_queue: int = 16
    max_fragments: int = 64
    fragment_timeout: float = 15.0
    busy_poll_us: int = 50              # poll this long after events (0: off), net.busypoll

    def __post_init__(self) -> None:
        try:
            net = ipaddress.IPv4Network(self.subnet)
            addrs = [self.gateway, self.guest_ip] + ([self.host_loopback]
                                                     if self.host_loopback else [])
            for a in addrs:
                if ipaddress.IPv4Address(a) not in net:
                    raise PyhvError(f"{a} is not inside the subnet {self.subnet}")
        except ValueError as e:
            raise PyhvError(f"bad network address: {e}") from None
        if not 576 <= self.mtu <= 65520:
            raise PyhvError(f"MTU must be within 576..65520, got {self.mtu}")
        if not 0 <= self.busy_poll_us <= MAX_BUSY_POLL_US:
            raise PyhvError(f"--busy-poll must be within 0..{MAX_BUSY_POLL_US} us, "
                            f"got {self.busy_poll_us}")
        self.net = int(net.network_address)
        self.netmask = int(net.netmask)
        self.broadcast = int(net.broadcast_address)
        self.gw = ip(self.gateway)
        self.alias = ip(self.host_loopback) if self.host_loopback else None
        self.guest = ip(self.guest_ip)


@dataclass(frozen=True)
class Forward:
    """A port forward: host (ip, port) -> guest port, for one protocol."""
    proto: str
    host_ip: str
    host_port: int
    guest_port: int

    @property
    def spec(self) -> str:
        return f"{self.host_ip}:{self.host_port}:{self.guest_port}/{self.proto}"


_FORWARD = re.compile(r"^(?:(?P<ip>[0-9.]+):)?(?P<hp>\d+):(?P<gp>\d+)(?:/(?P<proto>tcp|udp))?$")


def parse_forward(text: str) -> Forward:
    """`[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]`; the host side binds 127.0.0.1 by default."""
    m = _FORWARD.match(text.strip())
    if not m:
        raise PyhvError(f"bad port forward {text!r}: expected [HOSTIP:]HOSTPORT:GUESTPORT"
                        "[/tcp|/udp]")
    host_ip = m["ip"] or "127.0.0.1"
    try:
        ipaddress.IPv4Address(host_ip)
    except ValueError:
        raise PyhvError(f"bad host address in port forward {text!r}") from None
    hp, gp = int(m["hp"]), int(m["gp"])
    if not (0 < hp < 65536 and 0 < gp < 65536):
        raise PyhvError(f"port out of range in port forward {text!r}")
    return Forward(m["proto"] or "tcp", host_ip, hp, gp)


def parse_upstream(text: str) -> tuple[str, int]:
    """`ADDR[:PORT]` of a DNS server (port 53 by default)."""
    addr, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "53")
    try:
        ipaddress.IPv4Address(addr)
        return addr, int(port or 53)
    except ValueError:
        raise PyhvError(f"bad DNS upstream {text!r}: expected ADDR[:PORT]") from None
