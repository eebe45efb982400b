# cython: language_level=3
"""Adaptive busy polling of the network's descriptors, as KVM polls a halted vCPU.

A short connection through the stack is a ping-pong: a frame from the guest, a host
socket's answer, the guest's next frame, each a few tens of microseconds after the last.
Sleeping in the event loop between them makes each of those arrive as a wake-up of a
sleeping thread; on a (virtual) machine whose other CPU is halted that wake-up is an
inter-processor interrupt, which costs the *sender* (the guest's kernel, the host
program) ~20 us with interrupts off and everyone ~40-60 us of latency. So after
handling an event the stack keeps polling its descriptors (its port's: a TAP device, a
stream or datagram socket; the host sockets' epoll set) for a while before the event
loop sleeps: the next frame is then found by the poll, and nobody has to wake anybody.

The window adapts like KVM's halt polling (Documentation/virt/kvm/halt-polling.rst):
it starts at 0; a sleep that ended within `max_ns` (polling longer would have caught
its event) grows it (10 us, then doubling, up to `max_ns`); a sleep longer than that
halves it (below 10 us: 0). An idle or slow stack so does not poll at all; a busy one
polls at most `max_ns` after each event. The GIL is released while polling.
"""

from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from hvcore.includes.sys cimport pollfd, poll, POLLIN

DEF GROW_START_NS = 10000


cdef inline long long _now() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec * 1000000000LL + t.tv_nsec


cdef class BusyPoll:
    """Polls `fds` (at most 4; -1 is an empty slot) for up to the adaptive window after
    each event."""

    def __init__(self, fds, long long max_ns):
        if not 0 < len(fds) <= MAX_FDS:
            raise ValueError(f"BusyPoll takes 1..{MAX_FDS} descriptors")
        if max_ns < 0:
            raise ValueError("BusyPoll: max_ns must not be negative")
        self.nfds = len(fds)
        for i, fd in enumerate(fds):
            self.fds[i] = fd
        self.max_ns, self.window_ns, self.slept_at = max_ns, 0, 0

    cpdef set_fd(self, int i, int fd):
        """Poll `fd` in slot `i` from now on (-1: nothing there, as poll(2) skips it): a
        port whose descriptor comes and goes (a stream peer connecting)."""
        if not 0 <= i < self.nfds:
            raise IndexError(f"BusyPoll has {self.nfds} slots, not {i + 1}")
        self.fds[i] = fd

    def descriptors(self) -> list:
        """The slots' descriptors (-1: empty)."""
        return [self.fds[i] for i in range(self.nfds)]

    def stats(self) -> dict:
        """For `pyhv net stats`: the cap, the window now, polls and those that found one."""
        return {"max us": self.max_ns // 1000, "window us": self.window_ns // 1000,
                "polls": self.polls, "caught": self.caught}

    cpdef adapt(self, long long slept_ns):
        """The loop slept `slept_ns` after a poll that found nothing: grow or shrink."""
        if slept_ns <= self.max_ns:
            if self.window_ns < GROW_START_NS:
                self.window_ns = GROW_START_NS
            else:
                self.window_ns *= 2
            if self.window_ns > self.max_ns:
                self.window_ns = self.max_ns
        else:
            self.window_ns //= 2
            if self.window_ns < GROW_START_NS:
                self.window_ns = 0

    cpdef woke(self):
        """An event-loop callback starts: learn from how long the loop slept, if it did."""
        if self.slept_at:
            self.adapt(_now() - self.slept_at)
            self.slept_at = 0

    cpdef bint spin(self):
        """A callback is done: poll for up to the window. True: a descriptor is ready
        (the loop finds it without sleeping); False: the loop may sleep."""
        cdef pollfd p[MAX_FDS]
        cdef int i, n = self.nfds, r = 0
        cdef long long end, now
        if self.window_ns <= 0:
            self.slept_at = _now()
            return False
        for i in range(n):
            p[i].fd, p[i].events = self.fds[i], POLLIN
        with nogil:
            now = _now()
            end = now + self.window_ns
            while True:
                for i in range(n):
                    p[i].revents = 0
                r = poll(p, n, 0)
                if r != 0:
                    break
                now = _now()
                if now >= end:
                    break
        self.polls += 1
        if r > 0:
            self.caught += 1
            return True
        self.slept_at = now
        return False
