"""virtio-fs requests through the virtqueue, with no guest: a synthetic vhost-user frontend
keeps 32 FUSE requests in flight on one request queue, against `pyhv share serve --socket`
and against QEMU 7.2's virtiofsd on the same directory, both `cache=auto`, interleaved,
best of 3; also the server's CPU time per request. Rows: LOOKUP of random names in a
50k-file tree, CREATE (the handles stay open until the server ends), 4 KiB READ at
random offsets. Targets: 1.5x virtiofsd on
metadata, 1.0x on data."""

from __future__ import annotations

import os
import random
import struct
import sys
import time
from pathlib import Path

import pytest

from bench.services import cpu_seconds
from hvcore.memory import GuestMemory
from tests.helpers.serving import listening
from tests.helpers.vhost_user_frontend import Frontend
from tests.helpers.virtio_driver import Driver

DEPTH, ROUNDS = 32, 3
FILES, DIRS = 50_000, 100
DATA = 64 << 20
IN_HEADER = struct.Struct("<IIQQIIIHH")
LOOKUP, OPEN, READ, CREATE, INIT = 1, 14, 15, 35, 26
COUNT = {"lookup": 60_000, "create": 20_000, "read": 60_000}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vfsbench") / "tree"
    for d in range(DIRS):
        (root / f"d{d}").mkdir(parents=True)
        for f in range(FILES // DIRS):
            (root / f"d{d}" / f"f{f}").touch()
    (root / "data").write_bytes(os.urandom(DATA))
    (root / "new").mkdir()
    return root




def pyhv_server(tree: Path) -> tuple[list[str], Path]:
    sock = tree.parent / "pyhv.sock"
    return ([sys.executable, "-m", "pyhv", "share", "serve", str(tree), "--socket",
                   str(sock), "--cache", "auto"], sock), sock


def virtiofsd(tree: Path) -> tuple[list[str], Path]:
    sock = tree.parent / "vfsd.sock"
    # (sandbox=chroot: one process, so its CPU time is measured; namespace forks)
    return (["/usr/lib/qemu/virtiofsd", f"--socket-path={sock}", "-o",
                   f"source={tree}", "-o", "cache=auto", "-o", "sandbox=chroot"], sock), sock


class Client:
    """FUSE over one request queue, DEPTH requests in flight."""

    def __init__(self, sock: Path):
        self.mem = GuestMemory([(0, 64 << 20)])
        self.front = Frontend(str(sock), self.mem)
        self.front.handshake()
        self.drv = Driver(self.mem, 0x1000, 256, data=0x100000)
        self.front.start(1, self.drv)
        self.slots = {}                     # head -> (request gpa, reply gpa)
        for _ in range(DEPTH):
            req, rep = self.drv.alloc(4096), self.drv.alloc(8192)
            head = self.drv.chain([(req, 4096, False), (rep, 8192, True)])
            self.slots[head] = (req, rep)
        self.unique = 0

    def _fill(self, head: int, opcode: int, nodeid: int, body: bytes) -> None:
        self.unique += 1
        req = IN_HEADER.pack(40 + len(body), opcode, self.unique, nodeid, 0, 0, 1, 0, 0) + body
        gpa, _rep = self.slots[head]
        self.mem.write(gpa, req)
        self.drv.write_desc(head, gpa, len(req), 1, head + 1)    # (NEXT to the reply)

    def one(self, opcode: int, nodeid: int, body: bytes) -> bytes:
        head = next(iter(self.slots))
        self._fill(head, opcode, nodeid, body)
        self.drv.publish(head)
        self.front.kick(1)
        used = []
        while not used:                     # (a backend may signal before it answers)
            assert self.front.wait_call(1)
            used = self.drv.take_used()
        return self.mem.read(self.slots[head][1], used[0][1])

    def run(self, count: int, make) -> float:
        """Requests per second: `make()` -> (opcode, nodeid, body) for each."""
        start = time.perf_counter()
        done = 0
        free = list(self.slots)
        while done < count:
            for head in free:
                self._fill(head, *make())
            self.drv.publish(*free)
            self.front.kick(1)
            assert self.front.wait_call(1, timeout=30), "the server stopped answering"
            free = [h for h, _n in self.drv.take_used()]
            done += len(free)
        return done / (time.perf_counter() - start)

    def close(self) -> None:
        self.front.close()


def _workload(client: Client, kind: str, rng: random.Random):
    reply = client.one(INIT, 0, struct.pack("<IIIII44x", 7, 38, 1 << 17, 0, 0))
    assert struct.unpack_from("<i", reply, 4)[0] == 0
    if kind == "lookup":
        dirs = []
        for d in range(DIRS):
            entry = client.one(LOOKUP, 1, f"d{d}\0".encode())
            dirs.append(struct.unpack_from("<Q", entry, 16)[0])
        per = FILES // DIRS
        return lambda: (LOOKUP, rng.choice(dirs), f"f{rng.randrange(per)}\0".encode())
    if kind == "create":
        new = struct.unpack_from("<Q", client.one(LOOKUP, 1, b"new\0"), 16)[0]
        names = iter(range(10**9))
        return lambda: (CREATE, new, struct.pack("<IIII", os.O_WRONLY | os.O_CREAT,
                                                 0o644, 0o022, 0) +
                        f"c{rng.random()}-{next(names)}\0".encode())
    entry = client.one(LOOKUP, 1, b"data\0")
    nodeid = struct.unpack_from("<Q", entry, 16)[0]
    opened = client.one(OPEN, nodeid, struct.pack("<II", os.O_RDONLY, 0))
    fh = struct.unpack_from("<Q", opened, 16)[0]
    blocks = DATA // 4096
    return lambda: (READ, nodeid, struct.pack("<QQIIQII", fh, rng.randrange(blocks) * 4096,
                                              4096, 0, 0, os.O_RDONLY, 0))


@pytest.mark.parametrize("kind", list(COUNT))
def test_virtiofs_requests_depth_32(tree, record, benchmark, kind):
    ours, theirs, cpu_ours, cpu_theirs = [], [], [], []

    def once():
        for start, out, cpu in ((virtiofsd, theirs, cpu_theirs), (pyhv_server, ours, cpu_ours)):
            argv, sock = start(tree)
            with listening(argv, sock) as proc:
                client = Client(sock)
                make = _workload(client, kind, random.Random(len(out)))
                before = cpu_seconds(proc.pid)
                out.append(client.run(COUNT[kind], make))
                cpu.append((cpu_seconds(proc.pid) - before) / COUNT[kind] * 1e6)
                client.close()
            sock.unlink(missing_ok=True)

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    what = {"lookup": "LOOKUP in a 50k-file tree", "create": "CREATE",
            "read": "4 KiB READ"}[kind]
    record(f"virtio-fs {what}, depth 32, vhost-user", "req/s", pyhv=max(ours),
           anchor=max(theirs), anchor_name="virtiofsd (QEMU 7.2)",
           target=1.0 if kind == "read" else 1.5,
           cpu_us_per_request={"pyhv": round(min(cpu_ours), 2),
                               "virtiofsd": round(min(cpu_theirs), 2)},
           runs={"pyhv": [round(x) for x in ours], "virtiofsd": [round(x) for x in theirs]})
