# cython: language_level=3
"""Frame I/O on a file descriptor that carries one frame per read/write (a TAP device):
a batch of reads or writes in one call, each syscall with the GIL released.

Python's os.read/os.write cost a call, an object and, at the end of every batch, a
BlockingIOError; a TAP port reads and writes a few frames per event-loop wakeup, so
here a batch is one call and "no more frames" is a return value, not an exception."""

from cpython.bytearray cimport (PyByteArray_AS_STRING, PyByteArray_FromStringAndSize,
                                 PyByteArray_Resize)
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.errno cimport errno, EAGAIN, EINTR
from posix.unistd cimport read, write
from posix.uio cimport iovec, writev

DEF MAX_PARTS = 8


DEF SMALL = 2048                                # frames up to this size are copied out


cdef class FrameFd:
    """The per-frame part of a port on such an fd (`pyhv.net.ports.FdPort`): reading a
    batch and handing it to `deliver`, writing frames, and the port's counters, as C
    calls with no Python frame in between (fields declared in net.ports.pxd)."""

    def __init__(self, int fd, int max_frames, Py_ssize_t max_size):
        self.fd, self.max_frames, self.max_size = fd, max_frames, max_size
        self.deliver = None
        self.spare = None

    def readable(self) -> None:
        """The fd is readable (an event-loop reader callback): read and deliver a batch,
        then busy-poll (`hvcore.net.busypoll`) when that is on."""
        if self.busy is not None:
            self.busy.woke()
        cdef list frames = self.read()
        if frames:
            self.frames_in += len(frames)
            self.deliver(frames)
        if self.busy is not None:
            self.busy.spin()

    cpdef list read(self):
        """Up to `max_frames` frames (bytearrays of at most `max_size` bytes), until the
        fd has no more (EAGAIN). Raises OSError only when the very first read fails
        otherwise. Each read lands in `spare` (a buffer of max_size kept between calls):
        a small frame is copied out at its size, a large one takes the buffer itself
        (shrunk in place), so neither small frames nor the final EAGAIN allocate a
        frame-sized buffer."""
        cdef list frames = []
        cdef bytearray buf
        cdef char *p
        cdef Py_ssize_t n, size = self.max_size
        cdef int err, fd = self.fd
        while len(frames) < self.max_frames:
            if self.spare is None:
                self.spare = PyByteArray_FromStringAndSize(NULL, size)
            buf = self.spare
            p = PyByteArray_AS_STRING(buf)
            with nogil:
                n = read(fd, p, size)
                err = errno
            if n < 0:
                if err == EINTR:
                    continue
                if err == EAGAIN or frames:
                    break
                raise OSError(err, f"reading frames from fd {fd}")
            if n <= SMALL:
                frames.append(PyByteArray_FromStringAndSize(p, n))
            else:
                PyByteArray_Resize(buf, n)      # shrinks in place (realloc)
                frames.append(buf)
                self.spare = None
        return frames

    cpdef send(self, frames):
        self.dropped += _write_frames(self.fd, frames)
        self.frames_out += len(frames)


cdef int _write_frames(int fd, frames) except -1:
    """Write each frame (a buffer, or a tuple of buffers making one frame) with one
    write/writev; returns how many could not be written (full queue, error): they are
    dropped, as a full NIC queue would."""
    cdef iovec iov[MAX_PARTS]
    cdef Py_buffer bufs[MAX_PARTS]
    cdef Py_ssize_t n
    cdef int dropped = 0, k, i, got
    for f in frames:
        if type(f) is tuple:
            k = len(<tuple>f)
            if k > MAX_PARTS:
                dropped += 1
                continue
            got = 0
            try:
                for i in range(k):
                    PyObject_GetBuffer((<tuple>f)[i], &bufs[i], PyBUF_SIMPLE)
                    got += 1
                    iov[i].iov_base = bufs[i].buf
                    iov[i].iov_len = bufs[i].len
                with nogil:
                    n = writev(fd, iov, k)
            finally:
                for i in range(got):
                    PyBuffer_Release(&bufs[i])
        else:
            PyObject_GetBuffer(f, &bufs[0], PyBUF_SIMPLE)
            try:
                if bufs[0].len == 0:
                    continue
                with nogil:
                    n = write(fd, bufs[0].buf, bufs[0].len)
            finally:
                PyBuffer_Release(&bufs[0])
        if n < 0:
            dropped += 1
    return dropped
