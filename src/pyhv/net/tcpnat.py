"""The TCP flow table: connect-first SYN handling, limits on connects in flight, flows
opened from the host (port forwards), idle cleanup.

On the guest's SYN the host `connect()` runs first; the guest gets SYN-ACK only when it
succeeds, RST when refused, ICMP unreachable when the host has no route or the connect
times out (as VPNKit and gvproxy do). Connects in flight are limited in total and per
destination, so one black-holed destination never stalls connections to others."""

from __future__ import annotations

import asyncio
import errno
from collections import Counter

from hvcore.netpkt import ACK, FIN, RST, SYN
from pyhv.net.tcp import CONNECTING, FIN_WAIT_2, M32, STATES, HostSide, TcpConn

SWEEP = 5.0
FIN_WAIT_2_TIMEOUT = 60.0
EPHEMERAL = (32768, 60999)


class TcpNat:
    def __init__(self, stack):
        self.stack = stack
        self.conns: dict[tuple[int, int, int, int], TcpConn] = {}
        self.connecting = 0
        self.per_dest: Counter[tuple[int, int]] = Counter()
        self.sweeper: asyncio.TimerHandle | None = None
        self.next_port = EPHEMERAL[0]
        self.tasks: set[asyncio.Task] = set()
        self.closing = False

    def start(self) -> None:
        self.sweeper = self.stack.loop.call_later(SWEEP, self._sweep)

    def remove(self, conn: TcpConn) -> None:
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        if conn.on_close is not None:
            conn.on_close(conn)

    def segment(self, pkt) -> None:
        key = (pkt.src, pkt.sport, pkt.dst, pkt.dport)
        conn = self.conns.get(key)
        if conn is not None:
            conn.segment(pkt)
            return
        flags = pkt.flags
        if flags & RST:
            return
        if flags & SYN and not flags & ACK:
            self._syn(pkt, key)
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

    def _syn(self, pkt, key) -> None:
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
                self.per_dest[dest] >= cfg.max_connecting_per_dest:
            stack.counters["tcp syn dropped: connects in flight"] += 1
            return                              # the guest retransmits its SYN later
        conn = TcpConn(self, pkt.src, pkt.sport, pkt.dst, pkt.dport)
        conn.accept_syn(pkt)
        conn.syn_head = bytes(pkt.ip_datagram[:pkt.l4_offset - pkt.ip_offset + 8])
        self.conns[key] = conn
        self.connecting += 1
        self.per_dest[dest] += 1
        task = stack.loop.create_task(self._connect(conn, target, dest))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self, conn: TcpConn, target: tuple[str, int], dest) -> None:
        stack = self.stack
        counters = stack.counters
        task = asyncio.current_task()
        timer = stack.loop.call_later(stack.cfg.connect_timeout, task.cancel)
        try:
            await stack.loop.create_connection(lambda: HostSide(conn), *target)
        except asyncio.CancelledError:
            if self.closing:
                raise
            counters["tcp connect timeouts"] += 1
            self._failed(conn, icmp=1)
        except ConnectionRefusedError:
            counters["tcp connect refused"] += 1
            self._failed(conn)
        except OSError as e:
            name = errno.errorcode.get(e.errno or 0, "error")
            counters[f"tcp connect failed: {name}"] += 1
            if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                self._failed(conn, icmp=1 if e.errno == errno.EHOSTUNREACH else 0)
            else:
                self._failed(conn)
        else:
            if conn.state == CONNECTING:
                counters["tcp connections"] += 1
                conn.send_synack()
            else:                               # the guest gave up meanwhile
                conn.finish()
        finally:
            timer.cancel()
            self.connecting -= 1
            self.per_dest[dest] -= 1
            if not self.per_dest[dest]:
                del self.per_dest[dest]

    def _failed(self, conn: TcpConn, icmp: int | None = None) -> None:
        if conn.state == CONNECTING:
            if icmp is None:
                self.stack.send([self.stack.builder.tcp(
                    conn.peer, conn.pport, conn.guest, conn.gport, 0, conn.rcv_nxt & M32,
                    RST | ACK, 0)])
            else:
                self.stack.unreachable(conn.syn_head, icmp)
        conn.finish()

    def open_inbound(self, transport, guest: int, gport: int, on_close=None) -> TcpConn:
        """A flow from the host (an accepted forward socket) to the guest's `gport`,
        from the gateway address: SYN now, host reading paused until the guest answers."""
        gw = self.stack.cfg.gw
        for _ in range(EPHEMERAL[1] - EPHEMERAL[0]):
            port = self.next_port
            self.next_port = port + 1 if port < EPHEMERAL[1] else EPHEMERAL[0]
            if (guest, gport, gw, port) not in self.conns:
                break
        conn = TcpConn(self, guest, gport, gw, port)
        conn.on_close = on_close
        self.conns[conn.key] = conn
        conn.host_connected(transport)
        transport.pause_reading()
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
        to_host = [c.transport.get_write_buffer_size() + (c.reasm.pending if c.reasm else 0)
                   if c.transport else 0 for c in conns]
        to_guest = [c.buffered for c in conns]
        return {"flows": len(conns), "connecting": self.connecting, "states": states,
                "buffered_to_host": sum(to_host), "buffered_to_host_max": max(to_host or [0]),
                "buffered_to_guest": sum(to_guest),
                "buffered_to_guest_max": max(to_guest or [0])}

    def close(self) -> None:
        self.closing = True
        if self.sweeper is not None:
            self.sweeper.cancel()
        for task in list(self.tasks):
            task.cancel()
        for conn in list(self.conns.values()):
            conn.abort()
