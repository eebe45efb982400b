# FUSE directory records built from getdents64 entries, shared (inline, no module of its
# own, as net.wire.pxd) by the C fast path (fs.dirs), the Python handler's listing (fs.ops)
# and the reply encoders (fs.proto), so the record layout is written once.
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy, memset

from hvcore.includes.dirent cimport dirent64
from hvcore.includes.fuse cimport FUSE_NAME_OFFSET, fuse_dirent


cdef inline size_t align8(size_t n) noexcept nogil:
    return (n + 7) & ~<size_t>7


cdef inline void put_dirent(void *at, const dirent64 *d, size_t namelen,
                            size_t rec) noexcept nogil:
    """The fuse_dirent of `d` at `at`: `rec` bytes (align8(FUSE_NAME_OFFSET + namelen)),
    the padding zeroed."""
    cdef fuse_dirent *f = <fuse_dirent *>at
    memset(f, 0, rec)
    f.ino = d.d_ino
    f.off = <uint64_t>d.d_off
    f.namelen = <uint32_t>namelen
    f.type = d.d_type
    memcpy(<char *>f + FUSE_NAME_OFFSET, d.d_name, namelen)
