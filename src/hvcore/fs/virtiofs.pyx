# cython: language_level=3
"""FUSE requests from a virtqueue (virtio-fs), the third transport beside /dev/fuse and
io_uring (`pyhv.share.virtiofs` wires it): chains are taken and answered in C, without
the GIL, for every request the fast path answers and whose request and reply room are one
buffer each (what Linux's virtio-fs sends for all but large READs and WRITEs); the first
chain that needs the Python handler is handed back."""

from cpython.mem cimport PyMem_Free, PyMem_Malloc

from hvcore.fs.fastpath cimport FastPath
from hvcore.virtio.queue cimport SplitQueue, VqChain

from hvcore.virtio.queue import VirtqueueError


cdef class FuseQueue:
    """The chains of one virtio-fs request queue, served through `fast`."""

    cdef SplitQueue q
    cdef FastPath fast
    cdef VqChain *c
    cdef readonly unsigned long long answered     # chains answered in C

    def __cinit__(self, SplitQueue q not None, FastPath fast not None):
        self.q, self.fast = q, fast
        self.c = <VqChain *>PyMem_Malloc(sizeof(VqChain))
        if self.c == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.c)

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
                if c.nread == 1 and c.nwrite == 1:
                    n = self.fast._serve(c.buf[0].ptr, c.buf[0].len, c.buf[1].ptr,
                                         c.buf[1].len)
                    if n != 0:
                        self.q.put(c.head, <unsigned int>n if n > 0 else 0)
                        answered += 1
                        continue
                break                       # for Python
            if answered:
                self.q.publish()
        self.answered += answered
        if rc < 0:
            raise VirtqueueError(self.q.error)
        return self.q.views(c) if rc > 0 else None
