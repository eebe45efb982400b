"""The control socket: one JSON object per line over a unix stream socket, each request
answered by one line. Requests: {"op": "expose", "spec": "8080:80/tcp"}, {"op":
"unexpose", "spec": ...}, {"op": "list"}, {"op": "stats"}. Answers: {"ok": true, ...} or
{"ok": false, "error": "one line"}."""

from __future__ import annotations

import asyncio
import json
import os
import socket

from pyhv.errors import PyhvError
from pyhv.net.config import parse_forward

MAX_LINE = 1 << 16


class ControlServer:
    def __init__(self, path: str, forwards, stack):
        self.path, self.forwards, self.stack = path, forwards, stack
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.server = await asyncio.start_unix_server(self._client, self.path, limit=MAX_LINE)
        os.chmod(self.path, 0o600)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            while line := await reader.readline():
                writer.write(json.dumps(await self.handle(line)).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def handle(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise PyhvError("a request is a JSON object")
            op = req.get("op")
            if op == "expose":
                await self.forwards.add(parse_forward(str(req.get("spec", ""))))
                return {"ok": True}
            if op == "unexpose":
                self.forwards.remove(parse_forward(str(req.get("spec", ""))))
                return {"ok": True}
            if op == "list":
                return {"ok": True, "forwards": self.forwards.list()}
            if op == "stats":
                return {"ok": True, "stats": self.stack.stats(),
                        "forwards": self.forwards.list()}
            raise PyhvError(f"unknown op {op!r}")
        except json.JSONDecodeError as e:
            return {"ok": False, "error": f"bad JSON: {e}"}
        except PyhvError as e:
            return {"ok": False, "error": str(e)}


def request(path: str, req: dict, timeout: float = 10.0) -> dict:
    """One request to a running `pyhv net serve --control PATH` (blocking client)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            raise PyhvError(f"cannot reach the control socket {path}: {e.strerror}") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data or b"{}")
    if not reply.get("ok"):
        raise PyhvError(reply.get("error", "no answer from the control socket"))
    return reply
