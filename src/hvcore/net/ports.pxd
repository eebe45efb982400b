# cython: language_level=3
"""FrameFd's fields and methods, declared here so the stack (hvcore.net.tcp) sends frames
to a TAP port in C."""

from hvcore.net.busypoll cimport BusyPoll


cdef class FrameFd:
    cdef public int fd, max_frames
    cdef public Py_ssize_t max_size
    cdef public long long frames_in, frames_out, dropped
    cdef public object deliver
    cdef public BusyPoll busy           # polls on after each batch (None: off)
    cdef bytearray spare

    cpdef list read(self)
    cpdef send(self, frames)
