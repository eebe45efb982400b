# C declarations from <linux/io_uring.h> and <linux/aio_abi.h> (the kernel ABI, no liburing
# or libaio), the syscall numbers, RWF_DSYNC, and acquire / release accesses to the ring
# indexes the kernel shares with us.
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "<sys/syscall.h>" nogil:
    long syscall(long number, ...)
    enum:
        SYS_io_uring_setup
        SYS_io_uring_enter
        SYS_io_setup
        SYS_io_destroy
        SYS_io_submit
        SYS_io_getevents


cdef extern from "<linux/fs.h>" nogil:
    enum: RWF_DSYNC


cdef extern from "<linux/io_uring.h>" nogil:
    enum:
        IORING_OP_READV
        IORING_OP_WRITEV
        IORING_OP_READ
        IORING_OP_WRITE
        IORING_OFF_SQ_RING
        IORING_OFF_CQ_RING
        IORING_OFF_SQES
        IORING_ENTER_GETEVENTS
        IORING_FEAT_SINGLE_MMAP
        IORING_FEAT_RW_CUR_POS
        IORING_SETUP_COOP_TASKRUN
        IORING_SETUP_SINGLE_ISSUER
        IORING_SETUP_DEFER_TASKRUN
        IORING_SETUP_SQE128
        IORING_OP_URING_CMD

    # the fields we use (the unions are anonymous in C, so `sqe.off` names the member)
    struct io_uring_sqe:
        uint8_t opcode
        uint8_t flags
        uint16_t ioprio
        int32_t fd
        uint64_t off
        uint64_t addr
        uint32_t len
        uint32_t rw_flags
        uint64_t user_data

    struct io_uring_cqe:
        uint64_t user_data
        int32_t res
        uint32_t flags

    struct io_sqring_offsets:
        uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array

    struct io_cqring_offsets:
        uint32_t head, tail, ring_mask, ring_entries, overflow, cqes, flags

    struct io_uring_params:
        uint32_t sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle, features
        uint32_t wq_fd
        io_sqring_offsets sq_off
        io_cqring_offsets cq_off


cdef extern from "<linux/aio_abi.h>" nogil:
    ctypedef unsigned long aio_context_t
    enum:
        IOCB_CMD_PREAD
        IOCB_CMD_PWRITE

    struct iocb:
        uint64_t aio_data
        int aio_rw_flags
        uint16_t aio_lio_opcode
        int16_t aio_reqprio
        uint32_t aio_fildes
        uint64_t aio_buf
        uint64_t aio_nbytes
        int64_t aio_offset
        uint32_t aio_flags

    struct io_event:
        uint64_t data
        uint64_t obj
        int64_t res
        int64_t res2


# The ring head / tail words are shared with the kernel: read the other side's index with
# acquire, publish ours with release (the entries written before it become visible first).
cdef extern from *:
    """
    #define aq_load_acquire(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
    #define aq_store_release(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
    """
    unsigned aq_load_acquire(unsigned *p) nogil
    void aq_store_release(unsigned *p, unsigned v) nogil
