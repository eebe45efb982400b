# cython: language_level=3
"""FUSE requests from a virtqueue (virtio-fs), the third transport beside /dev/fuse and
io_uring (`pyhv.share.virtiofs` wires it): chains are taken and answered in C, without
the GIL, for every request the fast path answers; the first chain that needs the Python
handler is handed back.

Linux's virtio-fs puts the request header, the arguments and any data pages in separate
buffers (and the reply header, reply arguments and data pages likewise), so a request is
gathered into a scratch buffer and its reply scattered into the chain, except the data of
READ and WRITE: those go between the file and the guest's pages with preadv / pwritev."""

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.errno cimport EIO
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy
from posix.uio cimport iovec

from hvcore.fs.attr cimport reply_header
from hvcore.fs.fastpath cimport FastPath
from hvcore.includes.fuse cimport (FUSE_READ, FUSE_WRITE, fuse_in_header, fuse_out_header,
                                   fuse_read_in, fuse_write_in)
from hvcore.virtio.queue cimport VQ_MAX_SEGS, SplitQueue, VqChain

from hvcore.virtio.queue import VirtqueueError

DEF SCRATCH = 65536             # a request's header and arguments; a reply (READDIR: less)
DEF PYTHON = 0


cdef Py_ssize_t _gather(VqChain *c, uint32_t first, uint32_t last, uint64_t skip,
                        uint8_t *dst, Py_ssize_t n) noexcept nogil:
    """Copy bytes [skip, skip + n) of buffers first..last-1 taken as one stream into `dst`;
    the bytes copied."""
    cdef uint32_t k
    cdef uint64_t pos = 0, lo, hi
    cdef Py_ssize_t done = 0
    for k in range(first, last):
        lo = skip if skip > pos else pos
        hi = min(pos + c.buf[k].len, skip + <uint64_t>n)
        if lo < hi:
            memcpy(dst + (lo - skip), c.buf[k].ptr + (lo - pos), hi - lo)
            done += hi - lo
        pos += c.buf[k].len
        if pos >= skip + <uint64_t>n:
            break
    return done


cdef void _scatter(VqChain *c, uint32_t first, uint32_t last, const uint8_t *src,
                   Py_ssize_t n) noexcept nogil:
    """Copy `n` bytes into buffers first..last-1 taken as one stream (they hold them)."""
    cdef uint32_t k
    cdef Py_ssize_t m
    for k in range(first, last):
        if n <= 0:
            return
        m = min(<Py_ssize_t>c.buf[k].len, n)
        memcpy(c.buf[k].ptr, src, m)
        src += m
        n -= m


cdef int _pages(VqChain *c, uint32_t first, uint32_t last, uint64_t skip, iovec *v) noexcept nogil:
    """The buffers first..last-1 from byte `skip` on, as iovecs; their count."""
    cdef uint32_t k
    cdef int nv = 0
    cdef uint64_t pos = 0
    for k in range(first, last):
        if pos + c.buf[k].len > skip:
            v[nv].iov_base = c.buf[k].ptr + (skip - pos if skip > pos else 0)
            v[nv].iov_len = c.buf[k].len - (skip - pos if skip > pos else 0)
            nv += 1
        pos += c.buf[k].len
    return nv


cdef class FuseQueue:
    """The chains of one virtio-fs queue, served through `fast`."""

    cdef SplitQueue q
    cdef FastPath fast
    cdef VqChain *c
    cdef uint8_t *req
    cdef uint8_t *out
    cdef iovec *iov
    cdef readonly unsigned long long answered     # chains answered in C

    def __cinit__(self, SplitQueue q not None, FastPath fast not None):
        self.q, self.fast = q, fast
        self.c = <VqChain *>PyMem_Malloc(sizeof(VqChain))
        self.req = <uint8_t *>PyMem_Malloc(SCRATCH)
        self.out = <uint8_t *>PyMem_Malloc(SCRATCH)
        self.iov = <iovec *>PyMem_Malloc(sizeof(iovec) * VQ_MAX_SEGS)
        if self.c == NULL or self.req == NULL or self.out == NULL or self.iov == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.c)
        PyMem_Free(self.req)
        PyMem_Free(self.out)
        PyMem_Free(self.iov)

    def next(self):
        """Answer chains in C until one needs the Python handler: that chain as (head,
        readable, writable); None when no chain waits. VirtqueueError once the driver has
        broken the queue."""
        cdef int rc
        cdef Py_ssize_t n
        cdef unsigned long long answered = 0
        cdef VqChain *c = self.c
        with nogil:
            while True:
                rc = self.q.take(c)
                if rc <= 0:
                    break
                n = self._serve(c)
                if n == PYTHON:
                    break
                self.q.put(c.head, <uint32_t>n if n > 0 else 0)
                answered += 1
            if answered:
                self.q.publish()
        self.answered += answered
        if rc < 0:
            raise VirtqueueError(self.q.error)
        return self.q.views(c) if rc > 0 else None

    cdef Py_ssize_t _serve(self, VqChain *c) noexcept nogil:
        """The reply's length in the chain, -1 for none, or PYTHON."""
        cdef Py_ssize_t hdr = sizeof(fuse_in_header), ohdr = sizeof(fuse_out_header)
        cdef Py_ssize_t n, args
        cdef uint32_t wfirst = c.nread, wlast = c.nread + c.nwrite
        cdef const fuse_in_header *h = <const fuse_in_header *>self.req
        cdef int nv
        if c.read_len < <uint64_t>hdr or _gather(c, 0, c.nread, 0, self.req, hdr) != hdr:
            return PYTHON
        if h.opcode == FUSE_READ or h.opcode == FUSE_WRITE:
            args = sizeof(fuse_read_in) if h.opcode == FUSE_READ else sizeof(fuse_write_in)
            if c.read_len < <uint64_t>(hdr + args) or c.write_len < <uint64_t>(ohdr + 8):
                return PYTHON
            _gather(c, 0, c.nread, 0, self.req, hdr + args)
            if h.opcode == FUSE_READ:
                if c.read_len != <uint64_t>(hdr + args):
                    return PYTHON
                nv = _pages(c, wfirst, wlast, ohdr, self.iov)
                n = self.fast.files._serve_vec(self.req, hdr + args, self.iov, nv,
                                               c.write_len - ohdr, self.out)
                if n > 0:
                    _scatter(c, wfirst, wlast, self.out, ohdr)    # (the data is in place)
                return n
            nv = _pages(c, 0, c.nread, hdr + args, self.iov)
            n = self.fast.files._serve_vec(self.req, hdr + args, self.iov, nv,
                                           c.read_len - hdr - args, self.out)
        else:
            if c.read_len > SCRATCH:
                return PYTHON
            _gather(c, 0, c.nread, 0, self.req, c.read_len)
            # (the fast path wants room for any reply; a driver that gives less room than
            # its request's reply needs gets EIO: the request was carried out, as a lost
            # reply would leave it)
            n = self.fast._serve(self.req, c.read_len, self.out, SCRATCH)
        if n > <Py_ssize_t>c.write_len:
            if c.write_len < <uint64_t>ohdr:
                return -1
            n = reply_header(self.out, h.unique, EIO, ohdr)
        if n > 0:
            _scatter(c, wfirst, wlast, self.out, n)
        return n
