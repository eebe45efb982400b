# hvcore.fs.ring: one FUSE-over-io_uring queue (the kernel's per-CPU request queue); its
# `serve` answers requests in C through the fast path between `_next` and `_commit`.
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from posix.uio cimport iovec

from hvcore.aio cimport AioQ
from hvcore.includes.sys cimport pthread_mutex_t


cdef extern from "<sched.h>" nogil:
    ctypedef struct cpu_set_t:
        pass


cdef class FuseRing:
    cdef AioQ q
    cdef int devfd
    cdef int qid
    cdef int depth
    cdef int evfd                  # other threads' finished replies wake the ring (eventfd)
    cdef uint64_t evbuf
    cdef size_t payload_cap        # each entry's payload buffer (>= the kernel's max payload)
    cdef size_t slot_size          # a header page, then the payload
    cdef uint8_t *region
    cdef size_t region_len
    cdef iovec *iov                # two per entry: header, payload
    cdef uint64_t *commit_ids      # the request each entry holds (its unique)
    cdef uint8_t *req              # a request made contiguous (header, op struct, payload)
    cdef uint8_t *small_out        # the reply to a request whose payload stays in place
    cdef int cur                   # the entry `_next` returned last
    cdef const uint8_t *cur_req
    cdef Py_ssize_t cur_n
    cdef pthread_mutex_t lock      # posted (entries other threads answered)
    cdef int *posted
    cdef int nposted
    cdef public bint ended         # the connection is gone (or the ring was refused)
    cdef public int error          # why (errno), 0 for a normal end
    cdef public uint64_t served    # requests answered over this queue
    cdef public uint64_t enters    # io_uring_enter calls (served / enters: replies per call)
    cdef cpu_set_t own_cpu         # the queue's CPU
    cdef cpu_set_t any_cpu         # the process's CPUs (while streaming READs)
    cdef bint pinned
    cdef int streak                # requests since the last large READ (while unpinned)

    cdef uint8_t *_header(self, int e) noexcept nogil
    cdef uint8_t *_sqe(self) noexcept nogil
    cdef void _cmd(self, int e, uint32_t op) noexcept nogil
    cdef void _arm_event(self) noexcept nogil
    cdef int _submit(self, bint wait) noexcept nogil
    cdef void _drain_posted(self) noexcept nogil
    cdef int _put(self, int e, replies) except -1
    cdef int _next(self, const uint8_t **req, Py_ssize_t *n, uint8_t **out,
                   Py_ssize_t *cap) noexcept nogil
    cdef void _fill(self, int e, const uint8_t *out, Py_ssize_t m) noexcept nogil
    cdef void _commit(self, int e) noexcept nogil
    cdef void _post(self, int e) noexcept nogil
    cdef void _place(self, bint large_read) noexcept nogil
