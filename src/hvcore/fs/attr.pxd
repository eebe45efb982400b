# hvcore.fs.attr: reply pieces the Python encoders (fs.proto) and the C fast paths (fs.fastpath,
# fs.files) both write, so an attribute or header is laid out one way only. nogil inlines.
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from hvcore.includes.fuse cimport fuse_attr, fuse_out_header, fuse_entry_out
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


# --- what an entry carries: the cache mode's timeouts and the id maps -------------------------

cdef struct Times:
    uint64_t entry_sec
    uint64_t attr_sec
    uint32_t entry_nsec
    uint32_t attr_nsec


cdef struct IdAxis:
    int kind                # 0 identity, 1 the caller (osxfs style), 2 ranges
    uint32_t own
    int n
    uint64_t guest[8]
    uint64_t host[8]
    uint64_t count[8]


cdef inline uint32_t to_guest(const IdAxis *a, uint32_t host, uint32_t caller) noexcept nogil:
    """pyhv.share.idmap._Axis.to_guest: host ids outside every range show as 65534."""
    cdef int i
    if a.kind == 0:
        return host
    if a.kind == 1:
        return caller if host == a.own else 65534
    for i in range(a.n):
        if a.host[i] <= host < a.host[i] + a.count[i]:
            return <uint32_t>(a.guest[i] + host - a.host[i])
    return 65534


cdef inline bint to_host(const IdAxis *a, uint32_t guest, uint32_t *host) noexcept nogil:
    """pyhv.share.idmap._Axis.to_host; False when the guest id has no host id."""
    cdef int i
    if guest == <uint32_t>-1 or a.kind == 0:       # UNCHANGED
        host[0] = guest
        return 1
    if a.kind == 1:
        host[0] = a.own
        return 1
    for i in range(a.n):
        if a.guest[i] <= guest < a.guest[i] + a.count[i]:
            host[0] = <uint32_t>(a.host[i] + guest - a.guest[i])
            return 1
    return 0


cdef inline void fill_entry_st(fuse_entry_out *e, uint64_t nodeid, const stat *st,
                               const Times *t, const IdAxis *u, const IdAxis *g,
                               uint32_t caller_uid, uint32_t caller_gid) noexcept nogil:
    """A fuse_entry_out (zeroed by the caller) for a looked-up inode."""
    e.nodeid = nodeid
    e.entry_valid, e.entry_valid_nsec = t.entry_sec, t.entry_nsec
    e.attr_valid, e.attr_valid_nsec = t.attr_sec, t.attr_nsec
    fill_attr_st(&e.attr, st, to_guest(u, st.st_uid, caller_uid),
                 to_guest(g, st.st_gid, caller_gid))
