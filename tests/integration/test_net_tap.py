"""`pyhv net serve --tap` against Linux's own TCP/IP stack in a network namespace: the
namespace's programs reach host sockets on 127.0.0.1 through pyhv (via the host-loopback
alias 192.168.65.254), and host programs reach the namespace through port forwards."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import socket
import socketserver
import subprocess
import threading

import pytest

from tests.helpers.net_ns import NetNs, netns_reason, udp_echo_server, wait_listening

GW, ALIAS, GUEST = "192.168.65.1", "192.168.65.254", "192.168.65.2"
BIG = 100 * 1000 * 1000

pytestmark = pytest.mark.skipif(netns_reason() is not None, reason=str(netns_reason()))


class _Threaded(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


def start(server) -> int:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


class HalfCloseGuestFirst(socketserver.BaseRequestHandler):
    """Reads to EOF, then answers: the guest's FIN must reach us while we can still send."""

    def handle(self):
        n = 0
        while data := self.request.recv(65536):
            n += len(data)
        self.request.sendall(f"got {n}".encode())


class HalfCloseHostFirst(socketserver.BaseRequestHandler):
    """Sends, shuts down its side, then still reads what the guest sends after our FIN."""

    seen: list[str] = []

    def handle(self):
        self.request.sendall(b"y" * 200_000)
        self.request.shutdown(socket.SHUT_WR)
        got = b""
        while data := self.request.recv(65536):
            got += data
        HalfCloseHostFirst.seen.append(got.decode())


class Resetter(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.recv(100)
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        self.request.close()


class Files(http.server.BaseHTTPRequestHandler):
    """GET /big: BIG deterministic bytes; PUT: answers the sha256 of the body."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(BIG))
        self.end_headers()
        block = self.server.block
        for _ in range(BIG // len(block)):
            self.wfile.write(block)

    def do_PUT(self):
        h, left = hashlib.sha256(), int(self.headers["Content-Length"])
        while left:
            data = self.rfile.read(min(left, 1 << 20))
            h.update(data)
            left -= len(data)
        body = h.hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def hosts():
    """Host servers on 127.0.0.1, reached from the namespace via the alias."""
    servers = {name: _Threaded(("127.0.0.1", 0), handler) for name, handler in
               [("echo", Echo), ("guest_first", HalfCloseGuestFirst),
                ("host_first", HalfCloseHostFirst), ("reset", Resetter)]}
    servers["http"] = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    servers["http"].block = hashlib.sha256(b"pyhv").digest() * 31250     # 1 MB
    ports = {name: start(s) for name, s in servers.items()}
    with udp_echo_server() as udp_port:
        ports["udp"] = udp_port
        yield ports
    for s in servers.values():
        s.shutdown()
        s.server_close()


@pytest.fixture(scope="module")
def ns(tmp_path_factory, hosts):
    n = NetNs(tmp_path_factory.mktemp("net"), "--connect-timeout", "3")
    yield n
    n.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ping_gateway(ns):
    out = ns.run("busybox", "ping", "-c", "3", "-W", "5", GW).stdout
    assert "3 packets received" in out


def test_refused_port_gives_econnrefused(ns):
    assert ns.client("refused", ALIAS, str(free_port())).strip() == "ECONNREFUSED"


def test_tcp_echo_and_udp_echo(ns, hosts):
    assert ns.client("connect", ALIAS, str(hosts["echo"])).strip() == "ok ping"
    assert ns.client("udp_echo", ALIAS, str(hosts["udp"])).strip() == "udp-hello"


def test_busy_poll_is_on_by_default_and_can_be_turned_off(ns, hosts, tmp_path):
    """The TAP port polls up to 50 us after events by default (`hvcore.net.busypoll`);
    `--busy-poll 0` serves without it, just as well."""
    assert ns.stats()["busy poll"]["max us"] == 50
    off = NetNs(tmp_path, "--busy-poll", "0")
    try:
        assert off.client("connect", ALIAS, str(hosts["echo"])).strip() == "ok ping"
        assert off.stats()["busy poll"] is None
    finally:
        off.close()


def test_half_close_guest_first(ns, hosts):
    assert ns.client("halfclose_guest", ALIAS, str(hosts["guest_first"])).strip() == \
        "got 100000"


def test_half_close_host_first(ns, hosts):
    out = ns.client("halfclose_host", ALIAS, str(hosts["host_first"])).strip()
    assert out == "200000"                      # all data, then EOF
    for _ in range(100):
        if HalfCloseHostFirst.seen:
            break
        threading.Event().wait(0.1)
    assert HalfCloseHostFirst.seen == ["after-eof 200000"]   # the guest still sent after it


def test_host_reset_reaches_guest(ns, hosts):
    assert ns.client("reset", ALIAS, str(hosts["reset"])).strip() == "ECONNRESET"


def test_dns_builtin_names_over_udp_and_tcp(ns):
    out = ns.run("getent", "ahostsv4", "host.pyhv.internal").stdout
    assert out.split()[0] == ALIAS
    assert ns.client("dns_tcp", GW, "gateway.pyhv.internal").split() == ["1", GW]


@pytest.mark.slow
def test_download_and_upload_100mb(ns, hosts, tmp_path):
    url = f"http://{ALIAS}:{hosts['http']}/big"
    out = ns.run("sh", "-c", f"curl -sS --fail {url} | sha256sum").stdout.split()[0]
    expected = hashlib.sha256()
    block = hashlib.sha256(b"pyhv").digest() * 31250
    for _ in range(BIG // len(block)):
        expected.update(block)
    assert out == expected.hexdigest()
    upload = tmp_path / "up.bin"
    with open(upload, "wb") as f:
        f.write(os.urandom(BIG))
    digest = hashlib.sha256(upload.read_bytes()).hexdigest()
    got = ns.run("curl", "-sS", "--fail", "-T", str(upload), url.replace("/big", "/up")).stdout
    assert got == digest


@pytest.mark.slow
def test_500_concurrent_connections(ns, hosts):
    ns.run("sh", "-c", "ulimit -n 4096")
    out = ns.run("sh", "-c", f"ulimit -n 4096 && exec {ns_python()} "
                 f"{ns_client_path()} many {ALIAS} {hosts['echo']} 500").stdout.split()
    assert out[0] == "500", (out, ns.stats())


def ns_python() -> str:
    import sys
    return sys.executable


def ns_client_path() -> str:
    from tests.helpers.net_ns import CLIENT
    return str(CLIENT)


def test_port_forward_peer_is_gateway_and_control(ns):
    server = ns.popen(ns_python(), ns_client_path(), "serve_peer", "8000",
                      stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        port = free_port()
        ns.pyhv("expose", f"{port}:8000")
        assert f"127.0.0.1:{port}:8000/tcp" in ns.pyhv("list").stdout
        with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            f = c.makefile("rb")
            assert f.readline().strip() == GW.encode()
            c.sendall(b"through the forward\n")
            assert f.readline() == b"through the forward\n"
        listing = ns.pyhv("list").stdout
        assert "connections=1" in listing
        ns.pyhv("unexpose", f"{port}:8000")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        bad = ns.pyhv("unexpose", f"{port}:8000", check=False)
        assert bad.returncode == 1 and "no forward" in bad.stderr
    finally:
        server.kill()
        server.wait()


def test_black_holed_connect_does_not_stall_others(ns, hosts):
    """A listener whose accept queue is full drops SYNs: the connect hangs. Others must not."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(hole.getsockname())
        fillers.append(c)
    try:
        stuck = ns.popen(ns_python(), ns_client_path(), "connect", ALIAS,
                         str(hole.getsockname()[1]), stdout=subprocess.PIPE, text=True)
        for _ in range(5):
            assert ns.client("connect", ALIAS, str(hosts["echo"])).strip() == "ok ping"
        out, _ = stuck.communicate(timeout=60)
        assert out.strip() == "EHOSTUNREACH"      # ICMP host unreachable after the timeout
        assert ns.stats()["counters"]["tcp connect timeouts"] >= 1
    finally:
        for c in fillers:
            c.close()
        hole.close()


def test_bad_frames_are_dropped_and_counted(ns, hosts):
    before = ns.stats()["counters"]
    sent = int(ns.client("frames", "tap0", GW, GUEST))
    assert sent > 5000
    after = ns.stats()["counters"]
    assert after["dropped"] > before.get("dropped", 0)
    for reason in ("truncated ipv4", "bad tcp checksum", "bad ipv4 checksum",
                   "bad tcp options", "bad ipv4 length"):
        assert after.get(f"dropped: {reason}", 0) > 0, reason
    assert ns.alive()
    assert ns.client("connect", ALIAS, str(hosts["echo"])).strip() == "ok ping"
    stats = ns.stats()
    assert stats["fragments dropped"] > 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 not installed")
def test_iperf3_both_directions(ns):
    port = free_port()
    for reverse in ([], ["-R"]):
        server = subprocess.Popen(["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(port)
            out = ns.run("iperf3", "-c", ALIAS, "-p", str(port), "-t", "2", "-J",
                         *reverse).stdout
            import json
            assert json.loads(out)["end"]["sum_received"]["bytes"] > 0
        finally:
            server.wait(timeout=30)


def test_memory_stays_bounded_when_peers_stop_reading(ns):
    """A host socket that never reads, and a guest that never reads: pyhv's buffers for
    each flow stay within tcp_rcv_buffer / tcp_snd_buffer (+ one host read)."""
    cap = 1 << 20
    quiet = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: held.append(quiet.accept()), daemon=True).start()
    sent = int(ns.client("flood", ALIAS, str(quiet.getsockname()[1]), "3"))
    tcp = ns.stats()["tcp"]
    assert sent > cap                          # the guest got far, the kernel buffers too
    assert 0 < tcp["buffered_to_host_max"] <= cap
    loud = socket.create_server(("127.0.0.1", 0))

    def flood_guest():
        c, _ = loud.accept()
        held.append(c)
        c.settimeout(10)
        try:
            while True:
                c.sendall(b"y" * 65536)
        except OSError:
            pass

    threading.Thread(target=flood_guest, daemon=True).start()
    sink = ns.popen(ns_python(), ns_client_path(), "sink", ALIAS,
                    str(loud.getsockname()[1]), "60", stdout=subprocess.PIPE)
    try:
        seen = []
        for _ in range(40):                    # until reading from the host has stopped
            seen.append(ns.stats()["tcp"]["buffered_to_guest_max"])
            if len(seen) > 2 and seen[-1] == seen[-2] >= cap // 2:
                break
            threading.Event().wait(0.05)
        assert cap // 2 <= max(seen) <= cap + (256 << 10), seen
    finally:
        sink.kill()
        sink.wait(timeout=30)
        for c in held:
            (c[0] if isinstance(c, tuple) else c).close()
        quiet.close()
        loud.close()


def test_ttl_expiry_and_echo_to_a_host_address(ns):
    """traceroute's first probe expires at pyhv (ICMP time exceeded from the gateway);
    an echo to one of the host's own addresses goes out through an ICMP socket."""
    out = ns.run("busybox", "traceroute", "-n", "-m", "1", "-w", "2", "-q", "1", "203.0.113.9",
                 check=False).stdout
    assert GW in out
    addrs = [a for a in subprocess.run(["hostname", "-I"], capture_output=True,
                                       text=True).stdout.split() if "." in a]
    if not addrs:
        pytest.skip("the host has no non-loopback IPv4 address to ping")
    out = ns.run("busybox", "ping", "-c", "2", "-W", "5", addrs[0], check=False).stdout
    assert "2 packets received" in out, out
