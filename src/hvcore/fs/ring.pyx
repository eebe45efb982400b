# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""One FUSE-over-io_uring queue (Linux 6.14+, `Documentation/filesystems/fuse/
fuse-io-uring.rst`): the kernel keeps a request queue per CPU and hands a request issued on
CPU N to an entry registered for queue N, so a server thread pinned to CPU N serves it
without a cross-CPU wake-up. On a virtual machine a cross-CPU wake-up costs tens of
microseconds (an IPI and a halted vCPU), several times a whole same-CPU round trip, and
/dev/fuse wakes whichever reader waits longest, on whichever CPU.

Each entry is a header page and a payload buffer in one anonymous mapping. The kernel
writes the `fuse_in_header` at `in_out`, the opcode's fixed struct at `op_in` and the rest
(names, write data) into the payload; `_next` makes that one contiguous request again, as
/dev/fuse would have delivered it, so the same request handlers answer both transports:
small requests are copied into `req`, large ones (WRITE data) are shifted in place in
front of their payload. Replies go the other way: the `fuse_out_header` into `in_out`, the
rest into the payload; a READ is read straight into the payload. A COMMIT_AND_FETCH command
returns the entry with its reply and re-arms it in one submission.

All commands are submitted from the queue's own thread (IORING_SETUP_SINGLE_ISSUER); a
reply finished on another thread is `post`ed and an eventfd read wakes the ring to commit
it."""

from libc.errno cimport EAGAIN, EBUSY, EINTR, EIO, ENOSYS, ENOTCONN, errno
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memmove, memset
from posix.uio cimport iovec
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ, PROT_WRITE, mmap, munmap
from posix.unistd cimport close, write
from cpython.bytes cimport PyBytes_FromStringAndSize

from hvcore.aio cimport uring_close, uring_setup
from hvcore.fs.attr cimport reply_header
from hvcore.fs.fastpath cimport FastPath
from hvcore.includes.aio cimport (IORING_ENTER_GETEVENTS, IORING_OP_READ, IORING_OP_URING_CMD,
                                  IORING_SETUP_COOP_TASKRUN, IORING_SETUP_DEFER_TASKRUN,
                                  IORING_SETUP_SINGLE_ISSUER, IORING_SETUP_SQE128,
                                  SYS_io_uring_enter, aq_load_acquire, aq_store_release,
                                  io_uring_cqe, io_uring_sqe, syscall)
from hvcore.includes.fuse cimport FUSE_READ, fuse_in_header, fuse_out_header, fuse_read_in
from hvcore.includes.sys cimport pthread_mutex_init, pthread_mutex_destroy
from hvcore.includes.sys cimport pthread_mutex_lock, pthread_mutex_unlock

import os

DEF STREAM_READ = 131072     # a READ this large is part of a stream (FuseRing._place)

cdef extern from "<sched.h>" nogil:
    int sched_setaffinity(int pid, size_t size, const cpu_set_t *mask)
    int sched_getaffinity(int pid, size_t size, cpu_set_t *mask)
    void CPU_ZERO(cpu_set_t *s)
    void CPU_SET(int cpu, cpu_set_t *s)

cdef extern from "<errno.h>" nogil:
    enum: ECANCELED

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum: EFD_CLOEXEC

cdef extern from "<sys/mman.h>" nogil:
    enum: MAP_NORESERVE

# include/uapi/linux/fuse.h (7.42): the entry's header buffer and the SQE's command area
DEF IN_OUT_SZ = 128
DEF OP_IN_SZ = 128
DEF HEADER_SZ = 288              # in_out, op_in, fuse_uring_ent_in_out
DEF ENT_OFF = 256
DEF CMD_OFF = 48                 # the command area of an SQE128
DEF SQE_SZ = 128
DEF CMD_REGISTER = 1             # FUSE_IO_URING_CMD_REGISTER
DEF CMD_COMMIT_AND_FETCH = 2     # FUSE_IO_URING_CMD_COMMIT_AND_FETCH
DEF PAGE = 4096
DEF REQ_COPY = 65536             # requests with at most this much payload are copied whole
DEF REPIN_AFTER = 4              # requests without a large READ before the thread is pinned again
DEF SMALL_OUT = 4096
cdef uint64_t EV_TAG = 0xFFFFFFFFFFFFFFFFULL

ctypedef struct ent_in_out:      # struct fuse_uring_ent_in_out
    uint64_t flags
    uint64_t commit_id
    uint32_t payload_sz
    uint32_t padding
    uint64_t reserved

ctypedef struct cmd_req:         # struct fuse_uring_cmd_req
    uint64_t flags
    uint64_t commit_id
    uint16_t qid
    uint8_t padding[6]


cdef class FuseRing:
    """Queue `qid` of a FUSE connection (`devfd`, after INIT): `depth` entries with a payload
    buffer of `payload` bytes each (at least the kernel's max_write / max_pages). Create,
    `register()` and serve it from one thread (the one that created it)."""

    def __cinit__(self, int devfd, int qid, int depth, size_t payload):
        cdef unsigned entries = 2 * (depth + 1)
        cdef int rc, e
        memset(&self.q, 0, sizeof(self.q))
        self.q.ring_fd = -1
        self.evfd = -1
        self.devfd, self.qid, self.depth = devfd, qid, depth
        self.cur = -1
        pthread_mutex_init(&self.lock, NULL)
        if depth < 1 or depth > 1024:
            raise ValueError("depth must be 1..1024")
        self.payload_cap = (payload + PAGE - 1) // PAGE * PAGE
        self.slot_size = PAGE + self.payload_cap
        rc = uring_setup(&self.q, entries, IORING_SETUP_SQE128 | IORING_SETUP_SINGLE_ISSUER
                         | IORING_SETUP_DEFER_TASKRUN)
        if rc < 0:
            rc = uring_setup(&self.q, entries, IORING_SETUP_SQE128 | IORING_SETUP_COOP_TASKRUN)
        if rc < 0:
            rc = uring_setup(&self.q, entries, IORING_SETUP_SQE128)
        if rc < 0:
            raise OSError(-rc, f"io_uring_setup: {os.strerror(-rc)}")
        self.evfd = eventfd(0, EFD_CLOEXEC)
        if self.evfd < 0:
            raise OSError(errno, f"eventfd: {os.strerror(errno)}")
        self.region_len = depth * self.slot_size
        cdef void *m = mmap(NULL, self.region_len, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if m == MAP_FAILED:
            raise OSError(errno, f"ring buffers: {os.strerror(errno)}")
        self.region = <uint8_t *>m
        self.iov = <iovec *>calloc(2 * depth, sizeof(iovec))
        self.commit_ids = <uint64_t *>calloc(depth, sizeof(uint64_t))
        self.posted = <int *>calloc(depth, sizeof(int))
        self.req = <uint8_t *>calloc(1, 64 + IN_OUT_SZ + OP_IN_SZ + REQ_COPY)
        self.small_out = <uint8_t *>calloc(1, SMALL_OUT)
        if (self.iov == NULL or self.commit_ids == NULL or self.posted == NULL
                or self.req == NULL or self.small_out == NULL):
            raise MemoryError()
        sched_getaffinity(0, sizeof(cpu_set_t), &self.any_cpu)
        CPU_ZERO(&self.own_cpu)
        CPU_SET(qid, &self.own_cpu)
        self.pinned = sched_setaffinity(0, sizeof(cpu_set_t), &self.own_cpu) == 0
        for e in range(depth):
            self.iov[2 * e].iov_base = self._header(e)
            self.iov[2 * e].iov_len = HEADER_SZ
            self.iov[2 * e + 1].iov_base = self._header(e) + HEADER_SZ
            self.iov[2 * e + 1].iov_len = self.payload_cap

    def __dealloc__(self):
        self.close()
        pthread_mutex_destroy(&self.lock)

    def close(self) -> None:
        """Close the ring (the kernel cancels the entries still registered)."""
        uring_close(&self.q)
        pthread_mutex_lock(&self.lock)         # a worker may be posting
        if self.evfd >= 0:
            close(self.evfd)
            self.evfd = -1
        free(self.posted)
        self.posted = NULL
        pthread_mutex_unlock(&self.lock)
        if self.region != NULL:
            munmap(self.region, self.region_len)
            self.region = NULL
        free(self.iov)
        free(self.commit_ids)
        free(self.req)
        free(self.small_out)
        self.iov = NULL
        self.commit_ids = NULL
        self.req = self.small_out = NULL
        self.ended = 1

    # --- submission ---------------------------------------------------------------------

    cdef uint8_t *_header(self, int e) noexcept nogil:
        return self.region + <size_t>e * self.slot_size + PAGE - HEADER_SZ

    cdef uint8_t *_sqe(self) noexcept nogil:
        cdef unsigned i = self.q.tail & self.q.sq_mask
        cdef uint8_t *sqe = <uint8_t *>self.q.sqes + <size_t>i * SQE_SZ
        memset(sqe, 0, SQE_SZ)
        self.q.sq_array[i] = i
        self.q.tail += 1
        self.q.unsubmitted += 1
        return sqe

    cdef void _cmd(self, int e, uint32_t op) noexcept nogil:
        cdef uint8_t *sqe = self._sqe()
        cdef io_uring_sqe *s = <io_uring_sqe *>sqe
        cdef cmd_req *c = <cmd_req *>(sqe + CMD_OFF)
        s.opcode = IORING_OP_URING_CMD
        s.fd = self.devfd
        s.off = op                     # cmd_op shares the offset field
        s.user_data = <uint64_t>e
        if op == CMD_REGISTER:
            s.addr = <uint64_t>&self.iov[2 * e]
            s.len = 2
        else:
            c.commit_id = self.commit_ids[e]
        c.qid = <uint16_t>self.qid

    cdef void _arm_event(self) noexcept nogil:
        cdef io_uring_sqe *s = <io_uring_sqe *>self._sqe()
        s.opcode = IORING_OP_READ
        s.fd = self.evfd
        s.off = <uint64_t>-1
        s.addr = <uint64_t>&self.evbuf
        s.len = 8
        s.user_data = EV_TAG

    cdef int _submit(self, bint wait) noexcept nogil:
        """Publish the prepared entries and submit them; with `wait`, sleep until a
        completion is there (task work, the kernel's copies into our buffers, runs here).
        Without `wait` and with nothing prepared there is nothing to do (no system call)."""
        cdef long r
        if not self.q.unsubmitted and not wait:
            return 0
        if self.q.unsubmitted:
            aq_store_release(self.q.sq_tail, self.q.tail)
        while True:
            self.enters += 1
            r = syscall(SYS_io_uring_enter, self.q.ring_fd, self.q.unsubmitted,
                        1 if wait else 0, IORING_ENTER_GETEVENTS if wait else 0, NULL, 0)
            if r >= 0:
                self.q.unsubmitted -= <unsigned>r
                return 0
            if errno == EINTR:
                continue
            if not wait and (errno == EAGAIN or errno == EBUSY):
                return 0            # the kernel takes them with the next call
            return -errno

    def register(self) -> None:
        """Hand every entry to the kernel (after INIT is answered: the kernel needs the
        negotiated sizes). A refusal arrives as a completion: `serve_ring` then ends with
        `error` set, and the kernel goes on with /dev/fuse."""
        cdef int e, rc
        for e in range(self.depth):
            self._cmd(e, CMD_REGISTER)
        self._arm_event()
        with nogil:
            rc = self._submit(0)
        if rc < 0:
            raise OSError(-rc, f"io_uring_enter: {os.strerror(-rc)}")

    # --- serving -------------------------------------------------------------------------

    cdef void _drain_posted(self) noexcept nogil:
        cdef int i
        pthread_mutex_lock(&self.lock)
        for i in range(self.nposted):
            self._cmd(self.posted[i], CMD_COMMIT_AND_FETCH)
        self.nposted = 0
        pthread_mutex_unlock(&self.lock)

    cdef int _next(self, const uint8_t **req, Py_ssize_t *n, uint8_t **out,
                   Py_ssize_t *cap) noexcept nogil:
        """The next request (its entry; the contiguous request and where its reply goes), or
        -1 when the queue has ended (`ended`, `error`).

        Replies committed meanwhile wait while requests are waiting too, and go in the
        submission that waits for the next one: a burst (git's twenty lstat threads) is
        answered with one io_uring_enter and its clients woken together, rather than each
        reply waking a client that preempts the queue's thread (~10% of git status here).
        At most `depth` replies wait, since each holds its entry; a bulk READ or WRITE reply
        is submitted at once by `FastPath.serve_ring`, since its reader should not wait."""
        cdef unsigned head, tail
        cdef io_uring_cqe *cqe
        cdef uint64_t ud
        cdef int32_t res
        cdef int e, rc
        cdef uint8_t *hdr
        cdef uint8_t *payload
        cdef const fuse_in_header *ih
        cdef ent_in_out *ent
        cdef Py_ssize_t total, psz, opsz
        while not self.ended:
            head = self.q.cq_head[0]
            tail = aq_load_acquire(self.q.cq_tail)
            if head == tail:
                rc = self._submit(1)
                if rc < 0:
                    self.ended, self.error = 1, -rc
                continue
            cqe = &self.q.cqes[head & self.q.cq_mask]
            ud, res = cqe.user_data, cqe.res
            aq_store_release(self.q.cq_head, head + 1)
            if ud == EV_TAG:
                self._drain_posted()
                self._arm_event()
                continue
            if res < 0:             # ENOTCONN / ECANCELED at the end; a refused REGISTER
                self.ended = 1
                self.error = 0 if res == -ENOTCONN or res == -ECANCELED else -res
                break
            e = <int>ud
            if e < 0 or e >= self.depth:
                continue
            hdr = self._header(e)
            payload = hdr + HEADER_SZ
            ih = <const fuse_in_header *>hdr
            ent = <ent_in_out *>(hdr + ENT_OFF)
            self.commit_ids[e] = ent.commit_id
            total, psz = ih.len, ent.payload_sz
            opsz = total - <Py_ssize_t>sizeof(fuse_in_header) - psz
            if psz > <Py_ssize_t>self.payload_cap or opsz < 0 or opsz > OP_IN_SZ:
                self._fill(e, self.small_out, reply_header(self.small_out, ih.unique, EIO,
                                                           sizeof(fuse_out_header)))
                self._commit(e)
                continue
            if psz <= REQ_COPY:
                memcpy(self.req, hdr, sizeof(fuse_in_header))
                memcpy(self.req + sizeof(fuse_in_header), hdr + IN_OUT_SZ, opsz)
                memcpy(self.req + sizeof(fuse_in_header) + opsz, payload, psz)
                req[0] = self.req
                out[0] = payload - sizeof(fuse_out_header)    # a READ lands in place
                cap[0] = self.payload_cap + sizeof(fuse_out_header)
            else:                   # shift the header and op struct in front of the payload
                memmove(payload - opsz, hdr + IN_OUT_SZ, opsz)
                memmove(payload - opsz - sizeof(fuse_in_header), hdr, sizeof(fuse_in_header))
                req[0] = payload - opsz - sizeof(fuse_in_header)
                out[0] = self.small_out
                cap[0] = SMALL_OUT
            n[0] = total
            self.cur, self.cur_req, self.cur_n = e, req[0], total
            self.served += 1
            return e
        return -1

    cdef void _fill(self, int e, const uint8_t *out, Py_ssize_t m) noexcept nogil:
        """Put a reply (`fuse_out_header` and body, as on /dev/fuse) into entry `e`."""
        cdef uint8_t *hdr = self._header(e)
        cdef uint8_t *payload = hdr + HEADER_SZ
        cdef Py_ssize_t body = m - <Py_ssize_t>sizeof(fuse_out_header)
        cdef ent_in_out *ent = <ent_in_out *>(hdr + ENT_OFF)
        memcpy(hdr, out, sizeof(fuse_out_header))
        if body > 0 and out + sizeof(fuse_out_header) != payload:
            memcpy(payload, out + sizeof(fuse_out_header), body)
        memset(ent, 0, sizeof(ent_in_out))
        ent.commit_id = self.commit_ids[e]
        ent.payload_sz = <uint32_t>(body if body > 0 else 0)

    cdef void _commit(self, int e) noexcept nogil:
        self._cmd(e, CMD_COMMIT_AND_FETCH)

    # --- the Python handler's requests -------------------------------------------------------

    def request(self) -> bytes:
        """The request `_next` returned last (a copy: it may be answered on another thread)."""
        if self.cur < 0 or self.cur_req == NULL:
            raise ValueError("no request")
        return PyBytes_FromStringAndSize(<const char *>self.cur_req, self.cur_n)

    cdef int _put(self, int e, replies) except -1:
        cdef bytes data = b"".join(replies)
        cdef Py_ssize_t m = len(data)
        cdef const uint8_t *p = <const uint8_t *><const char *>data
        cdef uint8_t err[16]
        if e < 0 or e >= self.depth or self.region == NULL:
            raise ValueError("no such entry (the queue has ended)")
        if m < <Py_ssize_t>sizeof(fuse_out_header):
            raise ValueError("reply shorter than its header")
        if m - <Py_ssize_t>sizeof(fuse_out_header) > <Py_ssize_t>self.payload_cap:
            m = reply_header(err, self.commit_ids[e], EIO, sizeof(fuse_out_header))
            p = err
        self._fill(e, p, m)
        return 0

    cdef void _post(self, int e) noexcept nogil:
        cdef uint64_t one = 1
        pthread_mutex_lock(&self.lock)
        if self.posted != NULL:
            self.posted[self.nposted] = e
            self.nposted += 1
            write(self.evfd, &one, 8)
        pthread_mutex_unlock(&self.lock)

    cdef void _place(self, bint large_read) noexcept nogil:
        """Where the queue's thread runs. Pinned to its CPU, a request-response exchange
        stays on one CPU; but a stream of large READs issued from this CPU would then be
        read, copied and consumed on it alone while the other CPUs idle (~0.6x the MB/s of
        /dev/fuse here). So a large READ lets the thread run anywhere (the scheduler
        places it beside the reader) until REPIN_AFTER other requests have passed."""
        if large_read:
            self.streak = 0
            if self.pinned:
                self.pinned = 0
                sched_setaffinity(0, sizeof(cpu_set_t), &self.any_cpu)
        elif not self.pinned:
            self.streak += 1
            if self.streak >= REPIN_AFTER:
                self.pinned = sched_setaffinity(0, sizeof(cpu_set_t), &self.own_cpu) == 0

    def reply(self, int e, replies) -> None:
        """Answer entry `e` (on the queue's own thread): committed with the next submission."""
        self._put(e, replies)
        self._commit(e)

    def post(self, int e, replies) -> None:
        """Answer entry `e` from another thread: the queue's thread commits it."""
        self._put(e, replies)
        with nogil:
            self._post(e)

    def no_reply(self, int e) -> None:
        """A request the handler had nothing to say to (never over the ring): ENOSYS."""
        self._fill(e, self.small_out, reply_header(self.small_out, self.commit_ids[e], ENOSYS,
                                                   sizeof(fuse_out_header)))
        self._commit(e)


def serve(FastPath fast not None, FuseRing ring not None) -> int:
    """Serve a FUSE-over-io_uring queue (`hvcore.fs.ring`) from the calling thread, answering
    what this path answers without the GIL, until a request is for the Python handler:
    returns its entry (`ring.request()` has it; answer with `ring.reply` or `ring.post`),
    or -1 when the queue has ended (`ring.error` says why, 0 for an unmount)."""
    cdef int e
    cdef const uint8_t *rq
    cdef uint8_t *out
    cdef Py_ssize_t n, cap, m, hdr = sizeof(fuse_in_header)
    cdef const fuse_in_header *h
    cdef bint stream
    with nogil:
        while True:
            e = ring._next(&rq, &n, &out, &cap)
            if e < 0:
                break
            h = <const fuse_in_header *>rq
            stream = (h.opcode == FUSE_READ and n >= hdr + <Py_ssize_t>sizeof(fuse_read_in)
                      and (<const fuse_read_in *>(rq + hdr)).size >= STREAM_READ)
            ring._place(stream)
            m = fast._serve(rq, n, out, cap)
            if m == 0:
                ring._submit(0)     # replies held for a burst go before Python's turn
                break
            if m < 0:           # FORGET: never sent over the ring, but an entry needs a reply
                m = reply_header(out, h.unique, ENOSYS, sizeof(fuse_out_header))
            ring._fill(e, out, m)
            ring._commit(e)
            if stream or n >= STREAM_READ:
                ring._submit(0)     # bulk data: its reader should not wait for a burst
    return e
