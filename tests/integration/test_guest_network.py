"""`pyhv run` with pyhv's user-mode network attached (QEMU -netdev stream + virtio-net):
the guest reaches host services by name, and published ports reach the guest."""

from __future__ import annotations

import http.server
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from tests.helpers.pyhvrun import PYHV, pyhv

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def host_http_server():
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"hello from the host loopback\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_guest_reaches_host_loopback_by_name_with_dhcp_and_dns(host_http_server):
    done = pyhv("run", "--", "sh", "-c",
                f"wget -qO- http://host.pyhv.internal:{host_http_server}/ && "
                "ip -4 addr show eth0 | grep -o 'inet [0-9./]*' && cat /etc/resolv.conf",
                timeout=300)
    assert done.returncode == 0, done.stderr
    assert "hello from the host loopback" in done.stdout
    assert "inet 192.168.65." in done.stdout
    assert "nameserver 192.168.65.1" in done.stdout


GUEST_SERVER = """
mkdir -p /www/cgi-bin
echo hello-from-the-guest > /www/index.html
printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho bye\\ntouch /www/done\\n' \
    > /www/cgi-bin/stop
chmod +x /www/cgi-bin/stop
httpd -p 80 -h /www
while [ ! -e /www/done ]; do sleep 0.2; done
"""


def test_published_port_reaches_the_guest_server():
    port = free_port()
    proc = subprocess.Popen([*PYHV, "run", "-p", f"{port}:80", "--", "sh", "-c",
                             GUEST_SERVER], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        body = None
        deadline = time.monotonic() + 240
        while body is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
            except OSError:
                time.sleep(0.5)
        assert body == b"hello-from-the-guest\n"
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/cgi-bin/stop",
                                      timeout=10).read() == b"bye\n"
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_network_none_has_no_nic_and_refuses_publish():
    done = pyhv("run", "--network", "none", "--", "ls", "/sys/class/net", timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["lo"]
    done = pyhv("run", "--network", "none", "-p", "8080:80", "--", "true")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("pyhv: -p needs a network")


def test_bad_publish_spec_is_one_line():
    done = pyhv("run", "-p", "notaport", "--", "true", timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "pyhv: bad port forward 'notaport': expected [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]")


def test_network_service_failure_is_one_line():
    with socket.socket() as taken:                      # the published port is in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = pyhv("run", "-p", f"{port}:80", "--", "true", timeout=300)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pyhv: the network service did not start: ")
    assert "pyhv: pyhv:" not in last and "Traceback" not in done.stderr
