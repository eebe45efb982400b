# cython: language_level=3
"""Poller's and HostSocket's fields and C methods, declared here so flows (hvcore.net.tcp)
call them in C."""

from hvcore.net.busypoll cimport BusyPoll


cdef class Poller:
    cdef public object loop, counters
    cdef public dict socks
    cdef public int epfd
    cdef unsigned int gen
    cdef public BusyPoll busy           # polls on after each batch of events (None: off)

    cdef int _ctl(self, HostSocket hs, int op, unsigned int events) except -1
    cpdef add(self, HostSocket hs, unsigned int events)
    cpdef modify(self, HostSocket hs, unsigned int events)
    cpdef forget(self, HostSocket hs)
    cdef _handle(self)
    cdef _internal_error(self, HostSocket hs)


cdef class HostSocket:
    cdef public Poller poller
    cdef public object loop, conn, on_connect
    cdef public int fd
    cdef public unsigned int gen
    cdef public bytearray wbuf
    cdef public bint reading, readable, writing, out_armed, eof_pending, closing, blocked
    cdef public bint read_scheduled, ended, hangup
    cdef public Py_ssize_t high, low

    cpdef register(self, bint reading)
    cpdef events(self, unsigned int ev)
    cpdef start_reading(self)
    cpdef stop_reading(self)
    cdef _read(self)
    cdef Py_ssize_t _send(self, const char *p, Py_ssize_t n) noexcept
    cpdef write(self, data)
    cdef write_bytes(self, const char *p, Py_ssize_t n)
    cdef _writable(self)
    cpdef write_eof(self)
    cdef _shutdown(self)
    cdef _failed(self, exc)
    cpdef close(self)
    cpdef abort(self)
    cdef _close_now(self)
