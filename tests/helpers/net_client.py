"""Programs run inside a test network namespace (Linux's own TCP/IP stack as the guest).
Usage: net_client.py COMMAND ARGS...; prints its result on stdout."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
import struct
import sys


def refused(host: str, port: str) -> None:
    s = socket.socket()
    s.settimeout(30)
    try:
        s.connect((host, int(port)))
        print("connected")
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e)))


def connect(host: str, port: str, timeout: str = "60") -> None:
    s = socket.socket()
    s.settimeout(float(timeout))
    try:
        s.connect((host, int(port)))
        s.sendall(b"ping\n")
        print("ok", s.recv(100).decode().strip())
    except TimeoutError:
        print("timeout")
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e)))


def halfclose_guest(host: str, port: str) -> None:
    """We shut down our side first; the host answers after our EOF."""
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(b"x" * 100_000)
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    print(data.decode())


def halfclose_host(host: str, port: str) -> None:
    """The host shuts down its side first; we keep sending after its EOF."""
    s = socket.create_connection((host, int(port)), timeout=30)
    got = 0
    while chunk := s.recv(65536):
        got += len(chunk)
    s.sendall(f"after-eof {got}".encode())
    s.shutdown(socket.SHUT_WR)
    print(got)


def udp_echo(host: str, port: str, size: str = "") -> None:
    """Prints the echoed text, or with `size` the size of an echo equal to what was sent
    (datagrams over the MTU come back as IP fragments)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    msg = bytes(i * 7 % 251 for i in range(int(size))) if size else b"udp-hello"
    for _ in range(5):
        s.sendto(msg, (host, int(port)))
        try:
            got = s.recv(65536)
        except TimeoutError:
            continue
        print(len(got) if size and got == msg else got.decode(errors="replace")[:100])
        return
    print("no reply")


def many(host: str, port: str, n: str) -> None:
    async def one(i: int) -> bool:
        r, w = await asyncio.open_connection(host, int(port))
        msg = f"conn {i} ".encode() * 100
        w.write(msg)
        await w.drain()
        w.write_eof()
        data = await r.read()
        w.close()
        return data == msg

    async def main() -> None:
        results = await asyncio.gather(*(one(i) for i in range(int(n))),
                                       return_exceptions=True)
        ok = sum(1 for r in results if r is True)
        errors = {type(r).__name__ for r in results if r is not True}
        print(ok, " ".join(sorted(errors)))

    asyncio.run(main())


def dns_tcp(server: str, name: str) -> None:
    q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    q += struct.pack("!HH", 1, 1)
    s = socket.create_connection((server, 53), timeout=10)
    s.sendall(struct.pack("!H", len(q)) + q)
    n = struct.unpack("!H", s.recv(2))[0]
    reply = b""
    while len(reply) < n:
        reply += s.recv(n - len(reply))
    ancount = struct.unpack_from("!H", reply, 6)[0]
    print(ancount, socket.inet_ntoa(reply[-4:]) if ancount else "")


def reset(host: str, port: str) -> None:
    s = socket.create_connection((host, int(port)), timeout=30)
    try:
        s.sendall(b"hello")
        data = s.recv(100)
        print("eof" if not data else "data")
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e)))


def flood(host: str, port: str, seconds: str) -> None:
    """Send as fast as possible to a host socket that never reads; print bytes sent."""
    s = socket.create_connection((host, int(port)), timeout=30)
    s.settimeout(float(seconds))
    sent = 0
    try:
        while True:
            sent += s.send(b"z" * 65536)
    except TimeoutError:
        pass
    print(sent)


def sink(host: str, port: str, seconds: str) -> None:
    """Connect and do not read for a while (the host floods us); print nothing."""
    import time

    s = socket.create_connection((host, int(port)), timeout=30)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    time.sleep(float(seconds))
    print("done")


def serve_peer(port: str) -> None:
    """Tell each client the address it came from, then echo (a port-forward target)."""
    srv = socket.create_server(("0.0.0.0", int(port)), backlog=128, reuse_port=True)
    print("listening", flush=True)
    while True:
        c, addr = srv.accept()
        c.sendall(f"{addr[0]}\n".encode())
        while data := c.recv(65536):
            c.sendall(data)
        c.close()


def frames(ifname: str, gw_ip: str, guest_ip: str) -> None:
    """Bad input: malformed frames of every kind, fragment and SYN floods, from the TAP."""
    from hvcore.net import packet as netpkt

    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((ifname, 0))
    mac = int.from_bytes(s.getsockname()[4][:6], "big")
    gw_mac = 0x5A94EFE40CDD
    b = netpkt.Builder(mac, 1500)              # "gateway" side = us: frames go to pyhv
    b.guest_mac = gw_mac
    me = struct.unpack("!I", socket.inet_aton(guest_ip))[0]
    alias = struct.unpack("!I", socket.inet_aton(gw_ip))[0]
    rnd = random.Random(4)
    sent = 0

    def send(frame) -> None:
        nonlocal sent
        s.send(bytes(frame))
        sent += 1

    good = bytes(b.tcp(me, 40000, alias, 80, 1, 1, netpkt.ACK, 100, b"data"))
    for _ in range(300):                        # random bytes after a valid Ethernet header
        send(good[:14] + rnd.randbytes(rnd.randrange(0, 120)))
    for cut in range(14, len(good)):            # every truncation
        send(good[:cut])
    send(good[:-1] + bytes([good[-1] ^ 0xFF]))  # bad TCP checksum
    send(good[:24] + b"\0\0" + good[26:])       # bad IP checksum
    bad_opt = bytearray(b.tcp(me, 40001, alias, 80, 1, 0, netpkt.SYN, 100, mss=1460))
    bad_opt[14 + 20 + 20 + 1] = 40              # option length past the header
    send(bad_opt)
    # overlapping fragments, then a flood of fragments that never complete
    udp = bytes(b.udp(me, 5000, alias, 53, b"q" * 64))
    ip = bytearray(udp[14:])
    for off, more, payload in ((0, 1, ip[20:36]), (1, 1, ip[28:44]), (2, 0, ip[36:])):
        hdr = bytearray(ip[:20])
        hdr[2:4] = struct.pack("!H", 20 + len(payload))
        hdr[6:8] = struct.pack("!H", (more << 13) | off)
        hdr[10:12] = b"\0\0"
        hdr[10:12] = struct.pack("!H", netpkt.checksum(hdr))
        send(udp[:14] + hdr + payload)
    for i in range(2000):
        hdr = bytearray(ip[:20])
        hdr[4:6] = struct.pack("!H", i)
        hdr[6:8] = struct.pack("!H", 1 << 13)
        hdr[2:4] = struct.pack("!H", 28)
        hdr[10:12] = b"\0\0"
        hdr[10:12] = struct.pack("!H", netpkt.checksum(hdr))
        send(udp[:14] + hdr + b"f" * 8)
    for i in range(3000):                       # SYN flood to a closed gateway port
        send(b.tcp(me, 10000 + i, alias, 9, i, 0, netpkt.SYN, 100, mss=1460))
    # a segment far outside the window of no flow, an ACK for nothing
    send(b.tcp(me, 40002, alias, 80, 0xFFFF0000, 12345, netpkt.ACK, 100, b"z" * 10))
    print(sent)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    globals()[cmd.replace("-", "_")](*args)
    sys.stdout.flush()
    os._exit(0)
