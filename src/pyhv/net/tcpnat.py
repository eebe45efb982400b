"""The TCP flow table: connect-first SYN handling, limits on connects in flight, flows
opened from the host (port forwards), idle cleanup.

On the guest's SYN the host `connect()` runs first; the guest gets SYN-ACK only when it
succeeds, RST when refused, ICMP unreachable when the host has no route or the connect
times out (as VPNKit and gvproxy do). Connects in flight are limited in total and per
destination, so one black-holed destination never stalls connections to others.

The connect is a non-blocking `connect()` made while handling the SYN
(`hvcore.nethost.connect_tcp`, on a raw descriptor): to a loopback or
otherwise fast peer it has completed when the call returns (getpeername() tells), so the
SYN-ACK (or RST) leaves in the same loop iteration; otherwise the socket waits for
writability, with a timer for the connect timeout. Flows in TIME_WAIT expire through one
FIFO and one timer (every flow waits the same time), not a timer each."""

from __future__ import annotations

import errno
from collections import Counter, deque

from hvcore.netpkt import ACK, FIN, RST, SYN
from pyhv.net import tcp
from pyhv.net.hostsock import HostSocket, Poller, connect_tcp
from pyhv.net.tcp import CONNECTING, FIN_WAIT_2, M32, STATES, TIME_WAIT, TcpConn, host_connected

SWEEP = 5.0
FIN_WAIT_2_TIMEOUT = 60.0
EPHEMERAL = (32768, 60999)
WAIT_STEP = 0.1


class TcpNat:
    def __init__(self, stack):
        self.stack = stack
        self.conns: dict[tuple[int, int, int, int], TcpConn] = {}
        self.connecting = 0
        self.per_dest: Counter[tuple[int, int]] = Counter()
        self.sweeper = None
        self.poller: Poller | None = None
        self.next_port = EPHEMERAL[0]
        self.closing = False
        self.scratch = memoryview(bytearray(tcp.READ_CHUNK))   # first reads of new flows
        self.waiting: deque[tuple[float, TcpConn]] = deque()  # TIME_WAIT, oldest first
        self.wait_timer = None

    def start(self) -> None:
        self.poller = Poller(self.stack.loop, self.stack.counters)
        self.sweeper = self.stack.loop.call_later(SWEEP, self._sweep)

    def remove(self, conn: TcpConn) -> None:
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        if conn.connect_dest is not None:
            self._connect_ended(conn)
        if conn.on_close is not None:
            conn.on_close(conn)

    def segment(self, pkt) -> None:
        key = (pkt.src, pkt.sport, pkt.dst, pkt.dport)
        conn = self.conns.get(key)
        flags = pkt.flags
        if conn is not None:
            if conn.state != TIME_WAIT or flags & (SYN | ACK | RST) != SYN or \
                    tcp.unwrap(pkt.seq, conn.rcv_nxt) <= conn.rcv_nxt:
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

    def reset_for(self, pkt) -> None:
        """RST answering `pkt` (RFC 9293 3.10.7.1)."""
        if pkt.flags & ACK:
            seq, ack, flags = pkt.ack, 0, RST
        else:
            seq, flags = 0, RST | ACK
            ack = (pkt.seq + pkt.payload_len + (1 if pkt.flags & SYN else 0)
                   + (1 if pkt.flags & FIN else 0)) & M32
        self.stack.send([self.stack.builder.tcp(pkt.dst, pkt.dport, pkt.src, pkt.sport, seq,
                                                ack, flags, 0)])

    def syn(self, pkt, key) -> None:
        """A guest SYN for no flow: connect on the host, then SYN-ACK (or RST/ICMP)."""
        stack, cfg = self.stack, self.stack.cfg
        target = stack.host_target(pkt.dst, pkt.dport, "tcp")
        if target is None:
            stack.counters["tcp refused: no such destination"] += 1
            self.reset_for(pkt)
            return
        dest = (pkt.dst, pkt.dport)
        if len(self.conns) >= cfg.max_tcp_flows:
            stack.counters["tcp syn dropped: flow limit"] += 1
            return
        if self.connecting >= cfg.max_connecting or \
                self.per_dest.get(dest, 0) >= cfg.max_connecting_per_dest:
            stack.counters["tcp syn dropped: connects in flight"] += 1
            return                              # the guest retransmits its SYN later
        conn = TcpConn(self, pkt.src, pkt.sport, pkt.dst, pkt.dport)
        conn.accept_syn(pkt)
        self.conns[key] = conn
        fd, err = connect_tcp(*target)
        if err == 0:
            self._connected(conn, fd)
        elif err == errno.EINPROGRESS:
            conn.syn_head = bytes(pkt.ip_datagram[:pkt.l4_offset - pkt.ip_offset + 8])
            conn.connect_dest = dest
            self.connecting += 1
            self.per_dest[dest] += 1
            conn.connect_timer = stack.loop.call_later(cfg.connect_timeout,
                                                       self._connect_timeout, conn)
            conn.host = HostSocket(self.poller, fd, conn, conn.rcv_cap)
            conn.host.await_connect(lambda: self._connect_done(conn))
        else:
            conn.syn_head = bytes(pkt.ip_datagram[:pkt.l4_offset - pkt.ip_offset + 8])
            self._connect_failed(conn, err)

    def _connected(self, conn: TcpConn, fd: int) -> None:
        self.stack.counters["tcp connections"] += 1
        if conn.host is None:
            conn.send_synack()                  # what the guest waits for goes first
            host_connected(conn, fd)
        else:
            conn.host.start_reading()
            conn.send_synack()

    def _connect_done(self, conn: TcpConn) -> None:
        """The socket of a connect in flight became writable: connected, or failed."""
        self._connect_ended(conn)
        err = conn.host.so_error()
        if err:
            self._connect_failed(conn, err)
        else:
            self._connected(conn, conn.host.fd)

    def _connect_timeout(self, conn: TcpConn) -> None:
        conn.connect_timer = None
        self.stack.counters["tcp connect timeouts"] += 1
        self._failed(conn, icmp=1)

    def _connect_ended(self, conn: TcpConn) -> None:
        """Connects-in-flight bookkeeping ends (done, failed, timed out or flow gone)."""
        dest, conn.connect_dest = conn.connect_dest, None
        if conn.connect_timer is not None:
            conn.connect_timer.cancel()
            conn.connect_timer = None
        self.connecting -= 1
        self.per_dest[dest] -= 1
        if not self.per_dest[dest]:
            del self.per_dest[dest]

    def _connect_failed(self, conn: TcpConn, err: int) -> None:
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

    def time_wait(self, conn: TcpConn) -> None:
        """`conn` entered TIME_WAIT: it ends time_wait seconds from now."""
        loop = self.stack.loop
        self.waiting.append((loop.time() + self.stack.cfg.time_wait, conn))
        if self.wait_timer is None:
            self.wait_timer = loop.call_at(self.waiting[0][0], self._expire)

    def _expire(self) -> None:
        self.wait_timer = None
        waiting, now = self.waiting, self.stack.loop.time()
        while waiting and waiting[0][0] <= now:
            conn = waiting.popleft()[1]
            if conn.state == TIME_WAIT:
                conn.finish()
        if waiting:                             # (in steps of WAIT_STEP: one wakeup
            self.wait_timer = self.stack.loop.call_at(  # ends many flows)
                max(waiting[0][0], now + WAIT_STEP), self._expire)

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
        if self.poller is not None:
            self.poller.close()
