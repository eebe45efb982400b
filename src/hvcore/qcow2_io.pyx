# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""qcow2 file access shared by the qcow2_* modules: the per-image state struct (qcow2_io.pxd),
bounded reads (nothing past the end of the file), big-endian table reads, writes that track
the end of the file, the one pending data write that contiguous requests extend, and the
error state that nogil code fills and `q2_raise` turns into one Qcow2Error line."""

from cpython.ref cimport Py_XDECREF, Py_XINCREF
from libc.errno cimport EINTR, EINVAL, errno
from libc.stdlib cimport free, malloc
from posix.uio cimport pwritev
from posix.unistd cimport fdatasync, pread, pwrite

from hvcore.includes.endian cimport be64toh, htobe64
from hvcore.includes.sys cimport (adaptive_mutex_init, pthread_cond_broadcast,
                                  pthread_cond_destroy, pthread_cond_init, pthread_cond_wait,
                                  pthread_mutex_destroy, pthread_mutex_lock,
                                  pthread_mutex_unlock)

import os


# The error state of the calling thread: nogil code records the first error of a call
# (which image, a code and two numbers, or a Python exception from a callback) and
# q2_raise turns it into one exception on the same thread, so concurrent requests on one
# image never see each other's errors.
cdef extern from *:
    """
    typedef struct { void *q; int err; uint64_t ea, eb; PyObject *exc; } Q2Err;
    static __thread Q2Err q2_tls;
    #define q2_atomic_add(p, v) __atomic_add_fetch((p), (v), __ATOMIC_SEQ_CST)
    #define q2_atomic_load(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
    #define q2_atomic_store(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
    """
    ctypedef struct Q2Err:
        void *q
        int err
        uint64_t ea, eb
        PyObject *exc
    Q2Err q2_tls
    int q2_atomic_add(int *p, int v) nogil
    int q2_atomic_load(int *p) nogil
    void q2_atomic_store(int *p, int v) nogil


class Qcow2Error(OSError):
    """The image is malformed or an I/O call failed; the message names the cause."""

    def __init__(self, message, errno_=0):
        super().__init__(errno_, message)
        self.message = message

    def __str__(self):
        return self.message


# -- locking --------------------------------------------------------------------------------

cdef int q2_lock_init(Q2 *q) noexcept nogil:
    if adaptive_mutex_init(&q.lock) != 0:      # short critical sections between preads
        return -1
    if pthread_cond_init(&q.idle, NULL) != 0:
        pthread_mutex_destroy(&q.lock)
        return -1
    return 0


cdef void q2_lock_destroy(Q2 *q) noexcept nogil:
    pthread_cond_destroy(&q.idle)
    pthread_mutex_destroy(&q.lock)


cdef void q2_lock(Q2 *q) noexcept nogil:
    """Take the image lock. Never called holding the GIL: a thread that holds the lock
    may take the GIL (backing-file reads, the decompressor), never the other way round."""
    pthread_mutex_lock(&q.lock)


cdef void q2_unlock(Q2 *q) noexcept nogil:
    pthread_mutex_unlock(&q.lock)


cdef int q2_unlock_rc(Q2 *q, int rc) noexcept nogil:
    """Release the lock at the end of a locked operation returning `rc`; after an error
    drop the pending data write (its buffer belongs to the failed call)."""
    if rc < 0:
        q.pw_len = 0
        q.pw_niov = 0
    pthread_mutex_unlock(&q.lock)
    return rc


cdef void io_begin(Q2 *q) noexcept nogil:
    """Under the lock: count one batch of data I/O that will run outside it (waiting while
    a flush drains, so the mapping looked up next stays valid until io_end)."""
    while q2_atomic_load(&q.draining):
        pthread_cond_wait(&q.idle, &q.lock)
    q2_atomic_add(&q.inflight, 1)


cdef void io_end(Q2 *q) noexcept nogil:
    """Without the lock: that batch is done; wake a draining flush when it was the last."""
    if q2_atomic_add(&q.inflight, -1) == 0 and q2_atomic_load(&q.draining):
        pthread_mutex_lock(&q.lock)
        pthread_cond_broadcast(&q.idle)
        pthread_mutex_unlock(&q.lock)


cdef void q2_drain(Q2 *q) noexcept nogil:
    """Under the lock: wait until no data I/O runs outside it (before freed clusters become
    reusable), keeping new batches from starting meanwhile."""
    if q2_atomic_load(&q.inflight) == 0:
        return
    q2_atomic_store(&q.draining, 1)
    while q2_atomic_load(&q.inflight):
        pthread_cond_wait(&q.idle, &q.lock)
    q2_atomic_store(&q.draining, 0)
    pthread_cond_broadcast(&q.idle)


# -- errors ---------------------------------------------------------------------------------

cdef int q2_fail(Q2 *q, int code, uint64_t a, uint64_t b) noexcept nogil:
    """Record the first error of a call (code and two numbers for the message); -1."""
    cdef Q2Err *t = &q2_tls
    if t.err == 0 or t.q != <void*>q:
        t.q = <void*>q
        t.err = code
        t.ea = a
        t.eb = b
    return -1


cdef int q2_errno(Q2 *q) noexcept nogil:
    """errno of a recorded E_IO error of this thread on `q`, else 0."""
    if q2_tls.q == <void*>q and q2_tls.err == E_IO:
        return <int>q2_tls.ea
    return 0


cdef void q2_clear_err(Q2 *q) noexcept nogil:
    if q2_tls.q == <void*>q:
        q2_tls.err = 0


cdef int q2_store_exc(Q2 *q, object exc) noexcept:
    """Keep an exception raised by a Python callback (backing read, decompressor)."""
    cdef Q2Err *t = &q2_tls
    Py_XDECREF(t.exc)
    Py_XINCREF(<PyObject*>exc)
    t.exc = <PyObject*>exc
    return q2_fail(q, E_CALLBACK, 0, 0)


cdef int q2_raise(Q2 *q, int rc) except -1:
    """Raise the error this thread recorded on `q` (if `rc` < 0 or one was recorded)."""
    cdef Q2Err *t = &q2_tls
    cdef bint mine = t.q == <void*>q and t.err != 0
    if rc >= 0 and not mine:
        return 0
    code, a, b = 0, 0, 0
    if mine:
        code, a, b = t.err, t.ea, t.eb
    exc = None
    if t.exc != NULL:
        exc = <object>t.exc
        Py_XDECREF(t.exc)
        t.exc = NULL
    t.err = 0
    t.q = NULL
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
        if rc == 0 or q2_errno(q) != EINVAL:
            return rc
        q2_clear_err(q)             # the device wants larger alignment: page cache
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


cdef int write_table(Q2 *q, const uint64_t *src, uint64_t n, uint64_t off) noexcept nogil:
    """Write n host-order entries big-endian at off (read_table's twin: L1, refcount table)."""
    cdef uint64_t i
    cdef uint64_t *tmp = <uint64_t*>malloc(max(n, 1) * 8)
    cdef int rc
    if tmp == NULL:
        return q2_fail(q, E_NOMEM, 0, 0)
    for i in range(n):
        tmp[i] = htobe64(src[i])
    rc = pwrite_all(q, tmp, n * 8, off)
    free(tmp)
    return rc


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


cdef int pwrite_data(Q2 *q, const void *buf, uint64_t n, uint64_t off) noexcept nogil:
    """Write guest data into a mapped cluster outside the lock (through the O_DIRECT
    descriptor when aligned); the caller made sure it ends inside the file."""
    cdef iovec one
    one.iov_base = <void*>buf
    one.iov_len = n
    return write_iov(q, &one, 1, off)


cdef int write_iov(Q2 *q, iovec *iov, int cnt, uint64_t off) noexcept nogil:
    """pwritev all of `iov` (which it consumes) at `off`, resumed after short writes and
    EINTR; through the O_DIRECT descriptor when everything is aligned, falling back to the
    page cache when the device wants a larger alignment (EINVAL)."""
    cdef ssize_t r
    cdef int fd = q.fd, i
    if q.dfd >= 0 and aligned(off):
        fd = q.dfd
        for i in range(cnt):
            if not (aligned(<uint64_t>iov[i].iov_base) and aligned(iov[i].iov_len)):
                fd = q.fd
                break
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
    cdef uint64_t end = q.pw_host + q.pw_len
    cdef int cnt = q.pw_niov
    if q.pw_len == 0:
        return 0
    q.pw_len = 0
    q.pw_niov = 0
    if write_iov(q, q.pw_iov, cnt, q.pw_host) < 0:
        return -1
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
