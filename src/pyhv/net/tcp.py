"""One TCP flow between the guest and a host socket: the state machine (RFC 9293) on the
guest side, a `HostSocket` (plain non-blocking socket calls) on the host side.

pyhv plays the guest's peer. Sequence numbers are kept unwrapped (Python ints); the wire
carries them mod 2**32. Flow control is tied to the host socket: the window offered to the
guest is `tcp_rcv_buffer` minus what the host socket has not taken yet (its write backlog)
and out-of-order data held; data from the host is read straight into `sbuf` and waits
there until the guest acknowledges it; the host socket stops being read while
`tcp_snd_buffer` bytes wait. So no queue grows without bound. A new flow allocates no
buffer until the host sends: its first read lands in a buffer shared by all flows and is
copied out at its own size. Segment building is in `hvcore.netbuild`, reassembly in
`hvcore.netreasm`.

RST and SYN from the guest follow RFC 5961: a RST resets the flow only when its sequence
number is exactly rcv_nxt; one elsewhere in the window, or a SYN, gets a challenge ACK.
"""

from __future__ import annotations

import random

from hvcore.netpkt import ACK, FIN, PSH, RST, SYN
from hvcore.netreasm import Reassembly
from pyhv.net.hostsock import HostSocket

M32 = 0xFFFFFFFF
(CONNECTING, SYN_SENT, SYN_RCVD, ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, FIN_WAIT_2, CLOSING,
 LAST_ACK, TIME_WAIT, CLOSED) = range(11)
STATES = ("CONNECTING", "SYN_SENT", "SYN_RCVD", "ESTABLISHED", "CLOSE_WAIT", "FIN_WAIT_1",
          "FIN_WAIT_2", "CLOSING", "LAST_ACK", "TIME_WAIT", "CLOSED")
WSCALE = 7                      # our window scale: windows up to 8 MiB
MIN_RTO, INIT_RTO, MAX_RTO = 0.2, 1.0, 30.0
MAX_RETRIES = 8
READ_CHUNK = 256 << 10          # largest host read
MIN_ROOM = 16 << 10             # grow (doubling) or compact when less room is left
DELACK_BYTES = 1024             # new data below this (and below one MSS) is ACKed ...
DELACK = 0.001                  # ... this much later, unless an answer carries the ACK


def unwrap(value: int, ref: int) -> int:
    """The unwrapped sequence number nearest `ref` whose low 32 bits are `value`."""
    d = (value - ref) & M32
    return ref + d - (1 << 32) if d >= 1 << 31 else ref + d


class TcpConn:
    __slots__ = ("nat", "stack", "builder", "loop", "rcv_cap", "snd_cap", "key", "guest",
                 "gport", "peer", "pport", "state", "iss", "snd_una", "snd_nxt", "snd_wnd",
                 "snd_wscale", "rcv_wscale", "sbuf", "s_head", "s_tail", "fin_queued",
                 "fin_seq", "irs", "rcv_nxt", "rcv_adv", "rcv_fin", "reasm", "mss", "host",
                 "host_paused", "into_scratch", "connect_dest", "connect_timer", "rto",
                 "rto_deadline", "rto_handle", "rto_pending", "retries", "dupacks",
                 "rtt_seq", "rtt_time", "srtt", "rttvar", "last_ack", "last_wnd", "seen",
                 "bytes_to_host", "bytes_to_guest", "syn_head", "on_close", "__weakref__")

    def __init__(self, nat, guest: int, gport: int, peer: int, pport: int):
        self.nat, self.stack = nat, nat.stack
        self.builder = nat.stack.builder
        self.loop = nat.stack.loop
        cfg = nat.stack.cfg
        self.rcv_cap, self.snd_cap = cfg.tcp_rcv_buffer, cfg.tcp_snd_buffer
        self.key = (guest, gport, peer, pport)
        self.guest, self.gport, self.peer, self.pport = guest, gport, peer, pport
        self.state = CONNECTING
        self.iss = random.getrandbits(32)
        self.snd_una = self.snd_nxt = self.iss
        self.snd_wnd = 0
        self.snd_wscale = self.rcv_wscale = 0
        self.sbuf = bytearray()          # host data from snd_una on: sbuf[s_head:s_tail]
        self.s_head = self.s_tail = 0
        self.fin_queued = False
        self.fin_seq: int | None = None
        self.irs = self.rcv_nxt = self.rcv_adv = 0
        self.rcv_fin: int | None = None     # the guest's FIN, seen ahead of a gap
        self.reasm: Reassembly | None = None
        self.mss = 536
        self.host: HostSocket | None = None
        self.host_paused = self.into_scratch = False
        self.connect_dest: tuple[int, int] | None = None    # while the host connect runs
        self.connect_timer = None
        self.rto = INIT_RTO
        self.rto_deadline: float | None = None
        self.rto_handle = None
        self.rto_pending = False
        self.retries = self.dupacks = 0
        self.rtt_seq: int | None = None
        self.rtt_time = 0.0
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.last_ack = self.last_wnd = -1
        self.seen = self.loop.time()
        self.bytes_to_host = self.bytes_to_guest = 0
        self.syn_head = b""
        self.on_close = None

    # ---- frames to the guest

    def _wnd(self) -> int:
        buffered = len(self.host.wbuf) if self.host is not None else 0
        held = self.reasm.pending if self.reasm is not None else 0
        return max(0, self.rcv_cap - buffered - held)

    def _wnd_field(self) -> int:
        return min(self._wnd() >> self.rcv_wscale, 0xFFFF)

    def _sent_ack(self, wnd_field: int) -> None:
        if self in self.stack.delayed:
            self.stack.ack_sent(self)
        self.last_ack, self.last_wnd = self.rcv_nxt, wnd_field
        edge = self.rcv_nxt + (wnd_field << self.rcv_wscale)
        if edge > self.rcv_adv:
            self.rcv_adv = edge

    def _segment(self, flags: int, seq: int | None = None, mss: int = 0,
                 wscale: int = -1) -> None:
        wnd = self._wnd_field() if not flags & SYN else min(self._wnd(), 0xFFFF)
        seq = self.snd_nxt if seq is None else seq
        self.stack.send([self.builder.tcp(self.peer, self.pport, self.guest, self.gport,
                                          seq & M32, self.rcv_nxt & M32, flags, wnd, None,
                                          mss, wscale)])
        if flags & ACK:
            self._sent_ack(wnd if not flags & SYN else wnd >> self.rcv_wscale)

    def ack_now(self) -> None:
        self._segment(ACK)

    def flush_ack(self) -> None:
        """Called once per batch of guest frames: one ACK for all of them, if owed. Less
        than DELACK_BYTES of new data (a request) is ACKed DELACK later, so the host's
        answer, if it comes by then, carries the ACK (one frame less per exchange)."""
        if self.state in (CLOSED, CONNECTING, SYN_SENT, SYN_RCVD):
            return
        owed = self.rcv_nxt - self.last_ack
        if owed and owed < DELACK_BYTES and owed < self.mss and self.state == ESTABLISHED:
            self.stack.delay_ack(self)
        elif owed or self._wnd_field() > self.last_wnd:
            self.ack_now()

    def delayed_ack(self) -> None:
        """DELACK has passed since data arrived: the ACK goes now, if still owed."""
        if self.state not in (CLOSED, CONNECTING, SYN_SENT, SYN_RCVD) and \
                self.rcv_nxt != self.last_ack:
            self.ack_now()

    def window_update(self) -> None:
        if self.state not in (CLOSED, CONNECTING, SYN_SENT, SYN_RCVD) and \
                self._wnd_field() > self.last_wnd:
            self.ack_now()

    def send_reset(self) -> None:
        self.stack.send([self.builder.tcp(self.peer, self.pport, self.guest, self.gport,
                                          self.snd_nxt & M32, self.rcv_nxt & M32, RST | ACK,
                                          0)])

    def send_synack(self) -> None:
        self.state = SYN_RCVD
        self._segment(SYN | ACK, self.iss, self.stack.cfg.mtu - 40,
                      WSCALE if self.rcv_wscale else -1)
        self.snd_nxt = self.iss + 1
        self._arm()

    def send_syn(self) -> None:
        """Open the flow from our side (a port forward)."""
        self.state = SYN_SENT
        self.rcv_wscale = WSCALE
        self._segment(SYN, self.iss, self.stack.cfg.mtu - 40, WSCALE)
        self.snd_nxt = self.iss + 1
        self._arm()

    def host_read_done(self) -> None:
        """The host socket's reads of this event are done: what they brought (data and
        EOF read together: a short reply and its FIN in one segment) goes out now."""
        if self.s_tail != self.s_head or self.fin_queued and self.fin_seq is None:
            self._output()

    def _output(self) -> None:
        """Send what the guest's window allows, with our FIN once everything is sent."""
        if self.state not in (ESTABLISHED, CLOSE_WAIT):
            return
        data_end = self.snd_una + self.s_tail - self.s_head
        wnd_end = self.snd_una + self.snd_wnd
        end = min(wnd_end, data_end)
        # our FIN takes a sequence number of the window too (as Linux's tcp_snd_wnd_test):
        # Linux >= 6.17 drops a whole segment whose FIN lies beyond the offered window
        fin = self.fin_queued and self.fin_seq is None and data_end < wnd_end
        if end > self.snd_nxt:
            wnd = self._wnd_field()
            frames = self.builder.tcp_data(
                self.peer, self.pport, self.guest, self.gport, self.snd_nxt & M32,
                self.rcv_nxt & M32, wnd, self.sbuf, self.s_head + self.snd_nxt - self.snd_una,
                end - self.snd_nxt, self.mss, ACK | PSH | (FIN if fin else 0), True)
            self.stack.send(frames)
            self.bytes_to_guest += end - self.snd_nxt
            if self.rtt_seq is None:
                self.rtt_seq, self.rtt_time = end, self.loop.time()
            self.snd_nxt = end
            self._sent_ack(wnd)
            self._arm(keep=True)
            if fin:
                self._fin_sent(segment=False)
        elif fin and self.snd_nxt == data_end:
            self._fin_sent(segment=True)
        elif self.snd_wnd == 0 and self.snd_nxt == self.snd_una and (
                data_end > self.snd_nxt or self.fin_queued and self.fin_seq is None):
            self._arm(keep=True)               # persist timer: probe the zero window

    def _fin_sent(self, segment: bool) -> None:
        self.fin_seq = self.snd_nxt
        if segment:
            self._segment(FIN | ACK)
        self.snd_nxt += 1
        self.state = FIN_WAIT_1 if self.state == ESTABLISHED else LAST_ACK
        self._arm(keep=True)

    # ---- timers

    def _arm(self, keep: bool = False) -> None:
        """Set the retransmission deadline. The loop timer for it is made a moment later
        (Stack.defer, >= 1 ms before any RTO): usually the ACK has come by then and no
        timer is needed at all."""
        if keep and self.rto_deadline is not None:
            return
        self.rto_deadline = self.loop.time() + self.rto
        if self.rto_handle is None and not self.rto_pending:
            self.rto_pending = True
            self.stack.defer(self._start_timer)

    def _start_timer(self) -> None:
        self.rto_pending = False
        if self.rto_deadline is not None and self.rto_handle is None and \
                self.state != CLOSED:
            self.rto_handle = self.loop.call_at(self.rto_deadline, self._timer)

    def _timer(self) -> None:
        self.rto_handle = None
        if self.rto_deadline is None or self.state == CLOSED:
            return
        if self.loop.time() < self.rto_deadline:
            self.rto_handle = self.loop.call_at(self.rto_deadline, self._timer)
            return
        self.rto_deadline = None
        self.retries += 1
        if self.retries > MAX_RETRIES:
            self.stack.counters["tcp aborted: retransmission limit"] += 1
            self.abort()
            return
        self.rto = min(self.rto * 2, MAX_RTO)
        self.rtt_seq = None                    # Karn: no RTT samples from retransmissions
        self.stack.counters["tcp retransmission timeouts"] += 1
        if self.state == SYN_RCVD:
            self.send_synack()
        elif self.state == SYN_SENT:
            self.send_syn()
        elif self.snd_nxt > self.snd_una:
            self._retransmit()
            self._arm()
        elif self.snd_una + self.buffered > self.snd_nxt and self.state in (ESTABLISHED,
                                                                           CLOSE_WAIT):
            self._send_data(self.snd_nxt, 1)     # zero-window probe: one new byte
            self.snd_nxt += 1
            self._arm()
        elif self.fin_queued and self.fin_seq is None and self.state in (ESTABLISHED,
                                                                         CLOSE_WAIT):
            self._fin_sent(segment=True)       # all data acknowledged, window still 0:
                                               # the FIN itself probes (then retransmits)

    def _send_data(self, seq: int, n: int) -> None:
        self.stack.send(self.builder.tcp_data(
            self.peer, self.pport, self.guest, self.gport, seq & M32, self.rcv_nxt & M32,
            self._wnd_field(), self.sbuf, self.s_head + seq - self.snd_una, n, self.mss,
            scatter=True))

    def _retransmit(self) -> None:
        inflight = min(self.snd_nxt - self.snd_una, self.buffered)
        if inflight > 0:
            self._send_data(self.snd_una, min(self.mss, inflight))
        elif self.fin_seq is not None and self.snd_una <= self.fin_seq:
            self._segment(FIN | ACK, seq=self.fin_seq)

    # ---- segments from the guest

    def accept_syn(self, pkt) -> None:
        """Take the guest's SYN options (before the host connect completes)."""
        self.irs = pkt.seq
        self.rcv_nxt = self.rcv_adv = pkt.seq + 1
        self.mss = max(64, min(pkt.mss or 536, self.stack.cfg.mtu - 40))
        if pkt.wscale >= 0:
            self.snd_wscale, self.rcv_wscale = pkt.wscale, WSCALE
        self.snd_wnd = pkt.window

    def segment(self, pkt) -> None:
        self.seen = self.loop.time()
        flags, state = pkt.flags, self.state
        if state == SYN_SENT:
            self._syn_sent(pkt)
            return
        if flags & RST:
            seq = unwrap(pkt.seq, self.rcv_nxt)
            if seq == self.rcv_nxt:
                self.stack.counters["tcp reset by guest"] += 1
                self._abort_host()
                self.finish()
            elif state != CONNECTING and self.rcv_nxt < seq < max(self.rcv_adv,
                                                                  self.rcv_nxt + 1):
                self.stack.counters["tcp challenge acks"] += 1
                self.ack_now()                 # RFC 5961 3.2: a real peer answers with
            return                             # a RST at exactly rcv_nxt
        if flags & SYN:
            if state == SYN_RCVD and pkt.seq == self.irs:
                self.send_synack()
            elif state != CONNECTING:
                self.ack_now()                 # challenge ACK (RFC 5961)
            return
        if state == CONNECTING or not flags & ACK:
            return
        ack = unwrap(pkt.ack, self.snd_una)
        if state == SYN_RCVD:
            if ack != self.iss + 1:
                self.stack.send([self.builder.tcp(self.peer, self.pport, self.guest,
                                                  self.gport, pkt.ack, 0, RST, 0)])
                return
            self.state = ESTABLISHED
            self.retries = 0
        if ack > self.snd_nxt:
            self.ack_now()
            return
        wnd = pkt.window << self.snd_wscale
        if ack > self.snd_una:
            self._acked(ack)
        elif ack == self.snd_una and not pkt.payload_len and not flags & FIN and \
                self.snd_nxt > self.snd_una and wnd == self.snd_wnd:
            self.dupacks += 1
            if self.dupacks == 3:
                self.stack.counters["tcp fast retransmits"] += 1
                self._retransmit()
        self.snd_wnd = wnd
        if self.state == CLOSED:
            return
        if pkt.payload_len or flags & FIN:
            self._receive(pkt)
        if self.s_tail != self.s_head or self.fin_queued and self.fin_seq is None:
            self._output()

    def _syn_sent(self, pkt) -> None:
        flags = pkt.flags
        if flags & ACK and pkt.ack != (self.iss + 1) & M32:
            if not flags & RST:
                self.stack.send([self.builder.tcp(self.peer, self.pport, self.guest,
                                                  self.gport, pkt.ack, 0, RST, 0)])
            return
        if flags & RST:
            self.stack.counters["tcp forward refused by guest"] += 1
            self._abort_host()
            self.finish()
            return
        if not (flags & SYN and flags & ACK):
            return
        self.irs = pkt.seq
        self.rcv_nxt = self.rcv_adv = pkt.seq + 1
        self.mss = max(64, min(pkt.mss or 536, self.stack.cfg.mtu - 40))
        if pkt.wscale >= 0:
            self.snd_wscale = pkt.wscale
        else:
            self.rcv_wscale = 0
        self.snd_una = self.iss + 1
        self.snd_wnd = pkt.window
        self.state = ESTABLISHED
        self.retries = 0
        self.rto_deadline = None
        self.ack_now()
        if self.host is not None:
            self.host.start_reading()
        self._output()

    def _acked(self, ack: int) -> None:
        # Our SYN (iss) and our FIN (fin_seq) take a sequence number but no byte of sbuf:
        # the guest's ACK of the SYN may come when host data already waits in sbuf (the
        # host peer can write as soon as connect() completes, before our SYN-ACK).
        first = max(self.snd_una, self.iss + 1)
        last = ack if self.fin_seq is None else min(ack, self.fin_seq)
        if last > first:
            self.s_head += last - first
            if self.s_head == self.s_tail:
                self.s_head = self.s_tail = 0
        self.snd_una = ack
        self.dupacks = self.retries = 0
        now = self.loop.time()
        if self.rtt_seq is not None and ack >= self.rtt_seq:
            sample = now - self.rtt_time
            if self.srtt is None:
                self.srtt, self.rttvar = sample, sample / 2
            else:
                self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - sample)
                self.srtt = 0.875 * self.srtt + 0.125 * sample
            self.rto = min(MAX_RTO, max(MIN_RTO, self.srtt + 4 * self.rttvar))
            self.rtt_seq = None
        if ack == self.snd_nxt:                # all acknowledged: no timer left behind
            self.rto_deadline = None           # (a short connection would otherwise wake
            if self.rto_handle is not None:    # the loop once for nothing, INIT_RTO later)
                self.rto_handle.cancel()
                self.rto_handle = None
        else:
            self.rto_deadline = now + self.rto
        if self.host_paused and self.buffered < self.snd_cap // 2 and self.host is not None:
            self.host_paused = False
            self.host.start_reading()
        if self.fin_seq is not None and ack > self.fin_seq:
            if self.state == FIN_WAIT_1:
                self.state = FIN_WAIT_2
            elif self.state == CLOSING:
                self._time_wait()
            elif self.state == LAST_ACK:
                self.finish()

    def _receive(self, pkt) -> None:
        if self.state not in (ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2):
            self.ack_now()                     # a retransmitted FIN: ACK it again
            return
        seq, n = unwrap(pkt.seq, self.rcv_nxt), pkt.payload_len
        end = seq + n
        fin = pkt.flags & FIN
        counters = self.stack.counters
        if n:
            reasm = self.reasm
            if seq <= self.rcv_nxt and (reasm is None or not reasm.pending):
                if end < self.rcv_nxt or end == self.rcv_nxt and not fin:
                    counters["tcp duplicate segments"] += 1    # (old data with a FIN at
                    self.ack_now()                             # rcv_nxt: the FIN is new)
                    return
                take = min(end, max(self.rcv_adv, self.rcv_nxt))
                if take > self.rcv_nxt:
                    self._to_host(pkt.payload[self.rcv_nxt - seq:take - seq])
                    self.rcv_nxt = take
                if take < end:
                    counters["tcp dropped: beyond window"] += 1
                    self.ack_now()
                    return
            else:
                if end <= self.rcv_nxt or seq >= self.rcv_nxt + self.rcv_cap:
                    counters["tcp dropped: outside window"] += 1
                    self.ack_now()
                    return
                if reasm is None:
                    reasm = self.reasm = Reassembly(self.rcv_cap, self.rcv_nxt)
                elif not reasm.pending:
                    reasm.set_base(self.rcv_nxt)
                ready = reasm.add(seq, pkt.payload)
                counters["tcp out-of-order segments"] += 1
                if ready < 0:
                    counters["tcp dropped: too many holes"] += 1
                    fin = 0
                else:
                    if fin and end <= self.rcv_nxt + self.rcv_cap:
                        self.rcv_fin = end             # taken when the gap before it fills
                    if ready:
                        self._to_host(reasm.take())
                        self.rcv_nxt = reasm.base
                self.ack_now()                 # duplicate ACK: tells the guest what is missing
            self.stack.ack_pending.add(self)
        elif fin and self.rcv_nxt < seq < self.rcv_nxt + self.rcv_cap:
            self.rcv_fin = seq                 # a bare FIN ahead of a gap
            counters["tcp out-of-order segments"] += 1
            self.ack_now()
            return
        if fin and end == self.rcv_nxt or self.rcv_fin == self.rcv_nxt:
            self.rcv_fin = None
            self.rcv_nxt += 1
            if self.host is not None and self.state != FIN_WAIT_2:
                self.host.write_eof()          # (from FIN_WAIT_2 the close sends our FIN)
            if self.state == ESTABLISHED:
                self.state = CLOSE_WAIT
            elif self.state == FIN_WAIT_1:
                self.state = CLOSING
            else:                              # the last segment of the flow: its ACK
                self._time_wait(lazy=True)     # and the host socket's close can wait a
                self.stack.defer(self.delayed_ack)   # moment (the guest already opens
                return                         # its next connection, whose SYN goes first)
            self.ack_now()

    def _to_host(self, data) -> None:
        if self.host is None or self.host.closing:
            self.stack.counters["tcp dropped: host socket closed"] += 1
            return
        self.host.write(data)
        self.bytes_to_host += len(data)
        self.stack.host_written = True

    # ---- host socket events

    def host_connected(self, sock, reading: bool = True) -> None:
        """The host socket is connected (a flow opened from the host reads only once the
        guest has answered its SYN)."""
        self.host = HostSocket(self.nat.poller, sock, self, self.rcv_cap)
        self.host.register(reading)

    @property
    def buffered(self) -> int:
        """Host bytes not yet acknowledged by the guest (sent or not)."""
        return self.s_tail - self.s_head

    def host_buffer(self) -> memoryview:
        """Room for the next host read (at most READ_CHUNK, so sbuf holds at most snd_cap
        plus one read), after the data waiting in sbuf; with too little room there, the
        buffer shared by all flows (host_data then moves the bytes into sbuf). So a flow
        allocates nothing until its host sends, then a buffer of the size it read, and
        an EOF read costs no buffer at all."""
        if len(self.sbuf) - self.s_tail < MIN_ROOM:
            self.into_scratch = True
            return self.nat.scratch
        return memoryview(self.sbuf)[self.s_tail:self.s_tail + READ_CHUNK]

    def _take_scratch(self, nbytes: int) -> None:
        """Move `nbytes` read into the shared buffer to the end of sbuf. Small amounts get
        a bytearray of their size; more get room for further reads (one READ_CHUNK, or
        double the old size) so the next reads go straight to sbuf; at the size limit the
        waiting bytes move to the front instead. A new bytearray replaces a full one
        (never resized: the last view handed out may still exist)."""
        n = self.s_tail - self.s_head
        need = n + nbytes
        size = need if need < MIN_ROOM else max(need, min(
            2 * self.snd_cap + READ_CHUNK, max(need + READ_CHUNK, 2 * len(self.sbuf))))
        if size <= len(self.sbuf):
            self.sbuf[:n] = self.sbuf[self.s_head:self.s_tail]       # same length: memmove
        else:
            new = bytearray(size)
            new[:n] = self.sbuf[self.s_head:self.s_tail]
            self.sbuf = new
        self.sbuf[n:need] = self.nat.scratch[:nbytes]
        self.s_head, self.s_tail = 0, need

    def release_buffer(self) -> None:
        """Drop an idle flow's empty send buffer (the sweeper calls this)."""
        if not self.buffered and len(self.sbuf) > READ_CHUNK:
            self.sbuf = bytearray()
            self.s_head = self.s_tail = 0

    def host_data(self, nbytes: int) -> None:
        if self.into_scratch:
            self.into_scratch = False
            self._take_scratch(nbytes)
        else:
            self.s_tail += nbytes
        if self.s_tail - self.s_head >= self.snd_cap and not self.host_paused:
            self.host_paused = True
            self.host.stop_reading()

    def host_eof(self) -> None:
        self.fin_queued = True

    def host_lost(self, exc) -> None:
        """The host socket failed (reset, write error): it is closed already."""
        self.host = None
        if self.state in (CLOSED, TIME_WAIT):
            return
        self.stack.counters["tcp reset by host"] += 1
        self.abort()

    # ---- ends

    def _abort_host(self) -> None:
        host, self.host = self.host, None
        if host is not None:
            host.abort()                       # close with RST, as the guest did

    def abort(self) -> None:
        """Reset both sides (host failure, idle timeout, retransmission limit)."""
        if self.state not in (CONNECTING, SYN_SENT, CLOSED, TIME_WAIT):
            self.send_reset()
        self._abort_host()
        self.finish()

    def _time_wait(self, lazy: bool = False) -> None:
        self.state = TIME_WAIT
        self.rto_deadline = None
        if self.host is not None:
            if lazy:
                self.stack.defer(self.host.close)
            else:
                self.host.close()
        self.nat.time_wait(self)

    def finish(self) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.rto_deadline = None
        if self.rto_handle is not None:
            self.rto_handle.cancel()
            self.rto_handle = None
        if self.host is not None:
            self.host.close()
            self.host = None
        self.reasm = None
        self.sbuf = bytearray()
        self.s_head = self.s_tail = 0
        self.nat.remove(self)
