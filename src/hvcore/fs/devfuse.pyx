# cython: language_level=3
"""FUSE requests from a /dev/fuse descriptor, the first transport of the share's request
handler (`pyhv.share.devfuse` runs the readers): requests are read and answered in C
through the fast path (`hvcore.fs.fastpath`) without the GIL until one is for the Python
handler, which gets it back."""

from libc.errno cimport EAGAIN, EINTR, ENOENT, errno
from libc.stdint cimport uint8_t, uint32_t
from posix.unistd cimport read, write

from hvcore.fs.fastpath cimport FastPath
from hvcore.includes.fuse cimport (FUSE_ACCESS, FUSE_BATCH_FORGET, FUSE_FLUSH, FUSE_FORGET,
                                   FUSE_GETATTR, FUSE_GETXATTR, FUSE_LISTXATTR, FUSE_LOOKUP,
                                   FUSE_OPENDIR, FUSE_READLINK, FUSE_RELEASE, FUSE_RELEASEDIR,
                                   FUSE_STATFS, fuse_in_header)
from hvcore.includes.sys cimport pthread_mutex_lock, pthread_mutex_unlock


cdef inline bint _quick(uint32_t op) noexcept nogil:
    """Requests answered from the tables and one metadata call, never waiting on data I/O."""
    return (op == FUSE_LOOKUP or op == FUSE_GETATTR or op == FUSE_FORGET
            or op == FUSE_BATCH_FORGET or op == FUSE_FLUSH or op == FUSE_RELEASE
            or op == FUSE_RELEASEDIR or op == FUSE_OPENDIR)


cdef inline bint _quick_py(uint32_t op) noexcept nogil:
    """Requests for the Python handler that never wait (the reader keeps its turn)."""
    return (op == FUSE_GETXATTR or op == FUSE_LISTXATTR or op == FUSE_STATFS
            or op == FUSE_ACCESS or op == FUSE_READLINK)


def serve(FastPath fast not None, int devfd, buf, out, int pipe_r=-1, int pipe_w=-1,
          Py_ssize_t pipe_cap=0, bint leader=False) -> int:
    """Read requests from a /dev/fuse descriptor into `buf`, answering what this path
    answers without the GIL, until one is for the Python handler: returns its length (it
    is in `buf`), 0 at end of file, or -errno when the read fails (EINTR, EAGAIN, ENOENT:
    retried).

    Readers take turns as leader/followers: only the reader holding `lead` reads, and it
    keeps reading after a quick request (`_quick`), so a client's requests one after
    another are served by one awake thread; before anything that may take a while it
    hands the turn on (a request for Python keeps it when it never waits, `keeps_turn`).
    (With every reader in read(), the kernel wakes the one asleep longest, on whichever
    CPU: about 9 us more per LOOKUP on two CPUs.)"""
    cdef uint8_t[::1] b = buf
    cdef uint8_t[::1] o = out
    cdef ssize_t n = 0
    cdef Py_ssize_t m
    if b.shape[0] == 0 or o.shape[0] == 0:
        raise ValueError("empty buffer")
    cdef uint8_t *bp = &b[0]
    cdef uint8_t *op = &o[0]
    cdef Py_ssize_t bn = b.shape[0], on = o.shape[0]
    cdef uint32_t opc
    with nogil:
        while True:
            if not leader:
                pthread_mutex_lock(&fast.lead)
                leader = 1
            n = read(devfd, bp, bn)
            if n < 0:
                if errno == EINTR or errno == EAGAIN or errno == ENOENT:
                    continue
                n = -errno
                break
            if n == 0:
                break
            opc = (<const fuse_in_header *>bp).opcode if n >= <ssize_t>sizeof(
                fuse_in_header) else 0
            if not _quick(opc) and not _quick_py(opc):
                pthread_mutex_unlock(&fast.lead)    # may take a while: another reads on
                leader = 0
            if pipe_r >= 0 and fast.files._splice_read(bp, n, devfd, pipe_r, pipe_w,
                                                       pipe_cap, op):
                continue
            m = fast._serve(bp, n, op, on)
            if m == 0:
                if leader and not _quick_py(opc):
                    pthread_mutex_unlock(&fast.lead)    # Python's; it may wait
                    leader = 0
                break
            if m > 0:
                write(devfd, op, m)     # ENOENT: the request was interrupted meanwhile
        if leader and n <= 0:
            pthread_mutex_unlock(&fast.lead)
    return n


def keeps_turn(req) -> bool:
    """Whether `serve` returned this request (for Python) with the reading turn
    still held: pass `leader=True` to the next call (or `release_turn()`)."""
    cdef const uint8_t[::1] rq = req
    if rq.shape[0] < <Py_ssize_t>sizeof(fuse_in_header):
        return False
    return _quick_py((<const fuse_in_header *>&rq[0]).opcode)

def release_turn(FastPath fast not None) -> None:
    """Hand the reading turn on (after `keeps_turn` said the caller held it)."""
    pthread_mutex_unlock(&fast.lead)
