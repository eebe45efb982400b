"""User-mode network benchmarks: pyhv (`pyhv net serve --tap` in a namespace) next to
slirp4netns and pasta on the same namespace + TAP setup (MTU 65520), measured in the same
run. TCP throughput both ways (target >= 1.5x slirp4netns), short connections per second
through the host-loopback address (target >= pasta), and throughput through a port forward
host -> namespace (target >= 1.5x slirp4netns's port forwarding)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.hostload import cross_cpu_round_trip_us
from tests.helpers.net_ns import wait_listening

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 3
ROUNDS = 3          # tools interleaved per round, best of each kept: host load hits all alike
TOOLS = ("pyhv", "slirp4netns", "pasta")
_ids = itertools.count()

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("iperf3", "slirp4netns", "pasta")),
    reason="needs root, iperf3, slirp4netns and pasta (apt-get install iperf3 slirp4netns passt)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ns_exec(ns: str, *cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          check=True, timeout=120, **kw)


def _wait(pred, what: str) -> None:
    for _ in range(200):
        if pred():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


@contextlib.contextmanager
def network(tool: str, forward: tuple[int, int] | None = None):
    """(namespace, address of the host's loopback as seen from inside) for one tool."""
    ns = f"pyhvb{os.getpid() % 10000}x{next(_ids)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    path = f"/run/netns/{ns}"
    proc = None
    try:
        if tool == "pyhv":
            fwd = ["-p", f"127.0.0.1:{forward[0]}:{forward[1]}"] if forward else []
            proc = subprocess.Popen([sys.executable, "-m", "pyhv", "net", "serve", "--tap",
                                     "tap0", "--netns", ns, "--configure", *fwd],
                                    stdout=subprocess.PIPE, text=True, cwd=ROOT)
            assert "ready" in proc.stdout.readline()
            host = "192.168.65.254"
        elif tool == "slirp4netns":
            api = f"/tmp/{ns}.api"
            proc = subprocess.Popen(["slirp4netns", "--configure", "--mtu=65520",
                                     "--api-socket", api, "--netns-type=path", path, "tap0"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait(lambda: os.path.exists(api), "slirp4netns")
            _wait(lambda: "10.0.2.100" in ns_exec(ns, "ip", "-4", "addr").stdout, "address")
            if forward:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(api)
                    s.sendall(json.dumps({"execute": "add_hostfwd", "arguments": {
                        "proto": "tcp", "host_addr": "127.0.0.1", "host_port": forward[0],
                        "guest_port": forward[1]}}).encode())
                    assert b"error" not in s.recv(4096)
            host = "10.0.2.2"
        else:
            fwd = ["-t", f"{forward[0]}:{forward[1]}"] if forward else ["-t", "none"]
            proc = subprocess.Popen(["pasta", "--config-net", "--runas", "0:0", *fwd, "-u",
                                     "none", "-T", "none", "-U", "none", "--netns", path, "-f"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait(lambda: "default" in ns_exec(ns, "ip", "route").stdout, "pasta")
            host = ns_exec(ns, "ip", "route").stdout.split("default via ")[1].split()[0]
        yield ns, host
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def iperf(ns: str, host: str, reverse: bool) -> float:
    """Mbit/s received, namespace client -> host server (or the reverse with -R)."""
    port = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        out = ns_exec(ns, "iperf3", "-c", host, "-p", str(port), "-t", str(SECONDS), "-J",
                      *(["-R"] if reverse else [])).stdout
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        server.wait(timeout=30)


@pytest.mark.parametrize("direction", ["ns_to_host", "host_to_ns"])
def test_tcp_throughput(direction, record, benchmark):
    results = dict.fromkeys(TOOLS, 0.0)

    def once():
        for tool in TOOLS:
            with network(tool) as (ns, host):
                results[tool] = max(results[tool],
                                    iperf(ns, host, reverse=direction == "host_to_ns"))

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    record(f"tcp throughput {direction}", "Mbit/s", pyhv=results["pyhv"],
           anchor=results["slirp4netns"], anchor_name="slirp4netns", target=1.5,
           pasta=results["pasta"])


CLIENT = """
import socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    s = socket.create_connection((host, port))
    s.sendall(b"GET\\n")
    assert s.recv(16) == b"ok\\n"
    s.close()
    n += 1
print(n / seconds)
"""


def test_short_connections(record, benchmark):
    srv = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = srv.getsockname()[1]

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                c.recv(16)
                c.sendall(b"ok\n")

    threading.Thread(target=serve, daemon=True).start()
    results = dict.fromkeys(TOOLS, 0.0)

    def once():
        for tool in TOOLS:
            with network(tool) as (ns, host):
                out = ns_exec(ns, sys.executable, "-c", CLIENT, host, str(port), str(SECONDS))
                results[tool] = max(results[tool], float(out.stdout))

    try:
        benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    finally:
        srv.close()
    record("short connections", "conn/s", pyhv=results["pyhv"], anchor=results["pasta"],
           anchor_name="pasta", target=1.0, slirp4netns=results["slirp4netns"],
           cross_cpu_round_trip_us=cross_cpu_round_trip_us())


def test_port_forward_throughput(record, benchmark):
    results = dict.fromkeys(TOOLS, 0.0)

    def once():
        for tool in TOOLS:
            hp = free_port()
            with network(tool, forward=(hp, 5201)) as (ns, _):
                server = subprocess.Popen(["ip", "netns", "exec", ns, "iperf3", "-s", "-1",
                                           "-p", "5201"], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
                try:
                    wait_listening(5201, server.pid)
                    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(hp), "-t",
                                          str(SECONDS), "-J"], capture_output=True, text=True,
                                         check=True, timeout=120).stdout
                    bps = json.loads(out)["end"]["sum_received"]["bits_per_second"]
                    results[tool] = max(results[tool], bps / 1e6)
                finally:
                    server.kill()
                    server.wait()

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    record("port forward throughput host_to_ns", "Mbit/s", pyhv=results["pyhv"],
           anchor=results["slirp4netns"], anchor_name="slirp4netns port forwarding",
           target=1.5, pasta=results["pasta"])
