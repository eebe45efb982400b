"""The TCP flow table: connect-first SYN handling, limits on connects in flight, flows
opened from the host (port forwards), idle cleanup.

On the guest's SYN the host `connect()` runs first; the guest gets SYN-ACK only when it
succeeds, RST when refused, ICMP unreachable when the host has no route or the connect
times out (as VPNKit and gvproxy do). Connects in flight are limited in total and per
destination, so one black-holed destination never stalls connections to others.

The connect is a non-blocking `connect()` made while handling the SYN
(`hvcore.net.hostsock.connect_tcp`, on a raw descriptor): to a loopback or
otherwise fast peer it has completed when the call returns (getpeername() tells), so the
SYN-ACK (or RST) leaves in the same loop iteration; otherwise the socket waits for
writability, with a timer for the connect timeout. Flows in TIME_WAIT expire through one
FIFO and one timer (every flow waits the same time), not a timer each. What every
connection runs (the SYN's connect and SYN-ACK, the flow's end, TIME_WAIT) is
`hvcore.net.tcp.NatCore`, in C; the rest is here."""

from __future__ import annotations

import errno
from collections import Counter

from hvcore.net.hostsock import HostSocket, Poller
from hvcore.net.packet import ACK, RST, SYN
from hvcore.net.tcp import (
    CONNECTING,
    FIN_WAIT_2,
    M32,
    STATES,
    NatCore,
    TcpConn,
    reuses_pair,
)

SWEEP = 5.0
FIN_WAIT_2_TIMEOUT = 60.0
EPHEMERAL = (32768, 60999)


def host_connected(conn: TcpConn, sock, reading: bool = True) -> None:
    """`conn`'s host socket is connected (a flow opened from the host reads only once the
    guest has answered its SYN)."""
    conn.host = HostSocket(conn.nat.poller, sock, conn, conn.rcv_cap)
    conn.host.register(reading)


class TcpNat(NatCore):
    def __init__(self, stack):
        self.stack = stack
        self.per_dest: Counter[tuple[int, int]] = Counter()
        self.sweeper = None
        self.poller: Poller | None = None
        self.next_port = EPHEMERAL[0]
        self.closing = False

    def start(self) -> None:
        self.poller = Poller(self.stack.loop, self.stack.counters)
        self.sweeper = self.stack.loop.call_later(SWEEP, self._sweep)

    def segment(self, pkt) -> None:
        key = (pkt.src, pkt.sport, pkt.dst, pkt.dport)
        conn = self.conns.get(key)
        flags = pkt.flags
        if conn is not None:
            if not reuses_pair(conn, pkt):
                conn.segment(pkt)
                return
            conn.finish()                       # a new connection reuses a TIME_WAIT pair
        if flags & RST:
            return
        if flags & SYN and not flags & ACK:
            self.syn(pkt, key)
            return
        self.stack.counters["tcp segments for no flow"] += 1
        self.reset_for(pkt)

    def connect_pending(self, conn: TcpConn, fd: int, dest: tuple[int, int]) -> None:
        """`conn`'s host connect is in flight: count it, wait for it (or time out)."""
        self.connecting += 1
        self.per_dest[dest] += 1
        conn.connect_dest = dest
        conn.connect_timer = self.stack.loop.call_later(self.stack.cfg.connect_timeout,
                                                        self._connect_timeout, conn)
        conn.host = HostSocket(self.poller, fd, conn, conn.rcv_cap)
        conn.host.await_connect(lambda: self._connect_done(conn))

    def _connect_done(self, conn: TcpConn) -> None:
        """The socket of a connect in flight became writable: connected, or failed."""
        self.connect_ended(conn)
        err = conn.host.so_error()
        if err:
            self.connect_failed(conn, err)
        else:
            self.connected(conn, conn.host.fd)

    def _connect_timeout(self, conn: TcpConn) -> None:
        conn.connect_timer = None
        self.stack.counters["tcp connect timeouts"] += 1
        self._failed(conn, icmp=1)

    def connect_ended(self, conn: TcpConn) -> None:
        """Connects-in-flight bookkeeping ends (done, failed, timed out or flow gone)."""
        dest, conn.connect_dest = conn.connect_dest, None
        if conn.connect_timer is not None:
            conn.connect_timer.cancel()
            conn.connect_timer = None
        self.connecting -= 1
        self.per_dest[dest] -= 1
        if not self.per_dest[dest]:
            del self.per_dest[dest]

    def connect_failed(self, conn: TcpConn, err: int) -> None:
        counters = self.stack.counters
        if err == errno.ECONNREFUSED:
            counters["tcp connect refused"] += 1
            self._failed(conn)
            return
        counters[f"tcp connect failed: {errno.errorcode.get(err, 'error')}"] += 1
        if err in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            self._failed(conn, icmp=1 if err == errno.EHOSTUNREACH else 0)
        else:
            self._failed(conn)

    def _failed(self, conn: TcpConn, icmp: int | None = None) -> None:
        if conn.state == CONNECTING:
            if icmp is None:
                self.stack.send([self.stack.builder.tcp(
                    conn.peer, conn.pport, conn.guest, conn.gport, 0, conn.rcv_nxt & M32,
                    RST | ACK, 0)])
            else:
                self.stack.unreachable(conn.syn_head, icmp)
        conn.abort()

    def open_inbound(self, sock, guest: int, gport: int, on_close=None) -> TcpConn:
        """A flow from the host (an accepted forward socket) to the guest's `gport`,
        from the gateway address: SYN now, host reading only once the guest answers."""
        gw = self.stack.cfg.gw
        for _ in range(EPHEMERAL[1] - EPHEMERAL[0]):
            port = self.next_port
            self.next_port = port + 1 if port < EPHEMERAL[1] else EPHEMERAL[0]
            if (guest, gport, gw, port) not in self.conns:
                break
        conn = TcpConn(self, guest, gport, gw, port)
        conn.on_close = on_close
        self.conns[conn.key] = conn
        host_connected(conn, sock, reading=False)
        conn.send_syn()
        return conn

    def _sweep(self) -> None:
        now, cfg = self.stack.loop.time(), self.stack.cfg
        for conn in list(self.conns.values()):
            idle = now - conn.seen
            if conn.state != CONNECTING and (idle > cfg.tcp_idle_timeout or (
                    conn.state == FIN_WAIT_2 and idle > FIN_WAIT_2_TIMEOUT)):
                self.stack.counters["tcp idle timeouts"] += 1
                conn.abort()
            elif idle > SWEEP:
                conn.release_buffer()
        self.sweeper = self.stack.loop.call_later(SWEEP, self._sweep)

    def stats(self) -> dict:
        conns = list(self.conns.values())
        states = Counter(STATES[c.state] for c in conns)
        to_host = [(len(c.host.wbuf) if c.host else 0) + (c.reasm.pending if c.reasm else 0)
                   for c in conns]
        to_guest = [c.buffered for c in conns]
        return {"flows": len(conns), "connecting": self.connecting, "states": states,
                "buffered_to_host": sum(to_host), "buffered_to_host_max": max(to_host or [0]),
                "buffered_to_guest": sum(to_guest),
                "buffered_to_guest_max": max(to_guest or [0])}

    def close(self) -> None:
        self.closing = True
        if self.sweeper is not None:
            self.sweeper.cancel()
        if self.wait_timer is not None:
            self.wait_timer.cancel()
        for conn in list(self.conns.values()):
            conn.abort()
        self.close_spare()
        if self.poller is not None:
            self.poller.close()
