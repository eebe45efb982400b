# Refcount blocks of every width, the refcount block cache, cluster allocation and the
# metadata map (which host clusters hold tables: data writes there are refused).
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from hvcore.includes.endian cimport be16toh, be32toh, be64toh, htobe16, htobe32, htobe64
from hvcore.qcow2_io cimport Q2


cdef inline uint64_t rc_read(const uint8_t *blk, uint32_t order, uint64_t i) noexcept nogil:
    if order == 4:
        return be16toh((<const uint16_t*>blk)[i])
    if order == 3:
        return blk[i]
    if order == 5:
        return be32toh((<const uint32_t*>blk)[i])
    if order == 6:
        return be64toh((<const uint64_t*>blk)[i])
    # sub-byte widths: entry i sits in byte i*bits/8, lowest bits first
    cdef uint32_t bits = 1U << order
    cdef uint32_t per = 8 // bits
    return (blk[i // per] >> ((i % per) * bits)) & ((1U << bits) - 1)


cdef inline void rc_write(uint8_t *blk, uint32_t order, uint64_t i, uint64_t v) noexcept nogil:
    cdef uint32_t bits, per, shift
    if order == 4:
        (<uint16_t*>blk)[i] = htobe16(<uint16_t>v)
    elif order == 3:
        blk[i] = <uint8_t>v
    elif order == 5:
        (<uint32_t*>blk)[i] = htobe32(<uint32_t>v)
    elif order == 6:
        (<uint64_t*>blk)[i] = htobe64(v)
    else:
        bits = 1U << order
        per = 8 // bits
        shift = (i % per) * bits
        blk[i // per] = <uint8_t>((blk[i // per] & ~(((1U << bits) - 1) << shift)) | (v << shift))


cdef inline bint is_meta(Q2 *q, uint64_t c) noexcept nogil:
    return c < q.meta_n and (q.meta[c >> 3] >> (c & 7)) & 1


cdef int rc_init(Q2 *q, uint64_t rt_clusters, uint64_t rb_cache) noexcept nogil
cdef void rc_release(Q2 *q) noexcept nogil
cdef int meta_set(Q2 *q, uint64_t c, uint64_t n, bint on) noexcept nogil
cdef int64_t rc_get(Q2 *q, uint64_t c) noexcept nogil
cdef int rc_set(Q2 *q, uint64_t c, uint64_t v) noexcept nogil
cdef int rc_inc(Q2 *q, uint64_t c) noexcept nogil
cdef int64_t stored_rc(Q2 *q, uint64_t c) noexcept nogil
cdef int64_t alloc(Q2 *q, uint64_t n) noexcept nogil
cdef int add_free(Q2 *q, uint64_t c) noexcept nogil
cdef int free_entry(Q2 *q, uint64_t e) noexcept nogil
cdef int apply_frees(Q2 *q) noexcept nogil
cdef int write_refcounts(Q2 *q, bint barrier) noexcept nogil
cdef int rebuild_refcounts(Q2 *q, const uint32_t *refs, uint64_t nb) noexcept nogil
