# hvcore.fsattr: reply pieces the Python encoders (fuseproto) and the C fast paths (fsfast,
# fsfiles) both write, so an attribute or header is laid out one way only. nogil inlines.
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from hvcore.includes.fuse cimport fuse_attr, fuse_out_header
from hvcore.includes.stat cimport stat


cdef inline void split_time(double seconds, uint64_t *sec, uint32_t *nsec) noexcept nogil:
    if seconds <= 0:
        sec[0] = 0
        nsec[0] = 0
        return
    sec[0] = <uint64_t>seconds
    nsec[0] = <uint32_t>((seconds - <double>sec[0]) * 1e9)


cdef inline uint64_t dev_major(uint64_t dev) noexcept nogil:
    return ((dev >> 8) & 0xfff) | ((dev >> 32) & ~<uint64_t>0xfff)


cdef inline uint64_t dev_minor(uint64_t dev) noexcept nogil:
    return (dev & 0xff) | ((dev >> 12) & ~<uint64_t>0xff)


cdef inline void fill_attr_st(fuse_attr *a, const stat *st, uint32_t uid,
                              uint32_t gid) noexcept nogil:
    a.ino = st.st_ino
    a.size = st.st_size
    a.blocks = st.st_blocks
    a.atime = st.st_atim.tv_sec
    a.mtime = st.st_mtim.tv_sec
    a.ctime = st.st_ctim.tv_sec
    a.atimensec = st.st_atim.tv_nsec
    a.mtimensec = st.st_mtim.tv_nsec
    a.ctimensec = st.st_ctim.tv_nsec
    a.mode = st.st_mode
    a.nlink = <uint32_t>st.st_nlink
    a.uid = uid
    a.gid = gid
    # new_encode_dev: the 32-bit rdev form the FUSE client decodes
    a.rdev = <uint32_t>((dev_minor(st.st_rdev) & 0xff) | (dev_major(st.st_rdev) << 8)
                        | ((dev_minor(st.st_rdev) & ~0xff) << 12))
    a.blksize = <uint32_t>st.st_blksize
    a.flags = 0


cdef inline Py_ssize_t reply_header(uint8_t *out, uint64_t unique, int err,
                                    Py_ssize_t total) noexcept nogil:
    """Fill the out header; returns `total` (the reply length)."""
    cdef fuse_out_header *o = <fuse_out_header *>out
    o.len = <uint32_t>total
    o.error = -err
    o.unique = unique
    return total
