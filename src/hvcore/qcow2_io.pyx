# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""qcow2 file access shared by the qcow2_* modules: the per-image state struct (qcow2_io.pxd),
bounded reads (nothing past the end of the file), big-endian table reads, writes that track
the end of the file, the one pending data write that contiguous requests extend, and the
error state that nogil code fills and `q2_raise` turns into one Qcow2Error line."""

from cpython.ref cimport Py_XDECREF, Py_XINCREF
from libc.errno cimport EINTR, EINVAL, errno
from posix.uio cimport pwritev
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
    q.pw_niov = 0
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


cdef inline bint aligned(uint64_t v) noexcept nogil:
    return v % DIRECT_ALIGN == 0


cdef int pread_exact(Q2 *q, void *buf, uint64_t n, uint64_t off) noexcept nogil:
    """Read exactly `n` bytes at `off`, refusing anything past the end of the file."""
    return pread_fd(q, q.fd, buf, n, off)


cdef int pread_data(Q2 *q, void *buf, uint64_t n, uint64_t off) noexcept nogil:
    """pread_exact for guest data: through the O_DIRECT descriptor when there is one and
    the request is aligned (cache=none), else through the page cache."""
    cdef int rc
    if q.dfd >= 0 and aligned(n) and aligned(off) and aligned(<uint64_t>buf):
        rc = pread_fd(q, q.dfd, buf, n, off)
        if rc == 0 or q.err != E_IO or q.ea != EINVAL:
            return rc
        q.err = 0                   # the device wants larger alignment: page cache
    return pread_fd(q, q.fd, buf, n, off)


cdef int pread_fd(Q2 *q, int fd, void *buf, uint64_t n, uint64_t off) noexcept nogil:
    cdef ssize_t r
    cdef uint64_t done = 0
    if off > q.file_end or n > q.file_end - off:
        return q2_fail(q, E_EOF, off, n)
    while done < n:
        r = pread(fd, <uint8_t*>buf + done, n - done, off + done)
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
    """Issue the pending data write (one pwritev, resumed after a short write)."""
    cdef ssize_t r
    cdef iovec *iov = q.pw_iov
    cdef int cnt = q.pw_niov
    cdef uint64_t off = q.pw_host, end = q.pw_host + q.pw_len
    cdef int fd = q.fd, i
    if q.pw_len == 0:
        return 0
    if q.dfd >= 0 and aligned(off) and aligned(q.pw_len):
        fd = q.dfd
        for i in range(cnt):
            if not (aligned(<uint64_t>iov[i].iov_base) and aligned(iov[i].iov_len)):
                fd = q.fd
                break
    q.pw_len = 0
    q.pw_niov = 0
    while cnt:
        r = pwritev(fd, iov, cnt, off)
        if r < 0:
            if errno == EINTR:
                continue
            if errno == EINVAL and fd != q.fd:
                fd = q.fd           # the device wants larger alignment: page cache
                continue
            return q2_fail(q, E_IO, errno, off)
        off += r
        while cnt and <size_t>r >= iov[0].iov_len:
            r -= iov[0].iov_len
            iov += 1
            cnt -= 1
        if cnt:
            iov[0].iov_base = <uint8_t*>iov[0].iov_base + r
            iov[0].iov_len -= r
    if end > q.file_end:
        q.file_end = end
    return 0


cdef int queue_pw(Q2 *q, uint64_t host, const uint8_t *buf, uint64_t n) noexcept nogil:
    """Write data at `host` later, gathered with the pending write when the host offsets
    are contiguous (the buffers need not be); the buffer must stay valid until flush_pw."""
    cdef iovec *last
    if q.pw_len and q.pw_host + q.pw_len == host:
        last = &q.pw_iov[q.pw_niov - 1]
        if <const uint8_t*>last.iov_base + last.iov_len == buf:
            last.iov_len += n
            q.pw_len += n
            return 0
        if q.pw_niov < PW_IOV:
            q.pw_iov[q.pw_niov].iov_base = <void*>buf
            q.pw_iov[q.pw_niov].iov_len = n
            q.pw_niov += 1
            q.pw_len += n
            return 0
    if flush_pw(q) < 0:
        return -1
    q.pw_host = host
    q.pw_iov[0].iov_base = <void*>buf
    q.pw_iov[0].iov_len = n
    q.pw_niov = 1
    q.pw_len = n
    return 0
