"""The TCP state machine driven frame by frame (a hand-built guest on a fake port, a real
host socket on 127.0.0.1): out-of-order reassembly, segments outside the window,
retransmission by timeout and fast retransmit, zero-window probes, RST both ways."""

from __future__ import annotations

import asyncio

import pytest

from hvcore.net import packet as n
from hvcore.net import tcp
from pyhv.net.config import GATEWAY_MAC, NetConfig
from pyhv.net.ports import FramePort
from pyhv.net.stack import Stack
from tests.helpers.aio import settle

GUEST_MAC = 0x0250_0000_0002
M32 = 0xFFFFFFFF


class FakePort(FramePort):
    def __init__(self):
        super().__init__()
        self.out: list[n.Packet] = []

    async def start(self, deliver) -> None:
        self.deliver = deliver

    def send(self, frames) -> None:
        self.out.extend(n.parse(b"".join(f) if type(f) is tuple else bytes(f)) for f in frames)

    def close(self) -> None:
        pass


class Guest:
    """One guest TCP flow written by hand, seq numbers from 1000."""

    def __init__(self, stack: Stack, port: FakePort, dport: int):
        self.stack, self.port, self.dport = stack, port, dport
        self.b = n.Builder(GUEST_MAC)
        self.b.guest_mac = GATEWAY_MAC
        self.me, self.peer = stack.cfg.guest, stack.cfg.alias
        self.seq, self.ack = 1000, 0

    def send(self, flags: int, data: bytes = b"", seq: int | None = None, window=65535,
             ack: int | None = None, **opts) -> None:
        seq = self.seq if seq is None else seq
        self.stack.receive([bytes(self.b.tcp(self.me, 40000, self.peer, self.dport, seq & M32,
                                             (self.ack if ack is None else ack) & M32,
                                             flags, window, data, **opts))])

    async def expect(self, pred, timeout: float = 10.0) -> n.Packet:
        for _ in range(int(timeout / 0.01)):
            for i, p in enumerate(self.port.out):
                if p.proto == 6 and pred(p):
                    del self.port.out[:i + 1]
                    return p
            await asyncio.sleep(0.01)
        raise AssertionError(f"no such segment in {self.port.out}")

    async def handshake(self) -> None:
        self.send(n.SYN, mss=1460, wscale=2)
        synack = await self.expect(lambda p: p.flags == n.SYN | n.ACK)
        assert synack.ack == 1001 and synack.mss == NetConfig().mtu - 40
        self.seq, self.ack = 1001, synack.seq + 1
        self.send(n.ACK)


def run(coro_fn, **cfg):
    async def main():
        port = FakePort()
        stack = Stack(NetConfig(**cfg), port)
        await stack.start()
        received = bytearray()
        writers = []
        eof = asyncio.Event()

        async def host(reader, writer):
            writers.append(writer)
            try:
                while data := await reader.read(65536):
                    received.extend(data)
            except ConnectionError:
                pass
            eof.set()

        server = await asyncio.start_server(host, "127.0.0.1", 0)
        try:
            guest = Guest(stack, port, server.sockets[0].getsockname()[1])
            await coro_fn(guest, stack, received, writers, eof)
        finally:
            stack.close()
            server.close()

    asyncio.run(main())


def test_out_of_order_segments_are_reassembled():
    async def body(guest, stack, received, writers, eof):
        await guest.handshake()
        guest.send(n.ACK | n.PSH, b"world", seq=1006)          # a hole at 1001..1006
        dup = await guest.expect(lambda p: p.flags & n.ACK)
        assert dup.ack == 1001                                # duplicate ACK: what is missing
        guest.send(n.ACK | n.PSH, b"hello", seq=1001)
        await settle(lambda: bytes(received) == b"helloworld")
        ack = await guest.expect(lambda p: p.ack == 1011)
        assert ack.window > 0
        assert stack.counters["tcp out-of-order segments"] == 2

    run(body)


def test_segments_outside_the_window_are_dropped():
    async def body(guest, stack, received, writers, eof):
        await guest.handshake()
        guest.send(n.ACK, b"far away", seq=1001 + (1 << 30))
        guest.send(n.ACK, b"old", seq=1001 - 100)
        await guest.expect(lambda p: p.ack == 1001)
        guest.send(n.ACK | n.PSH, b"fine", seq=1001)
        await settle(lambda: bytes(received) == b"fine")
        assert stack.counters["tcp dropped: outside window"] == 1
        assert stack.counters["tcp duplicate segments"] == 1

    run(body)


def test_retransmission_timeout_and_fast_retransmit():
    async def body(guest, stack, received, writers, eof):
        await guest.handshake()
        await settle(lambda: writers)
        writers[0].write(b"x" * 3000)
        first = await guest.expect(lambda p: p.payload_len > 0)
        again = await guest.expect(lambda p: p.payload_len > 0 and p.seq == first.seq)
        assert bytes(again.payload) == bytes(first.payload)    # resent after the RTO
        assert stack.counters["tcp retransmission timeouts"] >= 1
        for _ in range(3):                                     # three duplicate ACKs
            guest.send(n.ACK, ack=first.seq)
        await guest.expect(lambda p: p.payload_len > 0 and p.seq == first.seq)
        assert stack.counters["tcp fast retransmits"] == 1
        guest.send(n.ACK, ack=(first.seq + 3000))
        await settle(lambda: stack.tcp.conns and
                     next(iter(stack.tcp.conns.values())).snd_una - 1 ==
                     next(iter(stack.tcp.conns.values())).iss + 3000)

    run(body)


def test_zero_window_gets_probed():
    async def body(guest, stack, received, writers, eof):
        guest.send(n.SYN, mss=1460, window=0)
        synack = await guest.expect(lambda p: p.flags == n.SYN | n.ACK)
        guest.seq, guest.ack = 1001, synack.seq + 1
        guest.send(n.ACK, window=0)
        await settle(lambda: writers)
        writers[0].write(b"data for a full guest")
        probe = await guest.expect(lambda p: p.payload_len > 0)
        assert probe.payload_len == 1 and bytes(probe.payload) == b"d"
        guest.send(n.ACK, ack=synack.seq + 2, window=1000)
        rest = await guest.expect(lambda p: p.payload_len > 0)
        assert bytes(rest.payload) == b"ata for a full guest"

    run(body)


@pytest.mark.parametrize("who", ["guest", "host"])
def test_reset_both_ways(who):
    async def body(guest, stack, received, writers, eof):
        await guest.handshake()
        await settle(lambda: writers)
        if who == "guest":
            guest.send(n.RST, seq=1001)
            await asyncio.wait_for(eof.wait(), 10)
            assert stack.counters["tcp reset by guest"] == 1
        else:
            sock = writers[0].get_extra_info("socket")
            import socket
            import struct
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writers[0].transport.abort()
            await guest.expect(lambda p: p.flags & n.RST)
        await settle(lambda: not stack.tcp.conns)

    run(body)


def test_stray_segments_get_rst_and_half_close():
    async def body(guest, stack, received, writers, eof):
        guest.send(n.ACK, b"no flow", seq=5)
        rst = await guest.expect(lambda p: p.flags & n.RST)
        assert rst.seq == 0                                   # seq = the stray ACK's ack
        await guest.handshake()
        guest.send(n.ACK | n.PSH | n.FIN, b"last words")
        await asyncio.wait_for(eof.wait(), 10)                # the host saw our FIN
        assert bytes(received) == b"last words"
        fin_ack = await guest.expect(lambda p: p.ack == 1001 + 10 + 1)
        assert not fin_ack.flags & n.FIN
        writers[0].write(b"reply after the guest's FIN")
        writers[0].close()
        data = await guest.expect(lambda p: p.payload_len > 0)
        assert bytes(data.payload) == b"reply after the guest's FIN"
        if not data.flags & n.FIN:                            # EOF read in a later iteration
            await guest.expect(lambda p: p.flags & n.FIN)

    run(body)


def test_syn_flood_to_a_black_hole_does_not_stall_other_connects():
    """Connects in flight are limited per destination: a flood of SYNs to a destination
    that never answers fills its quota only; a connect elsewhere still completes."""
    import socket

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []
    for _ in range(3):                        # fill the accept queue: further SYNs vanish
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(hole.getsockname())
        fillers.append(c)

    async def body(guest, stack, received, writers, eof):
        b, hp = guest.b, hole.getsockname()[1]
        for i in range(200):
            stack.receive([bytes(b.tcp(guest.me, 20000 + i, guest.peer, hp, i, 0, n.SYN,
                                       1000, mss=1460))])
        assert stack.tcp.connecting == 8
        assert stack.counters["tcp syn dropped: connects in flight"] == 192
        await guest.handshake()               # another destination: not held up
        guest.send(n.ACK | n.PSH, b"still works")
        await settle(lambda: bytes(received) == b"still works")

    try:
        run(body, max_connecting_per_dest=8, connect_timeout=30)
    finally:
        for c in fillers:
            c.close()
        hole.close()


def _conn(stack):
    return next(iter(stack.tcp.conns.values()))


async def _read_to_fin(guest, window=65535) -> tuple[bytes, n.Packet]:
    """Take data segments in order (ACKing each) until our FIN; the bytes and the FIN."""
    got = bytearray()
    while True:
        p = await guest.expect(lambda p: p.payload_len > 0 or p.flags & n.FIN)
        assert p.seq == (guest.ack + 0) & M32, (p.seq, guest.ack)
        got += bytes(p.payload)
        guest.ack += p.payload_len
        if p.flags & n.FIN:
            guest.ack += 1
            guest.send(n.ACK, window=window)
            return bytes(got), p
        guest.send(n.ACK, window=window)


def test_host_data_and_eof_before_the_handshake_ack_lose_no_byte():
    """The host peer writes and shuts down as soon as connect() completes, before the
    guest's ACK of our SYN-ACK: that ACK covers our SYN only, no byte of host data (it used
    to trim the first byte, so the guest read one byte less before EOF)."""
    data = bytes(range(256)) * 40

    async def body(guest, stack, received, writers, eof):
        guest.send(n.SYN, mss=1460, wscale=2)
        synack = await guest.expect(lambda p: p.flags == n.SYN | n.ACK)
        await settle(lambda: writers)
        writers[0].write(data)
        writers[0].write_eof()
        conn = _conn(stack)
        await settle(lambda: conn.buffered == len(data) and conn.fin_queued)
        assert not [p for p in guest.port.out if p.payload_len or p.flags & n.FIN]
        guest.seq, guest.ack = 1001, synack.seq + 1
        guest.send(n.ACK)                                      # the handshake ends here
        got, fin = await _read_to_fin(guest)
        assert got == data
        assert fin.seq + fin.payload_len == (synack.seq + 1 + len(data)) & M32
        await settle(lambda: conn.state == tcp.FIN_WAIT_2)
        guest.send(n.ACK | n.PSH | n.FIN, b"bye")             # the guest's half, after ours
        await asyncio.wait_for(eof.wait(), 10)
        assert bytes(received) == b"bye"

    run(body)


@pytest.mark.parametrize("then", ["window opens", "persist timer"])
def test_fin_waits_for_window_room(then):
    """Data that exactly fills the guest's window goes without our FIN: the FIN takes a
    sequence number too, and Linux (>= 6.17) drops a whole segment whose FIN lies beyond
    the window it offered. The FIN follows when the window opens, or as the zero-window
    probe once all data is acknowledged."""
    data = b"z" * 1000

    async def body(guest, stack, received, writers, eof):
        await guest.handshake()                                # guest wscale 2: units of 4
        guest.send(n.ACK, window=len(data) // 4)
        await settle(lambda: writers)
        conn = _conn(stack)
        writers[0].write(data)
        writers[0].write_eof()
        await settle(lambda: conn.fin_queued and conn.snd_nxt == conn.iss + 1 + len(data))
        sent = [p for p in guest.port.out if p.payload_len or p.flags & n.FIN]
        assert sum(p.payload_len for p in sent) == len(data)
        assert not any(p.flags & n.FIN for p in sent) and conn.fin_seq is None
        guest.port.out.clear()
        end = guest.ack + len(data)
        guest.send(n.ACK, ack=end, window=0)                   # all taken, window closed
        assert conn.fin_seq is None and conn.state == tcp.ESTABLISHED
        if then == "window opens":
            guest.send(n.ACK, ack=end, window=100)
            assert conn.fin_seq == conn.iss + 1 + len(data)     # at once
        fin = await guest.expect(lambda p: p.flags & n.FIN)
        assert fin.seq == end & M32 and fin.payload_len == 0
        guest.send(n.ACK, ack=end + 1, window=0)
        assert conn.state == tcp.FIN_WAIT_2 and conn.buffered == 0

    run(body)


def test_retransmitted_data_with_a_fin_at_rcv_nxt_closes():
    """The guest's last data arrived, its FIN did not; the guest then resends the data
    with the FIN in one segment (Linux collapses retransmissions): the data is old, the
    FIN at rcv_nxt is new and must be taken, not dropped as a duplicate."""
    async def body(guest, stack, received, writers, eof):
        await guest.handshake()
        guest.send(n.ACK | n.PSH, b"last words")
        await settle(lambda: bytes(received) == b"last words")
        guest.send(n.ACK | n.PSH | n.FIN, b"last words")      # seq 1001 again, FIN at 1011
        await asyncio.wait_for(eof.wait(), 10)                # the host saw the guest's EOF
        await guest.expect(lambda p: p.ack == 1001 + 10 + 1)
        assert bytes(received) == b"last words"
        assert _conn(stack).state == tcp.CLOSE_WAIT
        assert stack.counters["tcp duplicate segments"] == 0

    run(body)


def test_rst_only_at_rcv_nxt_resets_rfc5961():
    """A RST whose sequence number is inside the window but not exactly rcv_nxt gets a
    challenge ACK and changes nothing (a blind attacker cannot guess rcv_nxt); one
    outside the window is dropped silently; one at rcv_nxt resets the flow."""
    async def body(guest, stack, received, writers, eof):
        await guest.handshake()
        guest.send(n.ACK | n.PSH, b"hello")
        await settle(lambda: bytes(received) == b"hello")
        guest.seq = 1006
        guest.port.out.clear()
        guest.send(n.RST, seq=1006 + 100)                       # in the window
        challenge = await guest.expect(lambda p: p.flags & n.ACK)
        assert challenge.ack == 1006 and not challenge.flags & n.RST
        assert stack.counters["tcp challenge acks"] == 1
        guest.send(n.RST, seq=1006 + (1 << 30))                 # far outside it
        guest.send(n.RST, seq=1006 - 3)                         # old
        assert _conn(stack).state == tcp.ESTABLISHED
        assert stack.counters["tcp challenge acks"] == 1 and not eof.is_set()
        guest.send(n.ACK | n.PSH, b" still here")
        await settle(lambda: bytes(received) == b"hello still here")
        guest.send(n.RST, seq=1006 + 11)                        # exactly rcv_nxt
        await asyncio.wait_for(eof.wait(), 10)
        assert stack.counters["tcp reset by guest"] == 1
        await settle(lambda: not stack.tcp.conns)

    run(body)


@pytest.mark.parametrize("with_data", [True, False])
def test_fin_ahead_of_a_gap_is_taken_when_the_gap_fills(with_data):
    """The guest's FIN arrives before data it follows (with the last data, or alone): it
    is remembered, and taken (host EOF, ACK past it) once the missing bytes arrive."""
    async def body(guest, stack, received, writers, eof):
        await guest.handshake()
        if with_data:
            guest.send(n.ACK | n.PSH | n.FIN, b"world", seq=1006)
            end = 1011
        else:
            guest.send(n.ACK | n.FIN, seq=1006)
            end = 1006
        dup = await guest.expect(lambda p: p.flags & n.ACK)
        assert dup.ack == 1001                                  # the gap is reported
        assert _conn(stack).state == tcp.ESTABLISHED and not eof.is_set()
        guest.send(n.ACK | n.PSH, b"hello", seq=1001)           # fills the gap
        await asyncio.wait_for(eof.wait(), 10)
        assert bytes(received) == (b"helloworld" if with_data else b"hello")
        await guest.expect(lambda p: p.ack == end + 1)
        assert _conn(stack).state == tcp.CLOSE_WAIT

    run(body)


def test_small_data_gets_a_delayed_ack_when_the_host_stays_quiet():
    async def body(guest, stack, received, writers, eof):
        await guest.handshake()
        guest.port.out.clear()
        guest.send(n.ACK | n.PSH, b"GET")
        ack = await guest.expect(lambda p: p.flags & n.ACK)
        assert ack.ack == 1004 and ack.payload_len == 0

    run(body)


def test_first_request_is_acked_at_once_later_ones_ride_on_the_answer():
    """Quick ACK at the start of a flow (as Linux): the first request's ACK leaves while
    the batch is handled, no timer. Once the flow has answered (request/response), a
    small request's ACK waits for the answer, which carries it: no bare ACK frame."""
    async def body(guest, stack, received, writers, eof):
        await guest.handshake()
        guest.port.out.clear()
        guest.send(n.ACK | n.PSH, b"GET1")
        bare = [p for p in guest.port.out if p.ack == 1005 and not p.payload_len]
        assert len(bare) == 1                                  # sent before receive returned
        guest.seq = 1005
        await settle(lambda: bytes(received) == b"GET1" and writers)
        writers[0].write(b"answer1")
        one = await guest.expect(lambda p: p.payload_len == 7)
        guest.ack = one.seq + 7
        guest.port.out.clear()
        guest.send(n.ACK | n.PSH, b"GET2")
        assert not guest.port.out and _conn(stack) in stack.delayed   # the ACK waits
        writers[0].write(b"answer2")            # (at once: well within DELACK)
        await settle(lambda: any(p.payload_len for p in guest.port.out))
        assert [(p.ack, p.payload_len) for p in guest.port.out] == [(1009, 7)]
        await settle(lambda: bytes(received) == b"GET1GET2")

    run(body)


def test_sockets_made_ahead_for_syns_are_closed_with_the_stack():
    """A connect takes a socket made ahead of time (with the deferred work); closing the
    stack closes those too: no descriptor outlives it."""
    import gc
    import os

    async def body(guest, stack, received, writers, eof):
        await guest.handshake()
        guest.send(n.ACK | n.PSH, b"GET")                # host work: deferred work runs
        await settle(lambda: len(stack.tcp.spare) == 8)

    gc.collect()                        # earlier tests' garbage closes its fds now, not
    before = set(os.listdir("/proc/self/fd"))   # while this test runs
    run(body)
    assert set(os.listdir("/proc/self/fd")) == before


def test_syn_reusing_a_time_wait_pair_opens_a_new_flow():
    """We closed first (TIME_WAIT here, not in the guest), so the guest may reuse the
    port pair at once: a SYN with a newer sequence number ends TIME_WAIT early."""
    async def body(guest, stack, received, writers, eof):
        await guest.handshake()
        await settle(lambda: writers)
        writers[0].close()                                      # the host closes first
        fin = await guest.expect(lambda p: p.flags & n.FIN)
        guest.ack = fin.seq + 1
        guest.send(n.ACK | n.FIN)
        await settle(lambda: _conn(stack).state == tcp.TIME_WAIT)
        old = _conn(stack)
        await guest.expect(lambda p: p.ack == 1002 and not p.flags & n.FIN)   # a moment
        await settle(lambda: old.host.fd == -1)      # later: the ACK, the host socket closed
        guest.send(n.SYN, seq=50000, mss=1460)
        synack = await guest.expect(lambda p: p.flags == n.SYN | n.ACK)
        assert synack.ack == 50001 and old.state == tcp.CLOSED
        assert _conn(stack).state == tcp.SYN_RCVD

    run(body)


def test_a_fin_retransmitted_into_time_wait_is_acked_again():
    """The guest did not get our last ACK and sends its FIN again: TIME_WAIT answers it
    with the same ACK (RFC 9293 3.10.7.4) and stays; no RST, the pair is still known."""
    async def body(guest, stack, received, writers, eof):
        await guest.handshake()
        await settle(lambda: writers)
        writers[0].close()
        fin = await guest.expect(lambda p: p.flags & n.FIN)
        guest.ack = fin.seq + 1
        guest.send(n.ACK | n.FIN)
        await settle(lambda: _conn(stack).state == tcp.TIME_WAIT)
        await guest.expect(lambda p: p.ack == 1002 and not p.flags & n.FIN)
        guest.send(n.ACK | n.FIN)                        # the same FIN once more
        again = await guest.expect(lambda p: p.ack == 1002)
        assert not again.flags & (n.RST | n.FIN)
        assert _conn(stack).state == tcp.TIME_WAIT
        assert stack.counters["tcp segments for no flow"] == 0

    run(body)


def test_syns_go_first_in_a_batch_unless_their_flow_has_other_frames():
    b = n.Builder(GUEST_MAC)
    cfg = NetConfig()

    def seg(sport, flags):
        return n.parse(bytes(b.tcp(cfg.guest, sport, cfg.alias, 80, 1, 1, flags, 100)))

    from pyhv.net.stack import syns_first
    fin, syn, other = seg(1000, n.FIN | n.ACK), seg(1001, n.SYN), seg(1002, n.ACK)
    assert syns_first([fin, other, syn]) == [syn, fin, other]
    same = seg(1001, n.ACK)
    assert syns_first([same, syn]) == [same, syn]


def test_a_bug_costs_its_frame_or_its_deferred_call_only(caplog):
    """A handler that raises is counted ("internal errors") and logged once with its
    traceback; the other frames of the batch and the other deferred calls still run."""
    stack = Stack(NetConfig(), FakePort())
    seen = []

    def other(pkt):
        if not seen:
            seen.append(pkt)
            raise RuntimeError("a bug")
        seen.append(pkt)

    stack.on_other = other
    b = n.Builder(GUEST_MAC)
    frame = bytes(b.arp_request(stack.cfg.gw, stack.cfg.guest))
    stack.receive([frame, frame])
    assert len(seen) == 2 and stack.counters["internal errors"] == 1
    ran = []
    stack.deferred[:] = [lambda: 1 / 0, lambda: ran.append(True)]
    stack._run_deferred()
    assert ran and stack.counters["internal errors"] == 2
    logged = [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]
    assert logged == ["pyhv net: internal error on a frame (dropped)"]
    stack.close()
