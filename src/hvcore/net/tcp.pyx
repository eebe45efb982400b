# cython: language_level=3
"""One TCP flow between the guest and a host socket: the state machine (RFC 9293) on the
guest side, a host socket (`hvcore.net.hostsock.HostSocket`, set by the flow table) on the host
side; and the parts of the stack and the flow table that every connection runs: the batch
dispatch and the stack's send / delayed-ACK / deferred-work core (`StackCore`), a SYN's
connect and SYN-ACK, a flow's end and TIME_WAIT (`NatCore`). In Cython, called from Cython,
because a short connection runs this code a dozen times and in Python it cost more user
CPU per connection than pasta spends in total: fields are C fields, the parsed segment's
(`net.packet.Packet`), the frame builder's and the host socket's methods are C calls. What is
not per segment or per connection (policy, failures, forwards, stats) stays in
`pyhv.net.tcpnat` and `pyhv.net.stack`, subclasses of NatCore and StackCore.

pyhv plays the guest's peer. Sequence numbers are kept unwrapped (64-bit); the wire
carries them mod 2**32. Flow control is tied to the host socket: the window offered to the
guest is `tcp_rcv_buffer` minus what the host socket has not taken yet (its write backlog)
and out-of-order data held; data from the host is read straight into `sbuf` and waits
there until the guest acknowledges it; the host socket stops being read while
`tcp_snd_buffer` bytes wait. So no queue grows without bound. A new flow allocates no
buffer until the host sends: its first read lands in a buffer shared by all flows and is
copied out at its own size. Segment building is in `hvcore.net.builder`, reassembly in
`hvcore.net.reassembly`.

RST and SYN from the guest follow RFC 5961: a RST resets the flow only when its sequence
number is exactly rcv_nxt; one elsewhere in the window, or a SYN, gets a challenge ACK.
"""

import logging
import random
from collections import deque

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from libc.errno cimport EINPROGRESS, errno
from libc.stdint cimport uint64_t
from libc.string cimport memcpy, memmove, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, itimerspec, timespec
from posix.unistd cimport close, read

from hvcore.includes.timerfd cimport (TFD_CLOEXEC, TFD_NONBLOCK, TFD_TIMER_ABSTIME,
                                      timerfd_create, timerfd_settime)
from hvcore.net.builder cimport Builder
from hvcore.net.ports cimport FrameFd
from hvcore.net.packet cimport Packet, parse
from hvcore.net.hostsock cimport HostSocket, Poller
from hvcore.net.hostsock import connect_tcp, tcp_socket
from hvcore.net.counts import Counts
from hvcore.net.reassembly import Reassembly

log = logging.getLogger(__name__)

DEF F_FIN = 0x01
DEF F_SYN = 0x02
DEF F_RST = 0x04
DEF F_PSH = 0x08
DEF F_ACK = 0x10

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
WAIT_STEP = 0.1                 # TIME_WAIT expiry runs at most this often

cdef enum:
    S_CONNECTING, S_SYN_SENT, S_SYN_RCVD, S_ESTABLISHED, S_CLOSE_WAIT, S_FIN_WAIT_1,
    S_FIN_WAIT_2, S_CLOSING, S_LAST_ACK, S_TIME_WAIT, S_CLOSED

DEF C_WSCALE = 7
DEF C_MAX_RETRIES = 8
DEF C_READ_CHUNK = 256 << 10
DEF C_MIN_ROOM = 16 << 10
DEF C_DELACK_BYTES = 1024
DEF C_DELACK_NS = 1000000       # DELACK
DEF C_DEFER_NS = 10000000       # deferred work runs at the latest this much later
DEF C_SPARE_SOCKETS = 8           # sockets made ahead for SYNs to come
DEF C_SCATTER_MIN = 2048         # smaller payloads are copied into the frame (no view)
DEF C_MIN_RTO = 0.2
DEF C_INIT_RTO = 1.0
DEF C_MAX_RTO = 30.0
DEF C_M32 = 0xFFFFFFFF


cdef inline long long _unwrap(long long value, long long ref) noexcept:
    cdef long long d = (value - ref) & C_M32
    return ref + d - (1LL << 32) if d >= (1LL << 31) else ref + d


def unwrap(long long value, long long ref) -> int:
    """The unwrapped sequence number nearest `ref` whose low 32 bits are `value`."""
    return _unwrap(value, ref)


cdef inline long long _min(long long a, long long b) noexcept:
    return a if a < b else b


cdef inline long long _max(long long a, long long b) noexcept:
    return a if a > b else b


cdef class TcpConn:
    cdef public object loop, counters, key
    cdef public Builder builder
    cdef public NatCore nat
    cdef public StackCore stack
    cdef public long long rcv_cap, snd_cap
    cdef public long long guest, gport, peer, pport
    cdef public int state
    cdef public long long iss, snd_una, snd_nxt, snd_wnd
    cdef public int snd_wscale, rcv_wscale
    cdef public bytearray sbuf
    cdef public long long s_head, s_tail
    cdef public bint fin_queued
    cdef public object fin_seq          # int or None
    cdef public long long irs, rcv_nxt, rcv_adv
    cdef public object rcv_fin          # the guest's FIN, seen ahead of a gap (or None)
    cdef public object reasm
    cdef public long long mss
    cdef public HostSocket host
    cdef public bint host_paused, into_scratch
    cdef public object connect_dest, connect_timer
    cdef public double rto
    cdef public object rto_deadline     # float or None
    cdef public object rto_handle
    cdef public bint rto_pending
    cdef public int retries, dupacks
    cdef public object rtt_seq          # int or None
    cdef public double rtt_time
    cdef public object srtt             # float or None
    cdef public double rttvar
    cdef public long long last_ack, last_wnd
    cdef public double seen
    cdef public long long bytes_to_host, bytes_to_guest
    cdef public object syn_head, on_close
    cdef object __weakref__

    def __init__(self, NatCore nat, guest: int, gport: int, peer: int, pport: int):
        stack = nat.stack
        self.nat, self.stack = nat, stack
        self.builder = stack.builder
        self.loop = stack.loop
        self.counters = stack.counters
        self.rcv_cap, self.snd_cap = stack.rcv_buffer, stack.snd_buffer
        self.key = (guest, gport, peer, pport)
        self.guest, self.gport, self.peer, self.pport = guest, gport, peer, pport
        self.state = S_CONNECTING
        self.iss = random.getrandbits(32)
        self.snd_una = self.snd_nxt = self.iss
        self.sbuf = bytearray()          # host data from snd_una on: sbuf[s_head:s_tail]
        self.fin_seq = None
        self.rcv_fin = None
        self.mss = 536
        self.rto = C_INIT_RTO
        self.last_ack = self.last_wnd = -1
        self.seen = self.loop.time()
        self.syn_head = b""

    # ---- frames to the guest

    cdef inline long long _wnd(self):
        cdef long long buffered = len(self.host.wbuf) if self.host is not None else 0
        cdef long long held = self.reasm.pending if self.reasm is not None else 0
        return _max(0, self.rcv_cap - buffered - held)

    cdef inline long long _wnd_field(self):
        return _min(self._wnd() >> self.rcv_wscale, 0xFFFF)

    cdef _sent_ack(self, long long wnd_field):
        cdef StackCore stack = self.stack
        if stack.delayed and self in stack.delayed:
            stack.ack_sent(self)
        self.last_ack, self.last_wnd = self.rcv_nxt, wnd_field
        cdef long long edge = self.rcv_nxt + (wnd_field << self.rcv_wscale)
        if edge > self.rcv_adv:
            self.rcv_adv = edge

    cdef _segment(self, int flags, long long seq=-1, int mss=0, int wscale=-1):
        cdef long long wnd = self._wnd_field() if not flags & F_SYN else _min(self._wnd(),
                                                                              0xFFFF)
        if seq < 0:
            seq = self.snd_nxt
        self.stack.send([self.builder.tcp(self.peer, self.pport, self.guest, self.gport,
                                          seq & C_M32, self.rcv_nxt & C_M32, flags, wnd, None,
                                          mss, wscale)])
        if flags & F_ACK:
            self._sent_ack(wnd if not flags & F_SYN else wnd >> self.rcv_wscale)

    cpdef flush_ack(self):
        """Called once per batch of guest frames: one ACK for all of them, if owed. Less
        than DELACK_BYTES of new data (a request) is ACKed DELACK later, so the host's
        answer, if it comes by then, carries the ACK (one frame less per exchange) --
        once the flow has answered before (request/response: Linux's "pingpong" mode).
        A flow's first request is ACKed at once, as Linux's quick-ACK mode does at the
        start of a connection: a short connection then needs no timer at all."""
        if self.state == S_CLOSED or self.state <= S_SYN_RCVD:
            return
        cdef long long owed = self.rcv_nxt - self.last_ack
        if owed and owed < C_DELACK_BYTES and owed < self.mss and \
                self.state == S_ESTABLISHED and self.bytes_to_guest:
            self.stack.delay_ack(self)
        elif owed or self._wnd_field() > self.last_wnd:
            self._segment(F_ACK)

    def delayed_ack(self) -> None:
        """DELACK has passed since data arrived: the ACK goes now, if still owed."""
        if self.state != S_CLOSED and self.state > S_SYN_RCVD and \
                self.rcv_nxt != self.last_ack:
            self._segment(F_ACK)

    def window_update(self) -> None:
        if self.state != S_CLOSED and self.state > S_SYN_RCVD and \
                self._wnd_field() > self.last_wnd:
            self._segment(F_ACK)

    def send_reset(self) -> None:
        self.stack.send([self.builder.tcp(self.peer, self.pport, self.guest, self.gport,
                                          self.snd_nxt & C_M32, self.rcv_nxt & C_M32,
                                          F_RST | F_ACK, 0)])

    def send_synack(self) -> None:
        self.state = S_SYN_RCVD
        self._segment(F_SYN | F_ACK, self.iss, self.stack.mtu - 40,
                      C_WSCALE if self.rcv_wscale else -1)
        self.snd_nxt = self.iss + 1
        self._arm(False)

    def send_syn(self) -> None:
        """Open the flow from our side (a port forward)."""
        self.state = S_SYN_SENT
        self.rcv_wscale = C_WSCALE
        self._segment(F_SYN, self.iss, self.stack.mtu - 40, C_WSCALE)
        self.snd_nxt = self.iss + 1
        self._arm(False)

    def host_read_done(self) -> None:
        """The host socket's reads of this event are done: what they brought (data and
        EOF read together: a short reply and its FIN in one segment) goes out now."""
        if self.s_tail != self.s_head or self.fin_queued and self.fin_seq is None:
            self._output()

    cdef _output(self):
        """Send what the guest's window allows, with our FIN once everything is sent."""
        if self.state != S_ESTABLISHED and self.state != S_CLOSE_WAIT:
            return
        cdef long long data_end = self.snd_una + self.s_tail - self.s_head
        cdef long long wnd_end = self.snd_una + self.snd_wnd
        cdef long long end = _min(wnd_end, data_end), wnd
        # our FIN takes a sequence number of the window too (as Linux's tcp_snd_wnd_test):
        # Linux >= 6.17 drops a whole segment whose FIN lies beyond the offered window
        cdef bint fin = self.fin_queued and self.fin_seq is None and data_end < wnd_end
        if end > self.snd_nxt:
            wnd = self._wnd_field()
            frames = self.builder.tcp_data(
                self.peer, self.pport, self.guest, self.gport, self.snd_nxt & C_M32,
                self.rcv_nxt & C_M32, wnd, self.sbuf,
                self.s_head + self.snd_nxt - self.snd_una, end - self.snd_nxt, self.mss,
                F_ACK | F_PSH | (F_FIN if fin else 0), end - self.snd_nxt >= C_SCATTER_MIN)
            self.stack.send(frames)
            self.bytes_to_guest += end - self.snd_nxt
            if self.rtt_seq is None:
                self.rtt_seq, self.rtt_time = end, self.loop.time()
            self.snd_nxt = end
            self._sent_ack(wnd)
            self._arm(True)
            if fin:
                self._fin_sent(False)
        elif fin and self.snd_nxt == data_end:
            self._fin_sent(True)
        elif self.snd_wnd == 0 and self.snd_nxt == self.snd_una and (
                data_end > self.snd_nxt or self.fin_queued and self.fin_seq is None):
            self._arm(True)                    # persist timer: probe the zero window

    cdef _fin_sent(self, bint segment):
        self.fin_seq = self.snd_nxt
        if segment:
            self._segment(F_FIN | F_ACK)
        self.snd_nxt += 1
        self.state = S_FIN_WAIT_1 if self.state == S_ESTABLISHED else S_LAST_ACK
        self._arm(True)

    # ---- timers

    cdef _arm(self, bint keep):
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
                self.state != S_CLOSED:
            self.rto_handle = self.loop.call_at(self.rto_deadline, self._timer)

    def _timer(self) -> None:
        self.rto_handle = None
        if self.rto_deadline is None or self.state == S_CLOSED:
            return
        if self.loop.time() < self.rto_deadline:
            self.rto_handle = self.loop.call_at(self.rto_deadline, self._timer)
            return
        self.rto_deadline = None
        self.retries += 1
        if self.retries > C_MAX_RETRIES:
            self.counters["tcp aborted: retransmission limit"] += 1
            self.abort()
            return
        self.rto = min(self.rto * 2, C_MAX_RTO)
        self.rtt_seq = None                    # Karn: no RTT samples from retransmissions
        self.counters["tcp retransmission timeouts"] += 1
        cdef bint sending = self.state == S_ESTABLISHED or self.state == S_CLOSE_WAIT
        if self.state == S_SYN_RCVD:
            self.send_synack()
        elif self.state == S_SYN_SENT:
            self.send_syn()
        elif self.snd_nxt > self.snd_una:
            self._retransmit()
            self._arm(False)
        elif self.snd_una + self.s_tail - self.s_head > self.snd_nxt and sending:
            self._send_data(self.snd_nxt, 1)     # zero-window probe: one new byte
            self.snd_nxt += 1
            self._arm(False)
        elif self.fin_queued and self.fin_seq is None and sending:
            self._fin_sent(True)               # all data acknowledged, window still 0:
                                               # the FIN itself probes (then retransmits)

    cdef _send_data(self, long long seq, long long n):
        self.stack.send(self.builder.tcp_data(
            self.peer, self.pport, self.guest, self.gport, seq & C_M32, self.rcv_nxt & C_M32,
            self._wnd_field(), self.sbuf, self.s_head + seq - self.snd_una, n, self.mss,
            F_ACK | F_PSH, True))

    cdef _retransmit(self):
        cdef long long inflight = _min(self.snd_nxt - self.snd_una, self.s_tail - self.s_head)
        if inflight > 0:
            self._send_data(self.snd_una, _min(self.mss, inflight))
        elif self.fin_seq is not None and self.snd_una <= self.fin_seq:
            self._segment(F_FIN | F_ACK, self.fin_seq)

    # ---- segments from the guest

    def accept_syn(self, Packet pkt) -> None:
        """Take the guest's SYN options (before the host connect completes)."""
        self.irs = pkt.seq
        self.rcv_nxt = self.rcv_adv = pkt.seq + 1
        self.mss = _max(64, _min(pkt.mss if pkt.mss else 536, self.stack.mtu - 40))
        if pkt.wscale >= 0:
            self.snd_wscale, self.rcv_wscale = pkt.wscale, C_WSCALE
        self.snd_wnd = pkt.window

    cpdef segment(self, Packet pkt):
        self.seen = self.loop.time()
        cdef int flags = pkt.flags, state = self.state
        cdef long long seq, ack, wnd
        if state == S_SYN_SENT:
            self._syn_sent(pkt)
            return
        if flags & F_RST:
            seq = _unwrap(pkt.seq, self.rcv_nxt)
            if seq == self.rcv_nxt:
                self.counters["tcp reset by guest"] += 1
                self._abort_host()
                self.finish()
            elif state != S_CONNECTING and self.rcv_nxt < seq < _max(self.rcv_adv,
                                                                     self.rcv_nxt + 1):
                self.counters["tcp challenge acks"] += 1
                self._segment(F_ACK)           # RFC 5961 3.2: a real peer answers with
            return                             # a RST at exactly rcv_nxt
        if flags & F_SYN:
            if state == S_SYN_RCVD and pkt.seq == self.irs:
                self.send_synack()
            elif state != S_CONNECTING:
                self._segment(F_ACK)           # challenge ACK (RFC 5961)
            return
        if state == S_CONNECTING or not flags & F_ACK:
            return
        ack = _unwrap(pkt.ack, self.snd_una)
        if state == S_SYN_RCVD:
            if ack != self.iss + 1:
                self.stack.send([self.builder.tcp(self.peer, self.pport, self.guest,
                                                  self.gport, pkt.ack, 0, F_RST, 0)])
                return
            self.state = S_ESTABLISHED
            self.retries = 0
        if ack > self.snd_nxt:
            self._segment(F_ACK)
            return
        wnd = (<long long>pkt.window) << self.snd_wscale
        if ack > self.snd_una:
            self._acked(ack)
        elif ack == self.snd_una and not pkt.payload_len and not flags & F_FIN and \
                self.snd_nxt > self.snd_una and wnd == self.snd_wnd:
            self.dupacks += 1
            if self.dupacks == 3:
                self.counters["tcp fast retransmits"] += 1
                self._retransmit()
        self.snd_wnd = wnd
        if self.state == S_CLOSED:
            return
        if pkt.payload_len or flags & F_FIN:
            self._receive(pkt)
        if self.s_tail != self.s_head or self.fin_queued and self.fin_seq is None:
            self._output()

    cdef _syn_sent(self, Packet pkt):
        cdef int flags = pkt.flags
        if flags & F_ACK and pkt.ack != (self.iss + 1) & C_M32:
            if not flags & F_RST:
                self.stack.send([self.builder.tcp(self.peer, self.pport, self.guest,
                                                  self.gport, pkt.ack, 0, F_RST, 0)])
            return
        if flags & F_RST:
            self.counters["tcp forward refused by guest"] += 1
            self._abort_host()
            self.finish()
            return
        if not (flags & F_SYN and flags & F_ACK):
            return
        self.irs = pkt.seq
        self.rcv_nxt = self.rcv_adv = pkt.seq + 1
        self.mss = _max(64, _min(pkt.mss if pkt.mss else 536, self.stack.mtu - 40))
        if pkt.wscale >= 0:
            self.snd_wscale = pkt.wscale
        else:
            self.rcv_wscale = 0
        self.snd_una = self.iss + 1
        self.snd_wnd = pkt.window
        self.state = S_ESTABLISHED
        self.retries = 0
        self.rto_deadline = None
        self._segment(F_ACK)
        if self.host is not None:
            self.host.start_reading()
        self._output()

    cdef _acked(self, long long ack):
        # Our SYN (iss) and our FIN (fin_seq) take a sequence number but no byte of sbuf:
        # the guest's ACK of the SYN may come when host data already waits in sbuf (the
        # host peer can write as soon as connect() completes, before our SYN-ACK).
        cdef long long first = _max(self.snd_una, self.iss + 1)
        cdef long long last = ack if self.fin_seq is None else _min(ack, self.fin_seq)
        cdef double now, sample, srtt
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
                srtt, self.rttvar = sample, sample / 2
            else:
                srtt = self.srtt
                self.rttvar = 0.75 * self.rttvar + 0.25 * abs(srtt - sample)
                srtt = 0.875 * srtt + 0.125 * sample
            self.srtt = srtt
            self.rto = min(C_MAX_RTO, max(C_MIN_RTO, srtt + 4 * self.rttvar))
            self.rtt_seq = None
        if ack == self.snd_nxt:                # all acknowledged: no timer left behind
            self.rto_deadline = None           # (a short connection would otherwise wake
            if self.rto_handle is not None:    # the loop once for nothing, INIT_RTO later)
                self.rto_handle.cancel()
                self.rto_handle = None
        else:
            self.rto_deadline = now + self.rto
        if self.host_paused and self.s_tail - self.s_head < self.snd_cap // 2 and \
                self.host is not None:
            self.host_paused = False
            self.host.start_reading()
        if self.fin_seq is not None and ack > self.fin_seq:
            if self.state == S_FIN_WAIT_1:
                self.state = S_FIN_WAIT_2
            elif self.state == S_CLOSING:
                self._time_wait(False)
            elif self.state == S_LAST_ACK:
                self.finish()

    cdef _receive(self, Packet pkt):
        cdef int state = self.state
        if state != S_ESTABLISHED and state != S_FIN_WAIT_1 and state != S_FIN_WAIT_2:
            self._segment(F_ACK)               # a retransmitted FIN: ACK it again
            return
        cdef long long seq = _unwrap(pkt.seq, self.rcv_nxt), n = pkt.payload_len
        cdef long long end = seq + n, take, ready
        cdef bint fin = pkt.flags & F_FIN
        cdef bytes ready_bytes
        counters = self.counters
        if n:
            reasm = self.reasm
            if seq <= self.rcv_nxt and (reasm is None or not reasm.pending):
                if end < self.rcv_nxt or end == self.rcv_nxt and not fin:
                    counters["tcp duplicate segments"] += 1    # (old data with a FIN at
                    self._segment(F_ACK)                       # rcv_nxt: the FIN is new)
                    return
                take = _min(end, _max(self.rcv_adv, self.rcv_nxt))
                if take > self.rcv_nxt:
                    self._to_host_from(pkt, self.rcv_nxt - seq, take - self.rcv_nxt)
                    self.rcv_nxt = take
                if take < end:
                    counters["tcp dropped: beyond window"] += 1
                    self._segment(F_ACK)
                    return
            else:
                if end <= self.rcv_nxt or seq >= self.rcv_nxt + self.rcv_cap:
                    counters["tcp dropped: outside window"] += 1
                    self._segment(F_ACK)
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
                        ready_bytes = reasm.take()
                        self._to_host_bytes(ready_bytes, len(ready_bytes))
                        self.rcv_nxt = reasm.base
                self._segment(F_ACK)           # duplicate ACK: tells the guest what is missing
            self.stack.ack_pending.add(self)
        elif fin and self.rcv_nxt < seq < self.rcv_nxt + self.rcv_cap:
            self.rcv_fin = seq                 # a bare FIN ahead of a gap
            counters["tcp out-of-order segments"] += 1
            self._segment(F_ACK)
            return
        if fin and end == self.rcv_nxt or self.rcv_fin is not None and \
                self.rcv_fin == self.rcv_nxt:
            self.rcv_fin = None
            self.rcv_nxt += 1
            if self.host is not None and self.state != S_FIN_WAIT_2:
                self.host.write_eof()          # (from FIN_WAIT_2 the close sends our FIN)
            if self.state == S_ESTABLISHED:
                self.state = S_CLOSE_WAIT
            elif self.state == S_FIN_WAIT_1:
                self.state = S_CLOSING
            else:                              # the last segment of the flow: its ACK
                self._time_wait(True)          # and the host socket's close can wait a
                self.stack.defer(self.delayed_ack)   # moment (the guest already opens
                return                         # its next connection, whose SYN goes first)
            self._segment(F_ACK)

    cdef _to_host_from(self, Packet pkt, Py_ssize_t offset, Py_ssize_t n):
        """Payload bytes [offset, offset+n) of `pkt` to the host, straight from its frame."""
        cdef Py_buffer view
        PyObject_GetBuffer(pkt.frame, &view, PyBUF_SIMPLE)
        try:
            self._to_host_bytes(<const char *>view.buf + pkt.payload_offset + offset, n)
        finally:
            PyBuffer_Release(&view)

    cdef _to_host_bytes(self, const char *p, Py_ssize_t n):
        cdef HostSocket host = self.host
        if host is None or host.closing:
            self.counters["tcp dropped: host socket closed"] += 1
            return
        host.write_bytes(p, n)
        self.bytes_to_host += n
        self.stack.host_written = True

    # ---- host socket events

    @property
    def buffered(self) -> int:
        """Host bytes not yet acknowledged by the guest (sent or not)."""
        return self.s_tail - self.s_head

    def host_buffer(self):
        """Room for the next host read (at most READ_CHUNK, so sbuf holds at most snd_cap
        plus one read), after the data waiting in sbuf; with too little room there, the
        buffer shared by all flows (host_data then moves the bytes into sbuf). So a flow
        allocates nothing until its host sends, then a buffer of the size it read, and
        an EOF read costs no buffer at all."""
        if len(self.sbuf) - self.s_tail < C_MIN_ROOM:
            self.into_scratch = True
            return self.nat.scratch
        return memoryview(self.sbuf)[self.s_tail:self.s_tail + C_READ_CHUNK]

    cdef _take_scratch(self, long long nbytes):
        """Move `nbytes` read into the shared buffer to the end of sbuf. Small amounts get
        a bytearray of their size; more get room for further reads (one READ_CHUNK, or
        double the old size) so the next reads go straight to sbuf; at the size limit the
        waiting bytes move to the front instead. A new bytearray replaces a full one
        (never resized: the last view handed out may still exist)."""
        cdef long long n = self.s_tail - self.s_head
        cdef long long need = n + nbytes, size
        cdef long long cur = len(self.sbuf)
        cdef bytearray new
        size = need if need < C_MIN_ROOM else _max(need, _min(
            2 * self.snd_cap + C_READ_CHUNK, _max(need + C_READ_CHUNK, 2 * cur)))
        if size <= cur:                                  # same buffer: move to the front
            memmove(PyByteArray_AS_STRING(self.sbuf), PyByteArray_AS_STRING(self.sbuf)
                    + self.s_head, n)
        else:
            new = PyByteArray_FromStringAndSize(NULL, size)
            if n:
                memcpy(PyByteArray_AS_STRING(new), PyByteArray_AS_STRING(self.sbuf)
                       + self.s_head, n)
            self.sbuf = new
        memcpy(PyByteArray_AS_STRING(self.sbuf) + n, PyByteArray_AS_STRING(self.nat.scratch_buf),
               nbytes)
        self.s_head, self.s_tail = 0, need

    def release_buffer(self) -> None:
        """Drop an idle flow's empty send buffer (the sweeper calls this)."""
        if self.s_tail == self.s_head and len(self.sbuf) > C_READ_CHUNK:
            self.sbuf = bytearray()
            self.s_head = self.s_tail = 0

    def host_data(self, long long nbytes) -> None:
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
        if self.state == S_CLOSED or self.state == S_TIME_WAIT:
            return
        self.counters["tcp reset by host"] += 1
        self.abort()

    # ---- ends

    cdef _abort_host(self):
        host, self.host = self.host, None
        if host is not None:
            host.abort()                       # close with RST, as the guest did

    def abort(self) -> None:
        """Reset both sides (host failure, idle timeout, retransmission limit)."""
        if self.state != S_CONNECTING and self.state != S_SYN_SENT and \
                self.state != S_CLOSED and self.state != S_TIME_WAIT:
            self.send_reset()
        self._abort_host()
        self.finish()

    cdef _time_wait(self, bint lazy):
        self.state = S_TIME_WAIT
        self.rto_deadline = None
        if self.host is not None:
            if lazy:
                self.stack.defer((<object>self.host).close)
            else:
                self.host.close()
        self.nat.time_wait(self)

    def finish(self) -> None:
        if self.state == S_CLOSED:
            return
        self.state = S_CLOSED
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


# ---- a batch of guest frames

DEF SYN_MASK = F_SYN | F_ACK | F_RST | F_FIN
DEF K_IPV4 = 2


cdef inline bint _is_syn(Packet p) noexcept:
    return p.kind == K_IPV4 and p.proto == 6 and p.flags & SYN_MASK == F_SYN


cpdef bint reuses_pair(TcpConn conn, Packet pkt):
    """Whether `pkt` ends `conn` and starts a new connection on the same address pair: a
    bare SYN for a flow in TIME_WAIT with a sequence number past what the flow received
    (as Linux lets a TIME_WAIT pair be reused). Anything else for a known flow is the
    flow's (a late ACK, FIN or RST, an old SYN). The one place this is decided."""
    return conn.state == S_TIME_WAIT and pkt.flags & (F_SYN | F_ACK | F_RST) == F_SYN and \
        _unwrap(pkt.seq, conn.rcv_nxt) > conn.rcv_nxt


cpdef list syns_first(list pkts):
    """The batch with new connections' SYNs moved to the front: a guest that closes one
    connection and opens the next sends FIN and SYN together, and the SYN-ACK (what the
    guest waits for) should not wait behind the old flow's close. Frames of one flow keep
    their order: when a SYN shares its flow with another frame of the batch, nothing
    moves."""
    cdef Packet p
    cdef Py_ssize_t i, n = len(pkts)
    for i in range(1, n):               # (most batches have none after the first frame)
        if _is_syn(<Packet>pkts[i]):
            break
    else:
        return pkts
    cdef list syns = [], others = []
    for p in pkts:
        (syns if _is_syn(p) else others).append(p)
    if not syns or not others:
        return pkts
    keys = {(p.src, p.sport, p.dst, p.dport) for p in others if p.kind == K_IPV4}
    for p in syns:
        if (p.src, p.sport, p.dst, p.dport) in keys:
            return pkts
    return syns + others


cdef _dispatch(frames, bint vnet, builder, dict conns, syn, other, error):
    """Parse a batch of frames from the port and hand each out: a segment of a known flow
    (from the guest's known MAC) to its flow, a new connection's SYN to `syn(pkt, key)`
    (the flow table decides), anything else to `other(pkt)`. A failure costs its frame:
    `error()` is called from the except block (it counts and logs)."""
    cdef list pkts = [parse(f, vnet) for f in frames]
    cdef Packet pkt
    cdef TcpConn conn
    cdef uint64_t mac = builder.guest_mac
    if len(pkts) > 1:
        pkts = syns_first(pkts)
    for pkt in pkts:
        try:
            if pkt.kind == K_IPV4 and pkt.proto == 6 and pkt.ttl > 1 and pkt.mac_src == mac:
                key = (pkt.src, pkt.sport, pkt.dst, pkt.dport)
                c = conns.get(key)
                if c is None:
                    if pkt.flags & SYN_MASK == F_SYN:
                        syn(pkt, key)          # a new connection
                        continue
                else:
                    conn = <TcpConn>c
                    if not reuses_pair(conn, pkt):      # (a reused pair: the flow table's)
                        conn.segment(pkt)
                        continue
            other(pkt)
            mac = builder.guest_mac            # (ARP or IP may have taught a new MAC)
        except Exception:
            mac = builder.guest_mac
            error()


# ---- the stack's per-frame part

DEF BROADCAST_MAC = 0xFFFFFFFFFFFF
DEF HELD_MAX = 64                           # frames held until the guest's MAC is known


cdef class StackCore:
    """What the flows call per segment and the port per batch, as C calls: receiving a
    batch (dispatch, then one ACK per flow that owes one), sending, delayed ACKs and the
    work deferred with them. `pyhv.net.stack.Stack` is this plus everything that is not
    per segment (ARP, IP, ICMP, services, hold-until-MAC, stats); it sets the fields."""

    cdef public object cfg, port, pcap, counters, loop
    cdef public object dns_addr, dns_tcp_addr   # the built-in DNS server's (UDP, TCP)
    cdef long long gw, alias, net, netmask
    cdef public long long mtu, rcv_buffer, snd_buffer, max_flows, max_connecting
    cdef public long long max_connecting_per_dest
    cdef public double time_wait
    cdef int tfd                            # the timer (a timerfd): -1 until used, -2 closed
    cdef bint armed
    cdef long long armed_at                 # CLOCK_MONOTONIC ns it fires at
    cdef public Builder builder
    cdef public FrameFd io                  # the port's, when it has one (a TAP)
    cdef public object on_syn, on_other
    cdef public dict conns
    cdef public bint vnet, host_written
    cdef public set ack_pending, delayed     # flows owing an ACK: now / in DELACK
    cdef public list deferred                # work that can wait as long
    cdef public list held                    # frames waiting for the guest's MAC (hold)
    cdef public double last_arp
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        self.ack_pending, self.delayed, self.deferred = set(), set(), []
        self.counters = Counts()             # the core's; the Python stack reads them
        self.held = []
        self.last_arp = -1e9                 # (the first frame held asks at once)
        self.tfd = -1
        self.alias = -1

    def configure(self, cfg) -> None:
        """Copy what the flows read per segment or connection from `cfg` (a NetConfig)
        into C fields: the addresses `host_target` maps, MTU, buffers, limits."""
        self.gw, self.net, self.netmask = cfg.gw, cfg.net, cfg.netmask
        self.alias = -1 if cfg.alias is None else cfg.alias
        self.mtu, self.rcv_buffer, self.snd_buffer = cfg.mtu, cfg.tcp_rcv_buffer, \
            cfg.tcp_snd_buffer
        self.max_flows, self.max_connecting = cfg.max_tcp_flows, cfg.max_connecting
        self.max_connecting_per_dest = cfg.max_connecting_per_dest
        self.time_wait = cfg.time_wait

    cpdef host_target(self, long long dst, int port, str proto):
        """The host address (ip, port) a guest flow to (dst, port) becomes, or None to
        refuse it: the gateway's DNS port to the built-in DNS server, the host-loopback
        alias to 127.0.0.1, the subnet, multicast, 0/8 and 127/8 nowhere, anything else
        to itself."""
        if dst == self.gw:
            if port == 53 and self.dns_addr is not None:
                return self.dns_addr if proto == "udp" else self.dns_tcp_addr
            return None
        if dst == self.alias:
            return ("127.0.0.1", port)
        if dst & self.netmask == self.net or dst >> 28 >= 14 or dst >> 24 == 0 or \
                dst >> 24 == 127:
            return None
        return (f"{dst >> 24}.{(dst >> 16) & 255}.{(dst >> 8) & 255}.{dst & 255}", port)

    cdef _arm_later(self, long long delay_ns):
        """The timer fires within `delay_ns` from now (sooner if armed so already). A
        timerfd the loop watches: arming it is one syscall and no loop timer object; it
        is never disarmed early (a firing with nothing to do costs less than the
        syscall, which reprograms the CPU's timer when it is the next to expire)."""
        cdef itimerspec its
        cdef timespec now
        cdef long long at
        clock_gettime(CLOCK_MONOTONIC, &now)
        at = now.tv_sec * 1000000000LL + now.tv_nsec + delay_ns
        if self.armed and self.armed_at <= at or self.tfd == -2:
            return
        if self.tfd < 0:
            self.tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
            if self.tfd < 0:
                raise OSError(errno, "timerfd_create")
            self.loop.add_reader(self.tfd, self._alarm)
        memset(&its, 0, sizeof(its))
        its.it_value.tv_sec = at // 1000000000LL
        its.it_value.tv_nsec = at % 1000000000LL
        timerfd_settime(self.tfd, TFD_TIMER_ABSTIME, &its, NULL)
        self.armed, self.armed_at = True, at

    def _alarm(self) -> None:
        cdef uint64_t expirations
        if read(self.tfd, &expirations, 8) != 8:
            return                          # (re-armed after it expired: not yet)
        self.armed = False
        self._later()

    def close_timer(self) -> None:
        """The stack closes: the timer goes, and work deferred from now on (by the
        deferred work the close runs itself) runs with the close, not later."""
        if self.tfd >= 0:
            self.loop.remove_reader(self.tfd)
            close(self.tfd)
        self.tfd = -2
        self.armed = False

    def receive(self, frames) -> None:
        """A batch of frames from the port; ACKs owed are sent once at the end. A segment
        of a known TCP flow from the guest's known MAC goes to its flow directly."""
        cdef TcpConn conn
        if self.pcap is not None:
            self.pcap.write(frames, self.vnet)
        _dispatch(frames, self.vnet, self.builder, self.conns, self.on_syn, self.on_other,
                  self._frame_error)
        if self.ack_pending:
            pending, self.ack_pending = self.ack_pending, set()
            for c in pending:
                conn = <TcpConn>c
                conn.flush_ack()
        if self.host_written:               # a host now works on what we wrote: deferred
            self.host_written = False       # work runs while we wait for its answer
            if self.deferred:
                self._run_deferred()

    def _frame_error(self) -> None:
        """A bug must cost one frame, not the service (called in the except block)."""
        self._internal_error("on a frame (dropped)")

    cpdef send(self, list frames):
        if self.builder.guest_mac == BROADCAST_MAC:
            self.hold(frames)
            return
        if self.pcap is not None:
            self.pcap.write(frames, self.vnet)
        if self.io is not None:
            self.io.send(frames)
        else:
            self.port.send(frames)

    cpdef hold(self, list frames):
        """No frame from the guest yet, so no MAC to send to (a forward's SYN can come
        first): keep up to HELD_MAX frames (not ARP: the guest answers the request sent
        here, and its answer teaches the MAC), count the rest, and ask with ARP for the
        guest's address at most every 200 ms. `pyhv.net.stack.Stack.learn` sends them."""
        cdef Py_ssize_t room = HELD_MAX - len(self.held)
        cdef Py_ssize_t at = 12 + (10 if self.vnet else 0)
        cdef double now
        for f in frames[:max(room, 0)]:
            if (f[0] if type(f) is tuple else f)[at:at + 2] != b"\x08\x06":
                self.held.append(f)
        if len(frames) > room:
            self.counters["dropped: no guest MAC yet"] += len(frames) - max(room, 0)
        now = self.loop.time() if self.loop is not None else 0.0
        if now - self.last_arp > 0.2:
            self.last_arp = now
            self.port.send([self.builder.arp_request(self.cfg.guest, self.cfg.gw)])

    cpdef delay_ack(self, conn):
        """`conn` owes the guest an ACK in DELACK (one timer for all flows)."""
        self.delayed.add(conn)
        self._arm_later(C_DELACK_NS)

    cpdef defer(self, callback):
        """Run `callback` with the delayed ACKs (DELACK, or 10 ms when none are owed), or
        sooner once a batch of guest frames gave a host socket work (we wait for its
        answer then): work nobody waits for (a finished flow's last ACK, closing its
        host socket) leaves the path of the next connection's handshake."""
        self.deferred.append(callback)
        self._arm_later(C_DEFER_NS)

    cpdef ack_sent(self, conn):
        """`conn` sent its ACK with something else."""
        self.delayed.discard(conn)

    def _later(self) -> None:
        delayed, self.delayed = self.delayed, set()
        for conn in delayed:
            try:
                conn.delayed_ack()
            except Exception:
                self._internal_error("in deferred work")
        self._run_deferred()

    cpdef _run_deferred(self):
        """Each deferred call is guarded: a bug costs that call, not the ones after it."""
        deferred, self.deferred = self.deferred, []
        for callback in deferred:
            try:
                callback()
            except Exception:
                self._internal_error("in deferred work")

    def _internal_error(self, str where) -> None:
        """Count a bug caught in an except block; log the first one with its traceback."""
        self.counters["internal errors"] += 1
        if self.counters["internal errors"] == 1:
            log.exception(f"pyhv net: internal error {where}")


# ---- the flow table's per-connection part

cdef class NatCore:
    """What every connection runs in the flow table, as C calls: a guest SYN's host
    connect and SYN-ACK (`syn`), a flow's end (`remove`), TIME_WAIT and its expiry.
    `pyhv.net.tcpnat.TcpNat` is this plus the policy around it that is not per
    connection (connects in flight and their timeouts, failures, forwards, the idle
    sweep, stats); it sets the fields."""

    cdef public StackCore stack
    cdef public dict conns
    cdef public object per_dest, poller, wait_timer, scratch, waiting
    cdef bytearray scratch_buf              # first reads of new flows (`scratch` views it)
    cdef public long long connecting
    cdef readonly list spare                # sockets made ahead of the SYNs that take them
    cdef bint refilling
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        self.conns = {}
        self.waiting = deque()              # (deadline, flow) in TIME_WAIT, oldest first
        self.connecting = 0
        self.scratch_buf = PyByteArray_FromStringAndSize(NULL, C_READ_CHUNK)
        self.spare = []
        self.scratch = memoryview(self.scratch_buf)

    def syn(self, Packet pkt, key) -> None:
        """A guest SYN for no flow: connect on the host, then SYN-ACK (or RST/ICMP).
        The connect is non-blocking; to a loopback or otherwise fast peer it has
        completed when the call returns, so the SYN-ACK leaves at once."""
        cdef StackCore stack = self.stack
        cdef TcpConn conn
        target = stack.host_target(pkt.dst, pkt.dport, "tcp")
        if target is None:
            stack.counters["tcp refused: no such destination"] += 1
            self.reset_for(pkt)
            return
        dest = (pkt.dst, pkt.dport)
        if len(self.conns) >= stack.max_flows:
            stack.counters["tcp syn dropped: flow limit"] += 1
            return
        if self.connecting >= stack.max_connecting or \
                self.per_dest.get(dest, 0) >= stack.max_connecting_per_dest:
            stack.counters["tcp syn dropped: connects in flight"] += 1
            return                              # the guest retransmits its SYN later
        conn = TcpConn(self, pkt.src, pkt.sport, pkt.dst, pkt.dport)
        conn.accept_syn(pkt)
        self.conns[key] = conn
        fd, err = connect_tcp(target[0], target[1], self.spare.pop() if self.spare else -1)
        if err == 0:
            self.connected(conn, fd)
            if len(self.spare) < C_SPARE_SOCKETS // 2 and not self.refilling:
                self.refilling = True
                stack.defer(self.refill)
            return
        conn.syn_head = bytes(pkt.ip_datagram[:pkt.l4_offset - pkt.ip_offset + 8])
        if err == EINPROGRESS:
            self.connect_pending(conn, fd, dest)
        else:
            self.connect_failed(conn, err)

    cpdef reset_for(self, Packet pkt):
        """RST answering `pkt` (RFC 9293 3.10.7.1): a segment for no flow, a refused
        destination."""
        cdef long long seq, ack
        cdef int flags
        if pkt.flags & F_ACK:
            seq, ack, flags = pkt.ack, 0, F_RST
        else:
            seq, flags = 0, F_RST | F_ACK
            ack = (pkt.seq + pkt.payload_len + (1 if pkt.flags & F_SYN else 0)
                   + (1 if pkt.flags & F_FIN else 0)) & C_M32
        self.stack.send([self.stack.builder.tcp(pkt.dst, pkt.dport, pkt.src, pkt.sport, seq,
                                                ack, flags, 0)])

    def refill(self) -> None:
        """Make sockets for the next SYNs ahead of time (with the deferred work, off the
        path of a handshake): socket() is a good part of a loopback connect's cost. Stops
        quietly when descriptors run out (the SYN's own socket() then reports it)."""
        cdef int fd
        self.refilling = False
        while len(self.spare) < C_SPARE_SOCKETS:
            fd = tcp_socket()
            if fd < 0:
                break
            self.spare.append(fd)

    def close_spare(self) -> None:
        while self.spare:
            close(self.spare.pop())

    cpdef connected(self, TcpConn conn, int fd):
        """`conn`'s host connect succeeded: SYN-ACK to the guest (first: it is what the
        guest waits for), then the host socket joins the poller."""
        if conn.host is None:
            conn.send_synack()
            conn.host = HostSocket(self.poller, fd, conn, conn.rcv_cap)
            conn.host.register(True)
        else:
            conn.host.start_reading()
            conn.send_synack()
        self.stack.counters["tcp connections"] += 1

    cpdef remove(self, TcpConn conn):
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        if conn.connect_dest is not None:
            self.connect_ended(conn)
        if conn.on_close is not None:
            conn.on_close(conn)

    cpdef time_wait(self, TcpConn conn):
        """`conn` entered TIME_WAIT: it ends time_wait seconds from now (one FIFO and
        one timer for all flows: every flow waits the same time)."""
        loop = self.stack.loop
        self.waiting.append((loop.time() + self.stack.time_wait, conn))
        if self.wait_timer is None:
            self.wait_timer = loop.call_at(self.waiting[0][0], self._expire)

    def _expire(self) -> None:
        cdef TcpConn conn
        self.wait_timer = None
        waiting, loop = self.waiting, self.stack.loop
        now = loop.time()
        while waiting and waiting[0][0] <= now:
            conn = <TcpConn>waiting.popleft()[1]
            if conn.state == S_TIME_WAIT:
                conn.finish()
        if waiting:                             # (in steps of WAIT_STEP: one wakeup
            self.wait_timer = loop.call_at(     # ends many flows)
                max(waiting[0][0], now + WAIT_STEP), self._expire)
