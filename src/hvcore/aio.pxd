# An async I/O queue on one of two kernel backends (io_uring, Linux native AIO): prepare
# reads / writes tagged with a slot number, then submit them and collect completions in
# one call.
from libc.stdint cimport int64_t, uint64_t
from posix.uio cimport iovec

from hvcore.includes.aio cimport aio_context_t, io_event, io_uring_cqe, io_uring_sqe, iocb


cdef enum:
    AQ_URING = 1
    AQ_NATIVE = 2


ctypedef struct AqDone:
    uint64_t tag
    int64_t res                # bytes transferred, or -errno


ctypedef struct AioQ:
    int kind
    unsigned depth             # requests in flight at most (tags 0 .. depth-1)
    # io_uring: the ring fd, the three mappings and the words inside them
    int ring_fd
    void *sq_map
    size_t sq_len
    void *cq_map
    size_t cq_len
    io_uring_sqe *sqes
    size_t sqes_len
    unsigned *sq_tail
    unsigned *sq_array
    unsigned sq_mask
    unsigned *cq_head
    unsigned *cq_tail
    unsigned cq_mask
    io_uring_cqe *cqes
    unsigned tail              # our next SQ tail (published at submit)
    unsigned unsubmitted       # prepared entries the kernel has not taken yet
    bint rw_plain              # IORING_OP_READ / WRITE exist (else READV / WRITEV)
    iovec *iov                 # one per tag, for READV / WRITEV
    # native AIO: the context, one iocb per tag, the prepared ones, the event buffer
    aio_context_t ctx
    iocb *iocbs
    iocb **pending
    unsigned npending
    io_event *events


# the io_uring mapping alone (hvcore.fs.ring drives its own commands over it); SQE128 rings
# (IORING_SETUP_SQE128) have 128-byte entries: index `sqes` in bytes
cdef int uring_setup(AioQ *a, unsigned entries, unsigned flags) noexcept nogil
cdef void uring_close(AioQ *a) noexcept nogil
cdef void aq_prep(AioQ *a, unsigned tag, int fd, bint write, void *buf, uint64_t n,
                  uint64_t off, int rw_flags) noexcept nogil
cdef int aq_wait(AioQ *a, AqDone *out, unsigned max_out) noexcept nogil


cdef class AioQueue:
    cdef AioQ q
