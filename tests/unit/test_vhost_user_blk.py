"""The vhost-user-blk backend driven by a synthetic frontend (tests/helpers): requests as
a driver builds them, and a frontend and driver that break the rules. The backend serves
from a thread in this process; its disk is a real qcow2 image read back with qemu-img."""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import threading

import pytest

import pyhv.disk
from hvcore.memory import GuestMemory
from pyhv.virtio import vhost_user as vu
from pyhv.virtio.blk import BlkDevice
from tests.helpers.vhost_user_frontend import Frontend
from tests.helpers.virtio_driver import NEXT, Driver

MB = 1 << 20
IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES = 0, 1, 4, 8, 11, 13


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path


@pytest.fixture
def backend(tmp_path, image):
    """(socket path, device); two queues, serial PYHV-TEST."""
    disk = pyhv.disk.open(str(image), "qcow2")
    device = BlkDevice(disk, queues=2, serial="PYHV-TEST")
    path = str(tmp_path / "blk.sock")
    server = vu.Backend(device, path)
    threading.Thread(target=_serve, args=(server,), daemon=True).start()
    yield path, device
    server.close()
    disk.close()


def _serve(server):
    try:
        server.serve_forever()
    except OSError:
        pass                                # closed by the fixture


@pytest.fixture
def mem():
    return GuestMemory([(0, 4 * MB)])


class Blk:
    """A virtio-blk driver on one queue of a synthetic frontend."""

    def __init__(self, front: Frontend, mem: GuestMemory, index: int = 0):
        self.front, self.index = front, index
        self.drv = Driver(mem, 0x1000 + index * 0x8000, 64, data=0x100000 + index * MB)
        front.start(index, self.drv)

    def request(self, kind: int, sector: int = 0, out: bytes = b"", read: int = 0):
        """(status, data read)"""
        d = self.drv
        d.data = d.data_start                       # reuse the data area
        bufs = [(d.alloc(16, struct.pack("<IIQ", kind, 0, sector)), 16, False)]
        if out:
            bufs.append((d.alloc(len(out), out), len(out), False))
        if read:
            inbuf = d.alloc(read)
            bufs.append((inbuf, read, True))
        status = d.alloc(1, b"\xff")
        bufs.append((status, 1, True))
        head = d.chain(bufs)
        d.publish(head)
        self.front.kick(self.index)
        assert self.front.wait_call(self.index), "no interrupt"
        (used,) = d.take_used()
        assert used[0] == head
        mem = d.mem
        return mem.read(status, 1)[0], (mem.read(inbuf, read) if read else b"")


@pytest.fixture
def blk(backend, mem):
    front = Frontend(backend[0], mem)
    front.handshake()
    yield Blk(front, mem)
    front.close()


def test_config_space_and_features(backend, mem):
    front = Frontend(backend[0], mem)
    features = front.handshake()
    assert features & vu.F_VERSION_1 and features & vu.F_EVENT_IDX
    assert features & (1 << 12)                     # VIRTIO_BLK_F_MQ
    capacity, size_max, seg_max = struct.unpack_from("<QII", front.config())
    assert capacity == 16 * MB // 512 and seg_max == 254
    assert struct.unpack_from("<H", front.config(), 34)[0] == 2      # num_queues
    assert struct.unpack("<Q", front.call(vu.GET_QUEUE_NUM))[0] == 2
    front.close()


def test_write_read_flush_id_discard_zeroes(blk, image):
    data = os.urandom(8192)
    assert blk.request(OUT, 8, out=data) == (0, b"")
    assert blk.request(IN, 8, read=8192) == (0, data)
    assert blk.request(FLUSH)[0] == 0
    assert blk.request(GET_ID, read=20) == (0, b"PYHV-TEST".ljust(20, b"\0"))
    seg = struct.pack("<QII", 8, 8, 0)
    assert blk.request(WRITE_ZEROES, out=seg)[0] == 0
    assert blk.request(IN, 8, read=8192) == (0, bytes(4096) + data[4096:])
    assert blk.request(DISCARD, out=struct.pack("<QII", 0, 32, 0))[0] == 0
    assert blk.request(FLUSH)[0] == 0
    done = subprocess.run(["qemu-img", "check", "-U", str(image)], capture_output=True)
    assert done.returncode == 0, done.stdout


def test_bad_requests_get_an_error_status_and_the_disk_goes_on(blk, caplog):
    with caplog.at_level(logging.WARNING, logger="pyhv.virtio"):
        assert blk.request(IN, 16 * MB // 512, read=512)[0] == 1         # past the end
        assert blk.request(OUT, 0, out=b"x" * 100)[0] == 1               # not whole sectors
        assert blk.request(99)[0] == 2                                   # unsupported
        assert blk.request(DISCARD, out=b"short")[0] == 1
    assert "past the end of the disk" in caplog.text
    assert blk.request(OUT, 0, out=b"y" * 512)[0] == 0
    assert blk.request(IN, 0, read=512) == (0, b"y" * 512)


def test_a_request_cut_anywhere_is_the_same_request(blk):
    """The spec lets a driver split header, data and status across buffers at will."""
    d, data = blk.drv, os.urandom(1024)
    d.data = d.data_start
    raw = struct.pack("<IIQ", OUT, 0, 4) + data
    cuts = [3, 16, 20, 700]                    # header in two pieces, data in three
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    bufs = [(d.alloc(len(p), p), len(p), False) for p in pieces]
    status = d.alloc(1)
    d.publish(d.chain([*bufs, (status, 1, True)]))
    blk.front.kick(0)
    assert blk.front.wait_call(0)
    assert len(d.take_used()) == 1
    assert d.mem.read(status, 1) == b"\0"
    assert blk.request(IN, 4, read=1024) == (0, data)


def test_a_hostile_chain_stops_its_queue_only(backend, mem, caplog):
    front = Frontend(backend[0], mem)
    front.handshake()
    q0, q1 = Blk(front, mem, 0), Blk(front, mem, 1)
    q0.drv.write_desc(0, 0x100000, 16, NEXT, 1)
    q0.drv.write_desc(1, 0x100000, 16, NEXT, 0)            # a loop
    with caplog.at_level(logging.ERROR, logger="pyhv.virtio"):
        q0.drv.publish(0)
        front.kick(0)
        assert front.wait_err(0), "the error eventfd was not signalled"
    assert "virtqueue 0: the chain from head 0 has more descriptors" in caplog.text
    assert q1.request(OUT, 0, out=b"z" * 512)[0] == 0      # the other queue works
    assert q1.request(IN, 0, read=512) == (0, b"z" * 512)
    front.close()
    again = Frontend(backend[0], mem)                      # a reset (new session) works
    again.handshake()
    assert Blk(again, mem).request(IN, 0, read=512) == (0, b"z" * 512)
    again.close()


@pytest.mark.parametrize("message", [
    (vu.GET_FEATURES, b"", 0x2),                           # protocol version 2
    (vu.SET_VRING_NUM, struct.pack("<II", 7, 64), vu.VERSION),      # no queue 7
    (vu.SET_VRING_NUM, struct.pack("<II", 0, 100), vu.VERSION),     # not a power of two
    (vu.SET_MEM_TABLE, struct.pack("<II", 2, 0), vu.VERSION),       # 2 regions, no fds
    (vu.SET_FEATURES, b"\1", vu.VERSION),                  # short payload
    (200, b"", vu.VERSION),                                # unknown request
])
def test_a_malformed_message_ends_only_that_connection(backend, mem, message, caplog):
    front = Frontend(backend[0], mem)
    with caplog.at_level(logging.ERROR, logger="pyhv.virtio"):
        front.send(message[0], message[1], flags=message[2])
        assert front.closed_by_backend(), "the backend kept a broken connection"
    assert "vhost-user:" in caplog.text
    front.close()
    again = Frontend(backend[0], mem)
    again.handshake()
    assert Blk(again, mem).request(FLUSH)[0] == 0
    again.close()


def test_get_vring_base_stops_the_ring_where_it_got_to(blk):
    for _ in range(3):
        assert blk.request(FLUSH)[0] == 0
    assert blk.front.stop(0) == 3
