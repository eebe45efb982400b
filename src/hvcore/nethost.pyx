# cython: language_level=3
"""The host sockets of TCP flows (in Cython, as the flows are: a short connection calls
into this a dozen times), driven with plain non-blocking socket calls: no asyncio
Transport, Protocol or Task per flow, and no event-loop registration per socket either.

All flow sockets sit in one edge-triggered epoll set (`Poller`) whose fd the event loop
watches: a flow's socket costs one epoll_ctl when it opens and none after (closing the
socket removes it), where the loop's own add_reader/remove_reader would cost several
syscalls each time a flow starts, pauses or ends. Edge-triggered means a socket's readiness
is remembered here (`readable`) and its data read until a short read (or, once the peer's
FIN or an error is queued, until EOF), so pausing and resuming a flow's reads costs no
syscall at all.

Reads go straight into the flow's send buffer (`TcpConn.host_buffer` / `host_data`).
Writes go straight to the socket; only what the socket does not take at once waits in
`wbuf`, which the flow counts against the window it offers the guest, so it stays within
`tcp_rcv_buffer`. Failures reach the flow as `host_lost(exc)` from a callback of their own,
never from inside a call the flow is making."""

import logging
import os
import select
import socket
import struct

log = logging.getLogger(__name__)
LINGER_RST = struct.pack("ii", 1, 0)
EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP = (select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR,
                                         select.EPOLLHUP)
READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
ALL_EVENTS = READ_EVENTS | EPOLLOUT
END_EVENTS = select.EPOLLRDHUP | EPOLLHUP | EPOLLERR
MAX_EVENTS = 256
cdef unsigned int C_IN = select.EPOLLIN, C_OUT = select.EPOLLOUT, C_ERR = select.EPOLLERR
cdef unsigned int C_HUP = select.EPOLLHUP, C_END = END_EVENTS


cdef class Poller:
    """One epoll set for all flow sockets, watched by the event loop as one reader.
    Edge-triggered: an event not handled is not reported again, so a bug in one flow's
    handler costs that flow (reset), never the other events of the batch."""

    cdef public object loop, counters, ep
    cdef public dict socks

    def __init__(self, loop, counters=None):
        self.loop = loop
        self.counters = counters if counters is not None else {}
        self.ep = select.epoll()
        self.socks = {}
        loop.add_reader(self.ep.fileno(), self._ready)

    def add(self, HostSocket hs, unsigned int events) -> None:
        self.socks[hs.fd] = hs
        try:
            self.ep.register(hs.fd, events)
        except FileExistsError:                # an fd number reused before its old file
            self.ep.modify(hs.fd, events)      # left the set (closed elsewhere too)

    def modify(self, HostSocket hs, unsigned int events) -> None:
        self.ep.modify(hs.fd, events)

    def forget(self, HostSocket hs) -> None:
        """`hs` closes its socket now (which takes it out of the epoll set)."""
        if self.socks.get(hs.fd) is hs:
            del self.socks[hs.fd]

    def _ready(self) -> None:
        cdef dict socks = self.socks
        cdef HostSocket hs
        for fd, ev in self.ep.poll(0, MAX_EVENTS):
            hs = socks.get(fd)
            if hs is not None:                 # (events of a socket closed meanwhile: none)
                try:
                    hs.events(ev)
                except Exception:
                    self._internal_error(hs)

    cdef _internal_error(self, HostSocket hs):
        n = self.counters["internal errors"] = self.counters.get("internal errors", 0) + 1
        if n == 1:
            log.exception("pyhv net: internal error on a host socket event (flow reset)")
        conn = hs.conn
        hs.abort()
        if conn is not None:
            try:
                conn.abort()
            except Exception:
                log.exception("pyhv net: cannot reset the flow")

    def close(self) -> None:
        self.loop.remove_reader(self.ep.fileno())
        self.ep.close()


cdef class HostSocket:
    cdef public Poller poller
    cdef public object loop, sock, conn, on_connect
    cdef public int fd
    cdef public bytearray wbuf
    cdef public bint reading, readable, writing, out_armed, eof_pending, closing, blocked
    cdef public bint read_scheduled, ended, hangup
    cdef public Py_ssize_t high, low

    def __init__(self, Poller poller, sock, conn, Py_ssize_t limit):
        self.poller, self.loop = poller, poller.loop
        self.sock, self.fd, self.conn = sock, sock.fileno(), conn
        self.wbuf = bytearray()
        self.reading = self.readable = self.writing = self.out_armed = False
        self.eof_pending = self.closing = self.blocked = self.read_scheduled = False
        self.ended = False          # EOF or an error is queued behind the data: read on
        self.hangup = False         # the peer's FIN (no error) is: a short read ends it
        self.high, self.low = limit // 2, limit // 8    # window updates once drained to low
        self.on_connect = None

    def register(self, bint reading) -> None:
        """Join the poller; read from now on when `reading`."""
        self.reading = reading
        self.poller.add(self, READ_EVENTS)

    def await_connect(self, done) -> None:
        """Join the poller while a non-blocking connect runs: done() once it has ended
        (SO_ERROR tells how). Closing the socket first cancels the wait."""
        self.on_connect = done
        self.out_armed = True
        self.poller.add(self, ALL_EVENTS)

    @property
    def pending(self) -> int:
        """Bytes from the guest the host socket has not taken yet."""
        return len(self.wbuf)

    cpdef events(self, unsigned int ev):
        if self.on_connect is not None:
            if ev & (C_OUT | C_ERR | C_HUP):
                self.readable = (ev & C_IN) != 0
                done, self.on_connect = self.on_connect, None
                done()
            return
        if ev & C_ERR and not self.reading:  # a reset while we do not read (paused,
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)   # or after EOF)
            if err:
                self._failed(OSError(err, os.strerror(err)))
                return
        if ev & ~C_OUT:
            self.readable = True
            if ev & C_END:
                self.ended = True
                self.hangup = not ev & C_ERR
            if self.reading:
                self._read()
        if ev & C_OUT and self.writing:
            self._writable()

    # ---- reading

    def start_reading(self) -> None:
        """Read again (soon, from a callback of its own, if data is waiting)."""
        if self.reading or self.fd < 0 or self.closing:
            return
        self.reading = True
        if self.readable and not self.read_scheduled:
            self.read_scheduled = True
            self.loop.call_soon(self._read_soon)

    def stop_reading(self) -> None:
        self.reading = False

    def _read_soon(self) -> None:
        self.read_scheduled = False
        if self.reading:
            self._read()

    cdef _read(self):
        """Read until a short read (or EOF, or the flow pauses), then let the flow send."""
        cdef Py_ssize_t n
        conn = self.conn
        while self.reading and self.readable:
            buf = conn.host_buffer()
            try:
                n = self.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                self.readable = False
                break
            except OSError as e:
                self._failed(e)
                return
            if not n:                           # EOF: our half stays open (half-close)
                self.readable = self.reading = False
                conn.host_eof()
                break
            if n < len(buf):                    # a short read: nothing more for now,
                if self.hangup:                 # and after the peer's FIN, nothing more
                    self.readable = self.reading = False
                    conn.host_data(n)
                    conn.host_eof()
                    break
                if not self.ended:
                    self.readable = False
            conn.host_data(n)
        conn.host_read_done()

    # ---- writing

    def write(self, data) -> None:
        if self.closing:
            return
        if not self.writing:
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                self._close_now()
                self.loop.call_soon(self.conn.host_lost, e)
                return
            if n == len(data):
                return
            data = data[n:]
            self.writing = True
            if not self.out_armed:
                self.out_armed = True
                self.poller.modify(self, ALL_EVENTS)
        self.wbuf += data                       # (EPOLLOUT comes when room does)
        if len(self.wbuf) > self.high:
            self.blocked = True

    cdef _writable(self):
        try:
            n = self.sock.send(self.wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._failed(e)
            return
        del self.wbuf[:n]
        if not self.wbuf:
            self.writing = False
            if self.eof_pending:
                self._shutdown()
            if self.closing:
                self._close_now()
                return
        if self.blocked and len(self.wbuf) <= self.low:
            self.blocked = False
            if self.conn is not None:           # (None: closing, the flow is gone)
                self.conn.window_update()

    def write_eof(self) -> None:
        """Our half of the host connection ends once what waits is written."""
        if self.writing:
            self.eof_pending = True
        elif not self.closing:
            self._shutdown()

    cdef _shutdown(self):
        self.eof_pending = False
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # ---- ends

    cdef _failed(self, exc):
        conn = self.conn
        self._close_now()
        if conn is not None:
            conn.host_lost(exc)

    def close(self) -> None:
        """Graceful: stop reading; close once what waits is written."""
        if self.closing:
            return
        self.reading = False
        self.closing = True
        if not self.writing:
            self._close_now()
        else:
            self.conn = None                    # the flow is done with us

    def abort(self) -> None:
        """Close at once with RST (the guest reset its side, or the flow gave up)."""
        if self.fd >= 0:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            except OSError:
                pass
        self._close_now()

    cdef _close_now(self):
        self.closing = True
        self.reading = self.writing = False
        self.on_connect = None
        if self.fd < 0:
            return
        self.poller.forget(self)
        self.wbuf = bytearray()
        self.fd = -1
        self.sock.close()
