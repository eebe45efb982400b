# cython: language_level=3
"""BusyPoll's fields and C methods, declared here so the TAP port (hvcore.net.ports) and the
host-socket poller (hvcore.net.hostsock) call them in C around their event-loop callbacks (the
stream and datagram ports call them from Python)."""

cdef enum:
    MAX_FDS = 4


cdef class BusyPoll:
    cdef int fds[MAX_FDS]
    cdef int nfds
    cdef public long long max_ns, window_ns
    cdef long long slept_at                 # CLOCK_MONOTONIC ns a fruitless poll ended; 0: none
    cdef public long long polls, caught

    cpdef set_fd(self, int i, int fd)
    cpdef adapt(self, long long slept_ns)
    cpdef woke(self)
    cpdef bint spin(self)
