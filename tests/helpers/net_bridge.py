"""Carries frames between a TAP in a namespace and pyhv's `--stream` or `--dgram` socket,
so Linux's own TCP/IP stack can be the guest on those transports too (as QEMU would be).
Usage: net_bridge.py stream|dgram SOCKET_PATH NETNS TAPNAME"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from pyhv.net.tap import open_tap  # noqa: E402


def main(kind: str, path: str, netns: str, tap: str) -> None:
    fd = open_tap(tap, netns, offload=False)
    if kind == "stream":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        me = path + ".peer"
        if os.path.exists(me):
            os.unlink(me)
        sock.bind(me)
        sock.connect(path)
    print("bridged", flush=True)

    def tap_to_sock() -> None:
        while True:
            frame = os.read(fd, 70000)
            if kind == "stream":
                sock.sendall(struct.pack("!I", len(frame)) + frame)
            else:
                sock.send(frame)

    threading.Thread(target=tap_to_sock, daemon=True).start()
    if kind == "stream":
        f = sock.makefile("rb")
        while header := f.read(4):
            os.write(fd, f.read(struct.unpack("!I", header)[0]))
    else:
        while True:
            os.write(fd, sock.recv(70000))


if __name__ == "__main__":
    main(*sys.argv[1:])
