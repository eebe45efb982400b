"""HostSocket and its edge-triggered Poller on real TCP socket pairs (loopback): reads up
to EOF in one event, a write backlog that drains (and a graceful close that waits for it),
a reset noticed while the flow does not read."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from hvcore.net.hostsock import HostSocket, Poller
from tests.helpers.aio import settle


class FakeConn:
    """The TcpConn side: reads land in `got`."""

    def __init__(self):
        self.buf = bytearray(1 << 16)
        self.got = bytearray()
        self.eof = False
        self.lost: OSError | None = None
        self.updates = 0
        self.aborted = False

    def host_buffer(self) -> memoryview:
        return memoryview(self.buf)

    def host_data(self, n: int) -> None:
        self.got += self.buf[:n]

    def host_eof(self) -> None:
        self.eof = True

    def host_read_done(self) -> None:
        pass

    def host_lost(self, exc) -> None:
        self.lost = exc

    def window_update(self) -> None:
        self.updates += 1

    def abort(self) -> None:
        self.aborted = True


def run(body) -> None:
    async def main():
        with socket.create_server(("127.0.0.1", 0)) as srv:   # a TCP pair on loopback
            ours = socket.create_connection(srv.getsockname())
            peer, _ = srv.accept()
        ours.setblocking(False)
        poller = Poller(asyncio.get_running_loop())
        conn = FakeConn()
        hs = HostSocket(poller, ours, conn, 1 << 20)
        try:
            await body(hs, conn, peer)
        finally:
            hs.abort()
            peer.close()
            poller.close()

    asyncio.run(main())


def test_data_and_eof_arrive_once_reading_starts():
    async def body(hs, conn, peer):
        peer.sendall(b"reply")
        peer.shutdown(socket.SHUT_WR)
        hs.register(reading=False)
        await asyncio.sleep(0.05)
        assert not conn.got                     # not reading yet (a forward's flow)
        hs.start_reading()
        await settle(lambda: conn.eof)
        assert bytes(conn.got) == b"reply"

    run(body)


def test_write_backlog_drains_and_close_waits_for_it():
    data = bytes(range(256)) * 40000            # ~10 MB: more than the socket buffers

    async def body(hs, conn, peer):
        hs.register(reading=True)
        hs.write(data)
        assert hs.pending > 0 and hs.blocked
        hs.close()                              # graceful: the backlog still goes
        peer.setblocking(False)
        got = bytearray()
        loop = asyncio.get_running_loop()
        while True:
            chunk = await loop.sock_recv(peer, 1 << 20)
            if not chunk:
                break
            got += chunk
        assert bytes(got) == data
        assert hs.fd == -1

    run(body)


@pytest.mark.parametrize("then_write", [False, True])
def test_reset_while_not_reading_reaches_the_flow(then_write):
    async def body(hs, conn, peer):
        hs.register(reading=False)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        if then_write:
            await asyncio.sleep(0.05)
            hs.write(b"x" * 100000)
        await settle(lambda: conn.lost is not None)
        assert hs.fd == -1

    run(body)


def test_a_failing_handler_costs_its_flow_only():
    """Edge-triggered events are reported once: a handler that raises must not lose the
    other events of the batch."""
    async def main():
        loop = asyncio.get_running_loop()
        counters: dict = {}
        poller = Poller(loop, counters)
        pairs, conns, socks = [], [], []
        with socket.create_server(("127.0.0.1", 0)) as srv:
            for _ in range(2):
                ours = socket.create_connection(srv.getsockname())
                peer, _ = srv.accept()
                ours.setblocking(False)
                pairs.append((ours, peer))
        for i, (ours, _peer) in enumerate(pairs):
            conn = FakeConn()
            if i == 0:
                def boom(n):
                    raise RuntimeError("a bug")
                conn.host_data = boom
            hs = HostSocket(poller, ours, conn, 1 << 20)
            hs.register(reading=True)
            conns.append(conn)
            socks.append(hs)
        for _, peer in pairs:
            peer.sendall(b"data")
        await settle(lambda: bytes(conns[1].got) == b"data")
        assert counters["internal errors"] == 1 and socks[0].fd == -1 and conns[0].aborted
        for hs in socks:
            hs.abort()
        for _, peer in pairs:
            peer.close()
        poller.close()

    asyncio.run(main())


def test_an_event_of_a_socket_closed_in_its_batch_skips_the_fd_successor():
    """Events are fetched in batches: when handling one closes another socket of the
    batch and a new socket gets its fd number, the old socket's event must not reach the
    new one (a connecting socket would take it for "connected")."""
    import os

    class Counting(FakeConn):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def host_buffer(self) -> memoryview:
            self.calls += 1
            return super().host_buffer()

    async def main():
        poller = Poller(asyncio.get_running_loop())
        with socket.create_server(("127.0.0.1", 0)) as srv:
            def pair():
                ours = socket.create_connection(srv.getsockname())
                peer, _ = srv.accept()
                ours.setblocking(False)
                return ours, peer

            (a, pa), (c, pc), (d, pd) = pair(), pair(), pair()
        conn_a, conn_c, conn_d = FakeConn(), FakeConn(), Counting()
        hs_a = HostSocket(poller, a, conn_a, 1 << 20)
        hs_c = HostSocket(poller, c, conn_c, 1 << 20)
        c_fd, successor = hs_c.fd, []

        def swap(n: int) -> None:               # A's data comes first in the batch
            conn_a.got += conn_a.buf[:n]
            if not successor:
                hs_c.abort()                    # C goes; its fd number gets D's socket
                os.dup2(d.fileno(), c_fd)
                d.close()
                hs_d = HostSocket(poller, c_fd, conn_d, 1 << 20)
                hs_d.register(reading=True)
                successor.append(hs_d)

        conn_a.host_data = swap
        hs_a.register(reading=True)
        hs_c.register(reading=True)
        pa.sendall(b"a")
        pc.sendall(b"c")                        # both ready: one batch, A first
        poller._ready()
        try:
            assert successor and bytes(conn_a.got) == b"a"
            assert conn_d.calls == 0            # C's event did not reach D
        finally:
            for hs in (hs_a, *successor):
                hs.abort()
            for p in (pa, pc, pd):
                p.close()
            poller.close()

    asyncio.run(main())
