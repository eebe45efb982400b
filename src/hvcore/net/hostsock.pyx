# cython: language_level=3
"""The host sockets of TCP flows (in Cython, as the flows are: a short connection calls
into this a dozen times), driven with plain non-blocking libc socket calls on raw
descriptors: no Python socket object (its calls parse arguments, build address strings
and raise BlockingIOError at the end of every read), no asyncio Transport, Protocol or
Task per flow, and no event-loop registration per socket either.

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

from hvcore.net.counts import Counts

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_Resize
from libc.string cimport memcpy
from cpython.unicode cimport PyUnicode_AsUTF8
from libc.errno cimport EAGAIN, EEXIST, EINPROGRESS, EINTR, EINVAL, errno
from posix.unistd cimport close

from hvcore.includes.socket cimport (AF_INET, EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_MOD,
                                     IPPROTO_TCP, MSG_NOSIGNAL, SHUT_WR, SO_ERROR, SO_LINGER,
                                     SOCK_CLOEXEC, SOCK_NONBLOCK, SOCK_STREAM, SOL_SOCKET,
                                     TCP_NODELAY, connect, epoll_create1, epoll_ctl,
                                     epoll_event, epoll_wait, getpeername, getsockopt, htons,
                                     inet_pton, linger, recv, send, setsockopt, shutdown,
                                     sockaddr, sockaddr_in, socket, socklen_t)

log = logging.getLogger(__name__)
EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP = (select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR,
                                         select.EPOLLHUP)
READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
ALL_EVENTS = READ_EVENTS | EPOLLOUT
END_EVENTS = select.EPOLLRDHUP | EPOLLHUP | EPOLLERR
DEF C_MAX_EVENTS = 256                  # events taken per wakeup
cdef unsigned int C_IN = select.EPOLLIN, C_OUT = select.EPOLLOUT, C_ERR = select.EPOLLERR
cdef unsigned int C_HUP = select.EPOLLHUP, C_END = END_EVENTS
cdef unsigned int C_READ = READ_EVENTS, C_ALL = ALL_EVENTS


cdef inline object _oserror(int err):
    return OSError(err, os.strerror(err))


def tcp_socket() -> int:
    """A new non-blocking TCP socket with TCP_NODELAY set (guest segments go out as they
    come), or -errno."""
    cdef int one = 1
    cdef int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        return -errno
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
    return fd


def connect_tcp(str host, int port, int fd=-1) -> tuple:
    """A non-blocking TCP connect to the dotted IPv4 `host`, on a raw descriptor (no
    Python socket object: a short connection makes one per flow): `fd` if given (from
    `tcp_socket`, made ahead of time), else a new one. Returns (fd, err): err 0 when
    connected already (a loopback or otherwise fast peer has, by the time connect()
    returns: getpeername() tells), EINPROGRESS while it runs (watch fd for writability,
    then `so_error`), or the failure (fd is -1 then, nothing left open)."""
    cdef sockaddr_in sa
    cdef socklen_t n = sizeof(sa)
    cdef int err = 0
    sa.sin_family = AF_INET
    sa.sin_port = htons(port)
    if port < 0 or port > 0xFFFF or inet_pton(AF_INET, PyUnicode_AsUTF8(host),
                                               &sa.sin_addr) != 1:
        if fd >= 0:
            close(fd)
        return -1, EINVAL
    if fd < 0:
        fd = tcp_socket()
        if fd < 0:
            return -1, -fd
    if connect(fd, <sockaddr *>&sa, sizeof(sa)) < 0:
        err = errno
        if err == EINPROGRESS:
            if getpeername(fd, <sockaddr *>&sa, &n) == 0:
                err = 0
            else:
                err = _so_error(fd) or EINPROGRESS
    if err and err != EINPROGRESS:
        close(fd)
        return -1, err
    return fd, err


cdef inline int _so_error(int fd) noexcept:
    cdef int err = 0
    cdef socklen_t n = sizeof(err)
    if getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &n) < 0:
        return errno
    return err


cdef class Poller:
    """One epoll set for all flow sockets, watched by the event loop as one reader.
    Edge-triggered: an event not handled is not reported again, so a bug in one flow's
    handler costs that flow (reset), never the other events of the batch. Each socket's
    events carry its fd and a generation number, so an event queued for a socket closed
    meanwhile never reaches a new socket that got the same fd number. (Fields and C
    methods of both classes are declared in net.hostsock.pxd: flows call them in C.)"""

    def __init__(self, loop, counters=None):
        self.loop = loop
        self.counters = counters if counters is not None else Counts()
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise _oserror(errno)
        self.socks = {}
        self.gen = 0
        loop.add_reader(self.epfd, self._ready)

    cdef int _ctl(self, HostSocket hs, int op, unsigned int events) except -1:
        cdef epoll_event ev
        ev.events = events
        ev.data.u64 = (<unsigned long long>hs.gen << 32) | <unsigned int>hs.fd
        if epoll_ctl(self.epfd, op, hs.fd, &ev) < 0:
            if op == EPOLL_CTL_ADD and errno == EEXIST:    # an fd number reused before
                return self._ctl(hs, EPOLL_CTL_MOD, events)  # its old file left the set
            raise _oserror(errno)
        return 0

    cpdef add(self, HostSocket hs, unsigned int events):
        self.gen += 1
        hs.gen = self.gen
        self.socks[hs.fd] = hs
        self._ctl(hs, EPOLL_CTL_ADD, events)

    cpdef modify(self, HostSocket hs, unsigned int events):
        self._ctl(hs, EPOLL_CTL_MOD, events)

    cpdef forget(self, HostSocket hs):
        """`hs` closes its socket now (which takes it out of the epoll set)."""
        if self.socks.get(hs.fd) is hs:
            del self.socks[hs.fd]

    def _ready(self) -> None:
        """The epoll set has events (an event-loop reader callback): handle a batch, then
        busy-poll (`hvcore.net.busypoll`) when that is on."""
        if self.busy is not None:
            self.busy.woke()
        self._handle()
        if self.busy is not None:
            self.busy.spin()

    cdef _handle(self):
        cdef epoll_event events[C_MAX_EVENTS]
        cdef int n = epoll_wait(self.epfd, events, C_MAX_EVENTS, 0), i
        cdef dict socks = self.socks
        cdef HostSocket hs
        for i in range(n):
            obj = socks.get(<int>(events[i].data.u64 & 0xFFFFFFFF))
            if obj is None:                    # (events of a socket closed meanwhile)
                continue
            hs = <HostSocket>obj
            if hs.gen != <unsigned int>(events[i].data.u64 >> 32):
                continue                       # (... whose fd number a new one has now)
            try:
                hs.events(events[i].events)
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
        if self.epfd >= 0:
            self.loop.remove_reader(self.epfd)
            close(self.epfd)
            self.epfd = -1


cdef class HostSocket:
    """A flow's host socket, as a raw descriptor (`sock` may be given as a Python socket
    object, which is detached: the HostSocket owns and closes the fd)."""

    def __init__(self, Poller poller, sock, conn, Py_ssize_t limit):
        self.poller, self.loop = poller, poller.loop
        self.fd = sock if type(sock) is int else sock.detach()
        self.conn = conn
        self.wbuf = bytearray()
        self.reading = self.readable = self.writing = self.out_armed = False
        self.eof_pending = self.closing = self.blocked = self.read_scheduled = False
        self.ended = False          # EOF or an error is queued behind the data: read on
        self.hangup = False         # the peer's FIN (no error) is: a short read ends it
        self.high, self.low = limit // 2, limit // 8    # window updates once drained to low
        self.on_connect = None

    cpdef register(self, bint reading):
        """Join the poller; read from now on when `reading`."""
        self.reading = reading
        self.poller.add(self, C_READ)

    def await_connect(self, done) -> None:
        """Join the poller while a non-blocking connect runs: done() once it has ended
        (`so_error()` tells how). Closing the socket first cancels the wait."""
        self.on_connect = done
        self.out_armed = True
        self.poller.add(self, C_ALL)

    def so_error(self) -> int:
        """The socket's pending error (SO_ERROR, which reading clears), 0 for none."""
        return _so_error(self.fd) if self.fd >= 0 else 0

    @property
    def pending(self) -> int:
        """Bytes from the guest the host socket has not taken yet."""
        return len(self.wbuf)

    cpdef events(self, unsigned int ev):
        cdef int err
        if self.on_connect is not None:
            if ev & (C_OUT | C_ERR | C_HUP):
                self.readable = (ev & C_IN) != 0
                done, self.on_connect = self.on_connect, None
                done()
            return
        if ev & C_ERR and not self.reading:  # a reset while we do not read (paused,
            err = _so_error(self.fd)         # or after EOF)
            if err:
                self._failed(_oserror(err))
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

    cpdef start_reading(self):
        """Read again (soon, from a callback of its own, if data is waiting)."""
        if self.reading or self.fd < 0 or self.closing:
            return
        self.reading = True
        if self.readable and not self.read_scheduled:
            self.read_scheduled = True
            self.loop.call_soon(self._read_soon)

    cpdef stop_reading(self):
        self.reading = False

    def _read_soon(self) -> None:
        self.read_scheduled = False
        if self.reading:
            self._read()

    cdef _read(self):
        """Read until a short read (or EOF, or the flow pauses), then let the flow send."""
        cdef Py_buffer view
        cdef Py_ssize_t n, size
        cdef int err
        conn = self.conn
        while self.reading and self.readable:
            buf = conn.host_buffer()
            PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
            size = view.len
            n = recv(self.fd, view.buf, size, 0)
            err = errno
            PyBuffer_Release(&view)
            if n < 0:
                if err == EAGAIN or err == EINTR:
                    self.readable = False
                    break
                self._failed(_oserror(err))
                return
            if not n:                           # EOF: our half stays open (half-close)
                self.readable = self.reading = False
                conn.host_eof()
                break
            if n < size:                        # a short read: nothing more for now,
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

    cdef Py_ssize_t _send(self, const char *p, Py_ssize_t n) noexcept:
        """send() what it takes of p[:n]: bytes sent, 0 when the socket is full, -errno
        on a failure."""
        cdef Py_ssize_t sent = send(self.fd, p, n, MSG_NOSIGNAL)
        cdef int err
        if sent < 0:
            err = errno
            return 0 if err == EAGAIN or err == EINTR else -err
        return sent

    cpdef write(self, data):
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self.write_bytes(<const char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef write_bytes(self, const char *p, Py_ssize_t n):
        """Write p[:n] now; what the socket does not take waits in wbuf (EPOLLOUT tells
        when there is room)."""
        cdef Py_ssize_t sent = 0, old
        if self.closing:
            return
        if not self.writing:
            sent = self._send(p, n)
            if sent < 0:
                exc = _oserror(-sent)
                self._close_now()
                self.loop.call_soon(self.conn.host_lost, exc)
                return
            if sent == n:
                return
            self.writing = True
            if not self.out_armed:
                self.out_armed = True
                self.poller.modify(self, C_ALL)
        old = len(self.wbuf)
        PyByteArray_Resize(self.wbuf, old + n - sent)
        memcpy(PyByteArray_AS_STRING(self.wbuf) + old, p + sent, n - sent)
        if old + n - sent > self.high:
            self.blocked = True

    cdef _writable(self):
        cdef Py_ssize_t n = self._send(PyByteArray_AS_STRING(self.wbuf), len(self.wbuf))
        if n < 0:
            self._failed(_oserror(-n))
            return
        if not n:
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

    cpdef write_eof(self):
        """Our half of the host connection ends once what waits is written."""
        if self.writing:
            self.eof_pending = True
        elif not self.closing:
            self._shutdown()

    cdef _shutdown(self):
        self.eof_pending = False
        if self.fd >= 0:
            shutdown(self.fd, SHUT_WR)

    # ---- ends

    cdef _failed(self, exc):
        conn = self.conn
        self._close_now()
        if conn is not None:
            conn.host_lost(exc)

    cpdef close(self):
        """Graceful: stop reading; close once what waits is written."""
        if self.closing:
            return
        self.reading = False
        self.closing = True
        if not self.writing:
            self._close_now()
        else:
            self.conn = None                    # the flow is done with us

    cpdef abort(self):
        """Close at once with RST (the guest reset its side, or the flow gave up)."""
        cdef linger lg
        if self.fd >= 0:
            lg.l_onoff, lg.l_linger = 1, 0
            setsockopt(self.fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))
        self._close_now()

    cdef _close_now(self):
        self.closing = True
        self.reading = self.writing = False
        self.on_connect = None
        if self.fd < 0:
            return
        self.poller.forget(self)
        self.wbuf = bytearray()
        close(self.fd)
        self.fd = -1
