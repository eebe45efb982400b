"""DNS on the gateway address (UDP and TCP): `host.pyhv.internal` and
`gateway.pyhv.internal` answered here, every other query forwarded unchanged to
`--dns-upstream` or to the host's resolvers from /etc/resolv.conf (re-read when it changes).

It listens on ephemeral 127.0.0.1 ports; the NAT sends the guest's gateway:53 there, so
the guest's DNS traffic is ordinary flows on both sides."""

from __future__ import annotations

import asyncio
import os
import struct

from pyhv.net.config import DOMAIN, NetConfig

TIMEOUT = 3.0


def question(msg: bytes) -> tuple[str, int, int] | None:
    """(name, qtype, end offset of the question) of a one-question query, or None."""
    if len(msg) < 12 or struct.unpack_from("!H", msg, 4)[0] != 1 or msg[2] & 0x80:
        return None
    labels, i = [], 12
    while i < len(msg) and msg[i]:
        n = msg[i]
        if n > 63 or i + 1 + n > len(msg):
            return None
        labels.append(msg[i + 1:i + 1 + n].decode("ascii", "replace").lower())
        i += 1 + n
    if i + 5 > len(msg):
        return None
    return ".".join(labels), struct.unpack_from("!H", msg, i + 1)[0], i + 5


class _Forward(asyncio.DatagramProtocol):
    def __init__(self, done: asyncio.Future):
        self.done = done

    def datagram_received(self, data, addr) -> None:
        if not self.done.done():
            self.done.set_result(data)

    def error_received(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


class Dns:
    def __init__(self, cfg: NetConfig):
        self.cfg = cfg
        self.names = {f"gateway.{DOMAIN}": cfg.gw}
        if cfg.alias is not None:
            self.names[f"host.{DOMAIN}"] = cfg.alias
        self._resolv: tuple[float, list[tuple[str, int]]] = (-1.0, [])
        self.queries = self.forwarded = self.failed = 0
        self.udp: asyncio.DatagramTransport | None = None
        self.tcp: asyncio.AbstractServer | None = None

    async def start(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """Listen; returns the UDP and TCP addresses the NAT should send gateway:53 to."""
        loop = asyncio.get_running_loop()
        self.udp, _ = await loop.create_datagram_endpoint(lambda: _UdpServer(self),
                                                          local_addr=("127.0.0.1", 0))
        self.tcp = await asyncio.start_server(self._tcp_client, "127.0.0.1", 0)
        return (self.udp.get_extra_info("sockname")[:2],
                self.tcp.sockets[0].getsockname()[:2])

    def close(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            self.tcp.close()

    def upstreams(self) -> list[tuple[str, int]]:
        if self.cfg.dns_upstream:
            return self.cfg.dns_upstream
        try:
            mtime = os.stat(self.cfg.resolv_conf).st_mtime
        except OSError:
            return self._resolv[1]
        if mtime != self._resolv[0]:
            servers = []
            with open(self.cfg.resolv_conf, errors="replace") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 2 and parts[0] == "nameserver" and ":" not in parts[1]:
                        servers.append((parts[1], 53))
            self._resolv = (mtime, servers)
        return self._resolv[1]

    def local(self, msg: bytes) -> bytes | None:
        """The answer for names under pyhv.internal, None for everything else."""
        q = question(msg)
        if q is None:
            return msg[:2] + b"\x81\x81" + b"\0" * 8 if len(msg) >= 12 else None  # FORMERR
        name, qtype, end = q
        if name != DOMAIN and not name.endswith("." + DOMAIN):
            return None
        addr = self.names.get(name)
        rcode = 0 if addr is not None or name == DOMAIN else 3
        answers = b""
        if addr is not None and qtype in (1, 255):
            answers = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + addr.to_bytes(4, "big")
        flags = 0x8400 | (msg[2] & 1) << 8 | 0x80 | rcode        # QR AA, RD copied, RA
        return (msg[:2] + struct.pack("!HHHHH", flags, 1, 1 if answers else 0, 0, 0)
                + msg[12:end] + answers)

    async def resolve(self, msg: bytes) -> bytes | None:
        self.queries += 1
        answer = self.local(msg)
        if answer is not None:
            return answer
        loop = asyncio.get_running_loop()
        for server in self.upstreams():
            done = loop.create_future()
            try:
                transport, _ = await loop.create_datagram_endpoint(lambda d=done: _Forward(d),
                                                                   remote_addr=server)
            except OSError:
                continue
            try:
                transport.sendto(msg)
                reply = await asyncio.wait_for(done, TIMEOUT)
                self.forwarded += 1
                return reply
            except (OSError, TimeoutError):
                continue
            finally:
                transport.close()
        self.failed += 1
        return msg[:2] + bytes([0x80 | (msg[2] & 1), 0x82]) + msg[4:6] + b"\0" * 6 + \
            msg[12:] if len(msg) >= 12 else None                  # SERVFAIL

    async def _tcp_client(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                n = struct.unpack("!H", await reader.readexactly(2))[0]
                reply = await self.resolve(await reader.readexactly(n))
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, dns: Dns):
        self.dns = dns
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        asyncio.get_running_loop().create_task(self._answer(data, addr))

    async def _answer(self, data: bytes, addr) -> None:
        reply = await self.dns.resolve(data)
        if reply is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)
