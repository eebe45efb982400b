# State shared by the qcow2 modules (one C struct per open image), the on-disk constants,
# error codes, and the bounded file I/O every table read goes through.
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from posix.uio cimport iovec

from hvcore.qcow2_cache cimport BlockCache


# The Q2 struct embeds a mutex and a condition variable.
from hvcore.includes.sys cimport pthread_cond_t, pthread_mutex_t


cdef extern from *:
    """
    #define Q2_COPIED     (1ULL << 63)
    #define Q2_COMPRESSED (1ULL << 62)
    #define Q2_ZEROF      1ULL
    #define Q2_OFF_MASK   0x00fffffffffffe00ULL
    #define Q2_RT_MASK    0xfffffffffffffe00ULL
    #define Q2_ALL_ALLOC  0xffffffffULL
    #define Q2_ALL_ZERO   0xffffffff00000000ULL
    #define Q2_MAX_HOST   (1ULL << 56)
    """
    const uint64_t COPIED "Q2_COPIED"
    const uint64_t COMPRESSED "Q2_COMPRESSED"
    const uint64_t ZEROF "Q2_ZEROF"
    const uint64_t OFF_MASK "Q2_OFF_MASK"
    const uint64_t RT_MASK "Q2_RT_MASK"
    const uint64_t ALL_ALLOC "Q2_ALL_ALLOC"
    const uint64_t ALL_ZERO "Q2_ALL_ZERO"
    const uint64_t MAX_HOST "Q2_MAX_HOST"


cdef enum:
    PW_IOV = 64                # pieces one pending data write may gather
    DIRECT_ALIGN = 512         # O_DIRECT: offsets, lengths and buffers aligned to this

cdef enum:
    K_UNALLOC = 0
    K_DATA = 1
    K_ZERO = 2
    K_COMP = 3

cdef enum:
    E_IO = 1
    E_EOF = 2
    E_L1_RANGE = 3
    E_L2_ALIGN = 4
    E_DATA_ALIGN = 5
    E_META = 6
    E_COMP_RANGE = 7
    E_RB_ALIGN = 8
    E_CALLBACK = 9
    E_DECOMPRESS = 10
    E_RC_OVERFLOW = 11
    E_RC_UNDERFLOW = 12
    E_BITMAP = 13
    E_FULL = 14
    E_NOMEM = 15
    E_RANGE = 16


ctypedef struct Q2:
    int fd
    int dfd                    # the same file with O_DIRECT for aligned data I/O, or -1
    bint readonly, extended, v3
    uint32_t cluster_bits
    uint64_t cluster_size, size
    uint64_t cmask
    uint32_t l2_bits, ewords, sc_bits
    uint64_t csize_shift, csize_mask
    # L1 table (host byte order) and the L2 cache, indexed by L1 index (qcow2_l2)
    uint64_t *l1
    uint64_t l1_size, l1_offset
    bint l1_dirty, l1_moved
    BlockCache l2
    # refcount table (host order) and the refcount block cache (qcow2_refcount)
    uint32_t refcount_order
    uint64_t rc_max
    uint32_t rb_bits
    uint64_t *rt
    uint64_t rt_n, rt_offset
    bint rt_dirty, rt_moved
    BlockCache rb              # refcount blocks, indexed by refcount table index
    uint64_t free_hint
    uint64_t *frees
    size_t nfrees, cap_frees
    uint64_t ex_lo[8]
    uint64_t ex_hi[8]
    int nex
    uint32_t *chk_refs
    uint64_t chk_n
    # file end and metadata map (one bit per host cluster)
    uint64_t file_end
    uint8_t *meta
    uint64_t meta_n
    # one pending data write (pwritev), extended while the host offsets stay contiguous
    uint64_t pw_host, pw_len
    iovec pw_iov[PW_IOV]
    int pw_niov
    uint8_t *scratch
    # compressed clusters (qcow2_codec): read buffers, last decompressed, write cursor
    uint8_t *cbuf
    uint8_t *dbuf
    uint64_t dkey
    uint64_t cfree
    # concurrency: `lock` guards everything above and below except the constants; data
    # I/O on clusters already mapped runs outside it, counted in `inflight`, and a flush
    # waits (`idle`) for that count to reach 0 before freed clusters can be reused.
    # Errors are per thread (qcow2_io's thread-local state), not in this struct.
    pthread_mutex_t lock
    pthread_cond_t idle
    int inflight               # atomic
    int draining               # atomic; set by a flush waiting for inflight == 0
    # backing file and decompressor: Python callables kept alive by the Qcow2 object
    bint has_backing
    uint64_t backing_size
    PyObject *backing_read
    PyObject *decompress
    bint unsafe_cache          # qemu's cache=unsafe: order writes, skip fdatasync


cdef int q2_lock_init(Q2 *q) noexcept nogil
cdef void q2_lock_destroy(Q2 *q) noexcept nogil
cdef void q2_lock(Q2 *q) noexcept nogil
cdef void q2_unlock(Q2 *q) noexcept nogil
cdef int q2_unlock_rc(Q2 *q, int rc) noexcept nogil
cdef void io_begin(Q2 *q) noexcept nogil
cdef void io_end(Q2 *q) noexcept nogil
cdef void q2_drain(Q2 *q) noexcept nogil
cdef int q2_errno(Q2 *q) noexcept nogil
cdef void q2_clear_err(Q2 *q) noexcept nogil
cdef int pwrite_data(Q2 *q, const void *buf, uint64_t n, uint64_t off) noexcept nogil
cdef int q2_fail(Q2 *q, int code, uint64_t a, uint64_t b) noexcept nogil
cdef int q2_store_exc(Q2 *q, object exc) noexcept
cdef int q2_raise(Q2 *q, int rc) except -1
cdef int pread_exact(Q2 *q, void *buf, uint64_t n, uint64_t off) noexcept nogil
cdef int pread_data(Q2 *q, void *buf, uint64_t n, uint64_t off) noexcept nogil
cdef int read_table(Q2 *q, uint64_t *dst, uint64_t n, uint64_t off) noexcept nogil
cdef int write_table(Q2 *q, const uint64_t *src, uint64_t n, uint64_t off) noexcept nogil
cdef int pwrite_all(Q2 *q, const void *buf, uint64_t n, uint64_t off) noexcept nogil
cdef int q2_sync(Q2 *q) noexcept nogil
cdef int flush_pw(Q2 *q) noexcept nogil
cdef int queue_pw(Q2 *q, uint64_t host, const uint8_t *buf, uint64_t n) noexcept nogil
