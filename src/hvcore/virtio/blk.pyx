# cython: language_level=3
"""virtio-blk reads and writes served in C (`pyhv.virtio.blk` wires it): chains are taken
and answered without the GIL when they have Linux's shape (the 16-byte header in its own
buffer, the status byte in its own) and are a read or write of whole sectors inside the
disk; each data buffer goes straight between guest memory and the qcow2 engine (or the raw
file). The first chain that is anything else (flush, discard, get-id, an error to report,
an odd layout) is handed back to the Python device, which answers it and logs what
needs logging."""

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy
from posix.types cimport off_t
from posix.unistd cimport pread, pwrite

from hvcore.qcow2 cimport Qcow2
from hvcore.qcow2_data cimport do_read, do_write
from hvcore.qcow2_io cimport q2_lock, q2_raise, q2_unlock_rc
from hvcore.qcow2_l2 cimport do_write_back
from hvcore.virtio.queue cimport SplitQueue, VqChain

from hvcore.virtio.queue import VirtqueueError

DEF T_IN = 0
DEF T_OUT = 1
DEF SECTOR = 512
DEF PYTHON = -1


cdef struct BlkHeader:
    uint32_t type
    uint32_t ioprio
    uint64_t sector


cdef class BlkQueue:
    """The chains of one virtio-blk queue over a qcow2 core (`qcow`) or a raw file (`fd`)."""

    cdef SplitQueue q
    cdef Qcow2 qcow
    cdef int fd
    cdef uint64_t size
    cdef bint readonly, guard_block0
    cdef VqChain *c
    cdef readonly unsigned long long answered     # chains answered in C

    def __cinit__(self, SplitQueue q not None, Qcow2 qcow, int fd, uint64_t size,
                  bint readonly, bint guard_block0=False):
        """`qcow` or, when it is None, the raw file `fd`; `guard_block0`: a probed raw
        image, whose first sector only the Python device may write (as QEMU guards it)."""
        self.q, self.qcow, self.fd, self.size = q, qcow, fd, size
        self.readonly, self.guard_block0 = readonly, guard_block0
        self.c = <VqChain *>PyMem_Malloc(sizeof(VqChain))
        if self.c == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.c)

    def next(self):
        """Answer chains in C until one needs the Python device: that chain as (head,
        readable, writable); None when no chain waits."""
        cdef int rc, wb = 0
        cdef long long written
        cdef unsigned long long answered = 0, writes = 0
        cdef VqChain *c = self.c
        with nogil:
            while True:
                rc = self.q.take(c)
                if rc <= 0:
                    break
                written = self._serve(c)
                if written == PYTHON:
                    break
                self.q.put(c.head, <uint32_t>written)
                answered += 1
                writes += (<BlkHeader *>c.buf[0].ptr).type == T_OUT
            if writes and self.qcow is not None:
                # before the driver sees them acknowledged (pyhv.virtio.blk)
                q2_lock(&self.qcow.q)
                wb = q2_unlock_rc(&self.qcow.q, do_write_back(&self.qcow.q))
            if answered:
                self.q.publish()
        self.answered += answered
        if wb < 0:
            q2_raise(&self.qcow.q, wb)
        if rc < 0:
            raise VirtqueueError(self.q.error)
        return self.q.views(c) if rc > 0 else None

    cdef long long _serve(self, VqChain *c) noexcept nogil:
        """The bytes written into the chain (data and status), or PYTHON."""
        cdef BlkHeader h
        cdef uint32_t k, first, last
        cdef uint64_t off, total
        if c.nread < 1 or c.nwrite < 1 or c.buf[0].len != sizeof(BlkHeader) or \
                c.buf[c.nread + c.nwrite - 1].len != 1:
            return PYTHON
        memcpy(&h, c.buf[0].ptr, sizeof(BlkHeader))
        if h.sector > self.size // SECTOR:
            return PYTHON
        off = h.sector * SECTOR
        if h.type == T_IN:
            first, last, total = c.nread, c.nread + c.nwrite - 1, c.write_len - 1
        elif h.type == T_OUT and not self.readonly:
            first, last, total = 1, c.nread, c.read_len - sizeof(BlkHeader)
            if self.guard_block0 and off < SECTOR and total:
                return PYTHON
        else:
            return PYTHON
        if total % SECTOR or total > self.size - off:
            return PYTHON
        for k in range(first, last):
            if self._io(h.type == T_OUT, off, c.buf[k].ptr, c.buf[k].len) < 0:
                return PYTHON               # (the Python device retries it and reports)
            off += c.buf[k].len
        c.buf[c.nread + c.nwrite - 1].ptr[0] = 0          # VIRTIO_BLK_S_OK
        return total + 1 if h.type == T_IN else 1

    cdef int _io(self, bint write, uint64_t off, uint8_t *p, uint64_t n) noexcept nogil:
        cdef ssize_t got
        if self.qcow is not None:
            return do_write(&self.qcow.q, off, p, n) if write else \
                do_read(&self.qcow.q, off, p, n)
        while n:
            got = pwrite(self.fd, p, n, <off_t>off) if write else \
                pread(self.fd, p, n, <off_t>off)
            if got <= 0:
                return -1
            p += got
            off += got
            n -= got
        return 0
