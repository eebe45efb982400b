# cython: language_level=3
"""Directory requests answered in C: OPENDIR, READDIR and READDIRPLUS (RELEASEDIR is a
RELEASE), as `pyhv.share.meta` answers them: a directory is opened through its O_PATH
descriptor ("." below it); listings come straight from getdents64 at the client's offset (a
d_off cookie); READDIRPLUS looks up each entry the client does not hold yet (one lookup
counted, as LOOKUP would) and sends '.', '..' and inodes it holds already as plain entries
(nodeid 0), since a lookup there would only repeat work the client has done. Entries that
vanish between getdents and their lookup are left out. One lock orders all listings (each
is an lseek + getdents on the open directory's offset)."""

from libc.errno cimport errno, EBADF
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int32_t, int64_t
from libc.string cimport memcpy, memset, strlen
from posix.fcntl cimport O_RDONLY, O_DIRECTORY, O_CLOEXEC
from posix.unistd cimport lseek

from hvcore.fs.attr cimport Times, IdAxis, fill_entry_st, reply_header
from hvcore.fs.dirent cimport align8, put_dirent
from hvcore.fs.files cimport FileTable
from hvcore.fs.lookup cimport lookup_fd
from hvcore.fs.inodes cimport NodeTable
from hvcore.includes.dirent cimport dirent64, getdents64
from hvcore.includes.fcntl cimport openat
from hvcore.includes.fuse cimport (fuse_in_header, fuse_out_header, fuse_read_in,
                                   fuse_open_out, fuse_direntplus,
                                   FUSE_NAME_OFFSET, FUSE_NAME_OFFSET_DIRENTPLUS)
from hvcore.includes.stat cimport stat
from hvcore.includes.sys cimport (pthread_mutex_t, pthread_mutex_init, pthread_mutex_lock,
                                  pthread_mutex_unlock)

DEF DENTS_BUF = 32768
DEF S_IFMT = 0o170000
DEF S_IFDIR = 0o040000

cdef pthread_mutex_t _listing
pthread_mutex_init(&_listing, NULL)



cdef Py_ssize_t opendir(NodeTable nodes, FileTable files, const fuse_in_header *h,
                        const uint8_t *req, Py_ssize_t n, uint8_t *out,
                        uint32_t open_flags) noexcept nogil:
    cdef Py_ssize_t ohdr = sizeof(fuse_out_header)
    cdef int pfd = -1, err = 0
    if n < <Py_ssize_t>(sizeof(fuse_in_header) + 8):
        return 0
    cdef int32_t s = nodes._pin(h.nodeid, &pfd, &err)
    if s < 0:
        return reply_header(out, h.unique, err, ohdr)
    cdef int fd = openat(pfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    if fd < 0:
        err = errno
        nodes._unpin(s)
        return reply_header(out, h.unique, err, ohdr)
    cdef uint64_t fh = files._add(fd, s)        # the request's pin is now the directory's
    if fh == 0:
        nodes._unpin(s)
        return 0
    cdef fuse_open_out *o = <fuse_open_out *>(out + ohdr)
    memset(o, 0, sizeof(fuse_open_out))
    o.fh = fh
    o.open_flags = open_flags
    return reply_header(out, h.unique, 0, ohdr + sizeof(fuse_open_out))


cdef Py_ssize_t readdir(NodeTable nodes, FileTable files, const fuse_in_header *h,
                        const fuse_read_in *rd, uint8_t *out, Py_ssize_t cap, bint plus,
                        const Times *t, const IdAxis *u, const IdAxis *g) noexcept nogil:
    """READDIR / READDIRPLUS of an open directory into `out` (at most `cap` bytes)."""
    cdef Py_ssize_t ohdr = sizeof(fuse_out_header)
    cdef size_t size = rd.size, used = 0, budget = 0, rec, namelen
    cdef uint8_t dents[DENTS_BUF]
    cdef ssize_t got, pos
    cdef dirent64 *d
    cdef fuse_direntplus *e
    cdef int fd, err = 0
    cdef bint full = False, dot
    cdef const char *nm
    cdef stat st
    cdef uint64_t nodeid, dev = 0
    cdef int32_t slot = files._node_of(rd.fh)
    if <Py_ssize_t>size > cap - ohdr:
        size = cap - ohdr
    fd = files._pin(rd.fh, 0)
    if fd < 0 or slot < 0:
        if fd >= 0:
            files._unpin(rd.fh)
        return reply_header(out, h.unique, EBADF, ohdr)
    dev = nodes._peek(slot).dev
    pthread_mutex_lock(&_listing)
    if lseek(fd, <int64_t>rd.offset, 0) < 0:
        err = errno
    while not err and not full:
        got = getdents64(fd, dents, DENTS_BUF)
        if got < 0:
            err = errno
        if got <= 0:
            break
        pos = 0
        while pos < got:
            d = <dirent64 *>(dents + pos)
            if d.d_reclen == 0 or pos + d.d_reclen > got:
                break
            namelen = strlen(d.d_name)
            rec = align8((FUSE_NAME_OFFSET_DIRENTPLUS if plus else FUSE_NAME_OFFSET) + namelen)
            if budget + rec > size:
                full = True
                break
            budget += rec
            pos += d.d_reclen
            if not plus:
                put_dirent(out + ohdr + used, d, namelen, rec)
                used += rec
                continue
            e = <fuse_direntplus *>(out + ohdr + used)
            nm = d.d_name
            dot = nm[0] == 46 and (namelen == 1 or (namelen == 2 and nm[1] == 46))   # . ..
            if dot or nodes._known(dev, d.d_ino):
                memset(e, 0, rec)               # a plain entry: nodeid 0, no attributes
                e.dirent.ino = d.d_ino
            else:
                if lookup_fd(nodes, fd, d.d_name, &st, &nodeid, NULL) != 0:
                    continue                    # gone since getdents
                memset(e, 0, rec)
                fill_entry_st(&e.entry_out, nodeid, &st, t, u, g, h.uid, h.gid)
                e.dirent.ino = st.st_ino
            e.dirent.off = <uint64_t>d.d_off
            e.dirent.namelen = <uint32_t>namelen
            e.dirent.type = d.d_type
            memcpy(<char *>e + FUSE_NAME_OFFSET_DIRENTPLUS, d.d_name, namelen)
            used += rec
    pthread_mutex_unlock(&_listing)
    files._unpin(rd.fh)
    if err:
        return reply_header(out, h.unique, err, ohdr)
    return reply_header(out, h.unique, 0, ohdr + used)
