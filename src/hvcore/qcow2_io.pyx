# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""qcow2 file access shared by the qcow2_* modules: the per-image state struct (qcow2_io.pxd),
bounded reads (nothing past the end of the file), big-endian table reads, writes that track
the end of the file, the one pending data write that contiguous requests extend, and the
error state that nogil code fills and `q2_raise` turns into one Qcow2Error line."""

from cpython.ref cimport Py_XDECREF, Py_XINCREF
from libc.errno cimport EINTR, errno
from posix.unistd cimport fdatasync, pread, pwrite

from hvcore.includes.endian cimport be64toh

import os


class Qcow2Error(OSError):
    """The image is malformed or an I/O call failed; the message names the cause."""

    def __init__(self, message, errno_=0):
        super().__init__(errno_, message)
        self.message = message

    def __str__(self):
        return self.message


cdef int q2_fail(Q2 *q, int code, uint64_t a, uint64_t b) noexcept nogil:
    """Record the first error of a call (code and two numbers for the message); -1."""
    if q.err == 0:
        q.err = code
        q.ea = a
        q.eb = b
    return -1


cdef int q2_store_exc(Q2 *q, object exc) noexcept:
    """Keep an exception raised by a Python callback (backing read, decompressor)."""
    Py_XDECREF(q.exc)
    Py_XINCREF(<PyObject*>exc)
    q.exc = <PyObject*>exc
    return q2_fail(q, E_CALLBACK, 0, 0)


cdef int q2_raise(Q2 *q, int rc) except -1:
    """Raise the error recorded by nogil code (if `rc` < 0 or one was recorded)."""
    if rc >= 0 and q.err == 0:
        return 0
    code, a, b = q.err, q.ea, q.eb
    exc = None
    if q.exc != NULL:
        exc = <object>q.exc
        Py_XDECREF(q.exc)
        q.exc = NULL
    q.err = 0
    q.pw_len = 0
    if code == E_CALLBACK and exc is not None:
        raise exc
    msg = {
        E_IO: lambda: f"I/O error at offset {b:#x}: {os.strerror(a)}",
        E_EOF: lambda: f"read of {b} bytes at {a:#x} goes past the end of the file",
        E_L1_RANGE: lambda: f"guest offset {a:#x} is beyond the L1 table",
        E_L2_ALIGN: lambda: f"L2 table offset {b:#x} (L1 index {a}) is not cluster aligned",
        E_DATA_ALIGN: lambda: f"data cluster offset {b:#x} for guest offset {a:#x} is not "
                              "cluster aligned",
        E_META: lambda: f"refusing to write data into cluster at {a:#x}, which holds "
                        "metadata (corrupt L2 or refcount entry)",
        E_COMP_RANGE: lambda: f"compressed cluster descriptor {b:#x} points outside the "
                              "file",
        E_RB_ALIGN: lambda: f"refcount block offset {b:#x} (table index {a}) is not "
                            "cluster aligned",
        E_DECOMPRESS: lambda: f"compressed cluster {a:#x} decompresses to {b} bytes, "
                              "not one cluster",
        E_RC_OVERFLOW: lambda: f"refcount of cluster at {a:#x} would overflow",
        E_RC_UNDERFLOW: lambda: f"refcount of cluster at {a:#x} is already 0",
        E_BITMAP: lambda: f"invalid subcluster bitmap {b:#x} for guest offset {a:#x}",
        E_FULL: lambda: "the image would grow past the largest qcow2 offset (2^56)",
        E_NOMEM: lambda: "out of memory for qcow2 tables",
        E_RANGE: lambda: f"request at {a:#x}+{b:#x} is outside the disk",
    }.get(code, lambda: f"qcow2 internal error {code}")()
    raise Qcow2Error("qcow2: " + msg, a if code == E_IO else 0)


cdef int pread_exact(Q2 *q, void *buf, uint64_t n, uint64_t off) noexcept nogil:
    """Read exactly `n` bytes at `off`, refusing anything past the end of the file."""
    cdef ssize_t r
    cdef uint64_t done = 0
    if off > q.file_end or n > q.file_end - off:
        return q2_fail(q, E_EOF, off, n)
    while done < n:
        r = pread(q.fd, <uint8_t*>buf + done, n - done, off + done)
        if r < 0:
            if errno == EINTR:
                continue
            return q2_fail(q, E_IO, errno, off)
        if r == 0:
            return q2_fail(q, E_EOF, off, n)
        done += r
    return 0


cdef int read_table(Q2 *q, uint64_t *dst, uint64_t n, uint64_t off) noexcept nogil:
    """Read a table of `n` big-endian 64-bit entries into host order (bounded)."""
    cdef uint64_t i
    if pread_exact(q, dst, n * 8, off) < 0:
        return -1
    for i in range(n):
        dst[i] = be64toh(dst[i])
    return 0


cdef int pwrite_all(Q2 *q, const void *buf, uint64_t n, uint64_t off) noexcept nogil:
    cdef ssize_t r
    cdef uint64_t done = 0
    while done < n:
        r = pwrite(q.fd, <const uint8_t*>buf + done, n - done, off + done)
        if r < 0:
            if errno == EINTR:
                continue
            return q2_fail(q, E_IO, errno, off)
        done += r
    if off + n > q.file_end:
        q.file_end = off + n
    return 0


cdef int q2_sync(Q2 *q) noexcept nogil:
    """A flush barrier (none with cache=unsafe: the order of writes is kept anyway)."""
    if q.unsafe_cache:
        return 0
    if fdatasync(q.fd) < 0:
        return q2_fail(q, E_IO, errno, 0)
    return 0


cdef int flush_pw(Q2 *q) noexcept nogil:
    cdef int rc = 0
    if q.pw_len:
        rc = pwrite_all(q, q.pw_buf, q.pw_len, q.pw_host)
        q.pw_len = 0
    return rc


cdef int queue_pw(Q2 *q, uint64_t host, const uint8_t *buf, uint64_t n) noexcept nogil:
    """Write data at `host`, merged with the pending write when both are contiguous."""
    if q.pw_len and q.pw_host + q.pw_len == host and q.pw_buf + q.pw_len == buf:
        q.pw_len += n
        return 0
    if flush_pw(q) < 0:
        return -1
    q.pw_host = host
    q.pw_buf = buf
    q.pw_len = n
    return 0
