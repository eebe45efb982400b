"""A network namespace with a TAP served by `pyhv net serve`, for tests against Linux's own
TCP/IP stack. Everything created is removed again in `close()`."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).with_name("net_client.py")
BRIDGE = Path(__file__).with_name("net_bridge.py")
_ids = itertools.count()


@contextmanager
def udp_echo_server():
    """A UDP echo server on 127.0.0.1 (its port), on a thread that ends with the block:
    closing a socket wakes no recvfrom, so the thread polls a stop flag between timeouts."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.2)
    done = threading.Event()

    def echo():
        while not done.is_set():
            try:
                data, addr = udp.recvfrom(65536)
            except TimeoutError:
                continue
            udp.sendto(data, addr)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    try:
        yield udp.getsockname()[1]
    finally:
        done.set()
        thread.join(5)
        udp.close()


def wait_listening(port: int, pid: int | str = "self", timeout: float = 30.0) -> None:
    """Return once a TCP socket listens on `port` in the network namespace of process `pid`
    (read from /proc, not probed: `iperf3 -s -1` would take a probe for its one client).
    A server started in the background is then ready for its first client."""
    deadline = time.monotonic() + timeout
    suffix = f":{port:04X}"
    while True:
        for table in ("tcp", "tcp6"):
            try:
                with open(f"/proc/{pid}/net/{table}") as f:
                    next(f)
                    if any(fields[1].endswith(suffix) and fields[3] == "0A"
                           for fields in (line.split() for line in f)):
                        return
            except (FileNotFoundError, ProcessLookupError):
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on TCP port {port}")
        time.sleep(0.01)


def netns_reason() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and TAP devices)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    if shutil.which("ip") is None:
        return "no ip(8) (iproute2)"
    return None


class NetNs:
    """`ip netns add` + `pyhv net serve --tap ... --netns ...` in the background."""

    def __init__(self, tmp: Path, *serve_args: str, configure: bool = True,
                 preexec_fn=None, transport: str = "tap"):
        self.name = f"pyhvt{os.getpid() % 10000}x{next(_ids)}"
        self.tap = "tap0"
        self.tmp = tmp
        self.control = str(tmp / f"{self.name}.ctl")
        self.proc: subprocess.Popen | None = None
        self.bridge: subprocess.Popen | None = None
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            args = [sys.executable, "-m", "pyhv", "--debug", "net", "serve", "--control",
                    self.control, *serve_args]
            sock = str(tmp / f"{self.name}.sock")
            if transport == "tap":
                args += ["--tap", self.tap, "--netns", self.name]
                if configure:
                    args.append("--configure")
            else:
                args += [f"--{transport}", sock]
            self.log = open(tmp / f"{self.name}.log", "w+")   # noqa: SIM115
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log,
                                         text=True, cwd=ROOT, preexec_fn=preexec_fn)
            line = self.proc.stdout.readline()
            if "ready" not in line:
                self.proc.wait(timeout=10)
                self.log.seek(0)
                raise RuntimeError(f"pyhv net serve did not start: {self.log.read()}")
            if transport != "tap":
                self._bridge(transport, sock)
        except BaseException:
            self.close()
            raise

    def _bridge(self, transport: str, sock: str) -> None:
        """Linux in the namespace on a TAP, its frames carried to pyhv's socket."""
        self.bridge = subprocess.Popen([sys.executable, str(BRIDGE), transport, sock,
                                        self.name, self.tap], stdout=subprocess.PIPE,
                                       text=True, cwd=ROOT)
        assert self.bridge.stdout.readline().strip() == "bridged"
        for cmd in ("ip link set lo up", f"ip link set {self.tap} mtu 65520 up",
                    f"ip addr add 192.168.65.2/24 dev {self.tap}",
                    "ip route add default via 192.168.65.1"):
            self.run(*cmd.split())
        etc = Path("/etc/netns") / self.name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 192.168.65.1\n")

    def run(self, *cmd: str, timeout: float = 120, check: bool = True,
            **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        done = subprocess.run(["ip", "netns", "exec", self.name, *cmd], timeout=timeout, **kw)
        if check and done.returncode:
            raise AssertionError(f"{cmd} failed ({done.returncode}): {done.stdout}"
                                 f"{done.stderr}")
        return done

    def client(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        """tests/helpers/net_client.py inside the namespace (with the venv's Python)."""
        return self.run(sys.executable, str(CLIENT), *args, timeout=timeout,
                        check=check).stdout

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kw)

    def pyhv(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "pyhv", "net", *args, "--control",
                               self.control], capture_output=True, text=True, cwd=ROOT,
                              timeout=30)
        if check and done.returncode:
            raise AssertionError(f"pyhv net {args}: {done.stderr}")
        return done

    def stats(self) -> dict:
        return json.loads(self.pyhv("stats").stdout)["stats"]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        if self.bridge is not None:
            self.bridge.kill()
            self.bridge.wait()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        shutil.rmtree(f"/etc/netns/{self.name}", ignore_errors=True)
