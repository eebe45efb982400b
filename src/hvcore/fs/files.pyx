# cython: language_level=3
"""The open files: descriptors by FUSE file handle, and READ / WRITE served from them.

`FileTable` owns every open file's descriptor (`fh` = generation << 32 | slot + 1, so a
stale handle never finds a reused slot) and the slot of the inode the file holds
(`hvcore.fs.inodes`, released by the caller at RELEASE). READ / WRITE are answered from the
request buffer into a preallocated reply buffer without the GIL, one pread / pwrite each;
a large READ (readahead's 128 KiB) is spliced from the file into /dev/fuse behind its reply
header instead (`_splice_read`: one copy of the data instead of two, about a quarter more
sequential read throughput); anything unusual (another opcode, an unknown handle, odd sizes)
is left to the Python handler.
"""

from libc.errno cimport errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t, int32_t
from libc.stdlib cimport realloc, free
from libc.string cimport memset
from posix.uio cimport iovec, preadv, pwritev
from posix.unistd cimport pread, pwrite, close, read, write

from hvcore.fs.attr cimport reply_header
from hvcore.includes.fcntl cimport AT_EMPTY_PATH, splice
from hvcore.includes.fuse cimport (fuse_in_header, fuse_out_header, fuse_read_in,
                                   fuse_write_in, fuse_write_out, FUSE_READ, FUSE_WRITE,
                                   FUSE_WRITE_KILL_SUIDGID)
from hvcore.includes.stat cimport stat, fstatat
from hvcore.includes.sys cimport (adaptive_mutex_init, pthread_mutex_destroy,
                                  pthread_mutex_lock, pthread_mutex_unlock)

cdef uint64_t MAX_OFFSET = (<uint64_t>1 << 63) - 1


cdef inline bint _for_python(const fuse_write_in *wr) noexcept nogil:
    """A WRITE the Python handler answers: KILL_SUIDGID, or offsets past 2**63."""
    return (wr.write_flags & FUSE_WRITE_KILL_SUIDGID or wr.offset > MAX_OFFSET
            or wr.offset + wr.size > MAX_OFFSET)


cdef inline Py_ssize_t _write_reply(uint8_t *out, uint64_t unique, int err,
                                    ssize_t written) noexcept nogil:
    """WRITE's reply into `out`: the error alone, or fuse_write_out with the size."""
    cdef Py_ssize_t ohdr = sizeof(fuse_out_header)
    if err:
        return reply_header(out, unique, err, ohdr)
    memset(out + ohdr, 0, 8)
    (<fuse_write_out *>(out + ohdr)).size = <uint32_t>written
    return reply_header(out, unique, 0, ohdr + 8)


cdef int _trim(iovec *v, int n, size_t size) noexcept nogil:
    """The first iovecs of `v` holding `size` bytes (the last one shortened): their count."""
    cdef int i
    for i in range(n):
        if v[i].iov_len >= size:
            v[i].iov_len = size
            return i + 1
        size -= v[i].iov_len
    return n
DEF SPLICE_MIN = 32768          # smaller reads: one copy more costs less than two syscalls


cdef class FileTable:
    """Open files by FUSE file handle. `add(fd, node)` hands out a handle and owns the
    descriptor from then on; `remove(fh)` closes it (after any READ / WRITE still using it).
    `serve(req, out)` answers READ and WRITE."""

    def __cinit__(self):
        adaptive_mutex_init(&self.lock)
        self.cap = 0
        self.slots = NULL
        self.hint = 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.cap):
            if self.slots[i].fd >= 0:
                close(self.slots[i].fd)
        free(self.slots)
        pthread_mutex_destroy(&self.lock)

    cdef uint64_t _add(self, int fd, int32_t node) noexcept nogil:
        """A new handle for `fd` (owned from now on); 0 when out of memory (fd closed)."""
        cdef Py_ssize_t i, n
        cdef Slot *grown
        pthread_mutex_lock(&self.lock)
        for n in range(self.cap):
            i = (self.hint + n) % self.cap
            if self.slots[i].fd < 0:
                break
        else:
            n = self.cap * 2 if self.cap else 64
            grown = <Slot *>realloc(self.slots, n * sizeof(Slot))
            if grown == NULL:
                pthread_mutex_unlock(&self.lock)
                close(fd)
                return 0
            memset(grown + self.cap, 0, (n - self.cap) * sizeof(Slot))
            for i in range(self.cap, n):
                grown[i].fd = -1
            i = self.cap
            self.slots, self.cap = grown, n
        self.slots[i].fd = fd
        self.slots[i].pins = 0
        self.slots[i].closing = 0
        self.slots[i].written = 0
        self.slots[i].node = node
        self.slots[i].gen += 1
        self.hint = i + 1
        cdef uint64_t fh = (<uint64_t>self.slots[i].gen << 32) | <uint64_t>(i + 1)
        pthread_mutex_unlock(&self.lock)
        return fh

    cdef int _remove(self, uint64_t fh, stat *st, bint *written, int32_t *node) noexcept nogil:
        """Forget `fh` and close its descriptor (now, or when the last READ / WRITE using it
        ends): 1, with whether it was written, its inode slot and (when `st` is not NULL and
        it was written) its stat before the close; 0 for an unknown handle."""
        cdef int fd = -1
        cdef Slot *sl
        pthread_mutex_lock(&self.lock)
        sl = self._slot(fh)
        if sl == NULL:
            pthread_mutex_unlock(&self.lock)
            return 0
        written[0] = sl.written
        node[0] = sl.node
        if sl.written and sl.node >= 0 and self.nodes is not None:
            self.nodes._writers(sl.node, -1)
        if st != NULL and sl.written:
            fstatat(sl.fd, "", st, AT_EMPTY_PATH)
        if sl.pins:
            sl.closing = 1
        else:
            fd, sl.fd = sl.fd, -1
        pthread_mutex_unlock(&self.lock)
        if fd >= 0:
            close(fd)
        return 1

    cdef int32_t _node_of(self, uint64_t fh) noexcept nogil:
        """The inode slot of an open handle; -2 for an unknown handle."""
        pthread_mutex_lock(&self.lock)
        cdef Slot *sl = self._slot(fh)
        cdef int32_t r = sl.node if sl != NULL else -2
        pthread_mutex_unlock(&self.lock)
        return r

    def add(self, int fd, int32_t node=-1) -> int:
        cdef uint64_t fh = self._add(fd, node)
        if fh == 0:
            raise MemoryError()
        return fh

    def remove(self, uint64_t fh):
        """Forget `fh` (closing its descriptor): (written, inode slot), or None if unknown."""
        cdef bint written = 0
        cdef int32_t node = -1
        if not self._remove(fh, NULL, &written, &node):
            return None
        return written, node

    def info(self, uint64_t fh):
        """(fd, inode slot) of an open handle, or None. The descriptor stays the table's."""
        pthread_mutex_lock(&self.lock)
        cdef Slot *sl = self._slot(fh)
        r = None if sl == NULL else (sl.fd, sl.node)
        pthread_mutex_unlock(&self.lock)
        return r

    def written(self, uint64_t fh) -> bool:
        pthread_mutex_lock(&self.lock)
        cdef Slot *sl = self._slot(fh)
        cdef bint w = sl != NULL and sl.written
        pthread_mutex_unlock(&self.lock)
        return w

    def mark_written(self, uint64_t fh) -> None:
        """A write the Python handler made (the stamp is taken at RELEASE)."""
        pthread_mutex_lock(&self.lock)
        cdef Slot *sl = self._slot(fh)
        if sl != NULL:
            self._mark_written(sl)
        pthread_mutex_unlock(&self.lock)

    def handles(self) -> list:
        """Every open handle (for closing them all at shutdown)."""
        cdef Py_ssize_t i
        pthread_mutex_lock(&self.lock)
        out = [(<uint64_t>self.slots[i].gen << 32) | <uint64_t>(i + 1)
               for i in range(self.cap) if self.slots[i].fd >= 0 and not self.slots[i].closing]
        pthread_mutex_unlock(&self.lock)
        return out

    cdef int32_t _flushed(self, uint64_t fh, stat *st) noexcept nogil:
        """FLUSH (the client's close): the inode slot of an open handle (-2 for an unknown
        one), and in `st`, when the handle was written, the file's stat now (st_size stays
        -1 otherwise)."""
        pthread_mutex_lock(&self.lock)
        cdef Slot *sl = self._slot(fh)
        cdef int32_t r = sl.node if sl != NULL else -2
        st.st_size = -1
        if sl != NULL and sl.written and fstatat(sl.fd, "", st, AT_EMPTY_PATH) < 0:
            st.st_size = -1
        pthread_mutex_unlock(&self.lock)
        return r

    cdef void _mark_written(self, Slot *sl) noexcept nogil:
        """With the lock held: the file is written through (its inode counts it until the
        file is removed, so the host watch takes its IN_MODIFY events for ours)."""
        if not sl.written:
            sl.written = 1
            if sl.node >= 0 and self.nodes is not None:
                self.nodes._writers(sl.node, 1)

    cdef Slot *_slot(self, uint64_t fh) noexcept nogil:
        """With the lock held: the live slot of `fh`, or NULL."""
        cdef uint64_t i = ((fh << 32) >> 32) - 1
        if ((fh << 32) >> 32) == 0 or i >= <uint64_t>self.cap:
            return NULL
        cdef Slot *sl = &self.slots[i]
        if sl.fd < 0 or sl.closing or sl.gen != <uint32_t>(fh >> 32):
            return NULL
        return sl

    cdef int _pin(self, uint64_t fh, bint write) noexcept nogil:
        cdef int fd = -1
        pthread_mutex_lock(&self.lock)
        cdef Slot *sl = self._slot(fh)
        if sl != NULL:
            sl.pins += 1
            if write:
                self._mark_written(sl)
            fd = sl.fd
        pthread_mutex_unlock(&self.lock)
        return fd

    cdef void _unpin(self, uint64_t fh) noexcept nogil:
        cdef int fd = -1
        cdef uint64_t i = ((fh << 32) >> 32) - 1
        pthread_mutex_lock(&self.lock)
        cdef Slot *sl = &self.slots[i]        # pinned: the slot exists and is not reused
        sl.pins -= 1
        if sl.pins == 0 and sl.closing:
            fd, sl.fd, sl.closing = sl.fd, -1, 0
        pthread_mutex_unlock(&self.lock)
        if fd >= 0:
            close(fd)

    cdef Py_ssize_t _serve(self, const uint8_t *req, Py_ssize_t n, uint8_t *out,
                           Py_ssize_t cap) noexcept nogil:
        """Answer one READ / WRITE into `out`; returns the reply length, or 0 when the request
        is for the Python handler (another opcode, an unknown handle, anything odd)."""
        cdef const fuse_in_header *h = <const fuse_in_header *>req
        cdef const fuse_read_in *rd
        cdef const fuse_write_in *wr
        cdef Py_ssize_t hdr = sizeof(fuse_in_header), ohdr = sizeof(fuse_out_header)
        cdef ssize_t r
        cdef int fd, err = 0
        if not self.enabled or n < hdr + <Py_ssize_t>sizeof(fuse_read_in) or h.len != n:
            return 0
        if h.opcode == FUSE_READ:
            rd = <const fuse_read_in *>(req + hdr)
            if (rd.size > self.max_io or <Py_ssize_t>rd.size > cap - ohdr
                    or rd.offset > MAX_OFFSET):
                return 0
            fd = self._pin(rd.fh, 0)
            if fd < 0:
                return 0
            r = pread(fd, out + ohdr, rd.size, <int64_t>rd.offset)
            if r < 0:
                err = errno
            self._unpin(rd.fh)
            return reply_header(out, h.unique, err, ohdr + (r if r > 0 else 0))
        if h.opcode == FUSE_WRITE and self.writable:
            wr = <const fuse_write_in *>(req + hdr)
            if (<Py_ssize_t>wr.size != n - hdr - <Py_ssize_t>sizeof(fuse_write_in)
                    or _for_python(wr) or cap < ohdr + 8):
                return 0
            fd = self._pin(wr.fh, 1)
            if fd < 0:
                return 0
            r = pwrite(fd, req + hdr + sizeof(fuse_write_in), wr.size, <int64_t>wr.offset)
            if r < 0:
                err = errno
            self._unpin(wr.fh)
            return _write_reply(out, h.unique, err, r)
        return 0

    cdef Py_ssize_t _serve_vec(self, const uint8_t *req, Py_ssize_t n, iovec *data,
                               int ndata, Py_ssize_t room, uint8_t *out) noexcept nogil:
        """READ / WRITE whose data is not behind the request but in `data` (`room` bytes
        of guest pages: where a READ's data goes, what a WRITE writes): `req` holds the
        header and read_in / write_in only. The reply header (and write_out) go to `out`;
        returns the reply's whole length (for READ, the data included), or 0 when the
        request is for the Python handler, with the same checks as `_serve`."""
        cdef const fuse_in_header *h = <const fuse_in_header *>req
        cdef const fuse_read_in *rd
        cdef const fuse_write_in *wr
        cdef Py_ssize_t hdr = sizeof(fuse_in_header), ohdr = sizeof(fuse_out_header)
        cdef ssize_t r
        cdef int fd, err = 0
        if not self.enabled or n < hdr + <Py_ssize_t>sizeof(fuse_read_in):
            return 0
        if h.opcode == FUSE_READ and h.len == n:
            rd = <const fuse_read_in *>(req + hdr)
            if rd.size > self.max_io or <Py_ssize_t>rd.size > room or rd.offset > MAX_OFFSET:
                return 0
            ndata = _trim(data, ndata, rd.size)
            fd = self._pin(rd.fh, 0)
            if fd < 0:
                return 0
            r = preadv(fd, data, ndata, <int64_t>rd.offset)
            if r < 0:
                err = errno
            self._unpin(rd.fh)
            return reply_header(out, h.unique, err, ohdr + (r if r > 0 else 0))
        if h.opcode == FUSE_WRITE and self.writable and \
                n == hdr + <Py_ssize_t>sizeof(fuse_write_in):
            wr = <const fuse_write_in *>(req + hdr)
            if <Py_ssize_t>wr.size != room or h.len != n + room or _for_python(wr):
                return 0
            fd = self._pin(wr.fh, 1)
            if fd < 0:
                return 0
            r = pwritev(fd, data, ndata, <int64_t>wr.offset)
            if r < 0:
                err = errno
            self._unpin(wr.fh)
            return _write_reply(out, h.unique, err, r)
        return 0

    cdef int _splice_read(self, const uint8_t *req, Py_ssize_t n, int devfd, int pr,
                          int pw, Py_ssize_t pipe_cap, uint8_t *out) noexcept nogil:
        """Answer a large READ by splicing the file's pages into `devfd` behind the reply
        header (host page cache -> the client's pages, one copy instead of pread's and
        write's two): 1 when answered, 0 when it goes the usual way. `pr`/`pw` is this
        reader's empty non-blocking pipe of `pipe_cap` bytes."""
        cdef const fuse_in_header *h = <const fuse_in_header *>req
        cdef const fuse_read_in *rd = <const fuse_read_in *>(req + sizeof(fuse_in_header))
        cdef fuse_out_header oh
        cdef stat st
        cdef int64_t off
        cdef ssize_t r, got = 0, length
        cdef int fd
        if (pr < 0 or not self.enabled or h.opcode != FUSE_READ or h.len != n
                or n < <Py_ssize_t>(sizeof(fuse_in_header) + sizeof(fuse_read_in))
                or rd.size < SPLICE_MIN or rd.size > self.max_io or rd.offset > MAX_OFFSET
                # each page a pipe buffer, one for the header, one for an unaligned start
                or (<Py_ssize_t>rd.size // 4096 + 2) * 4096 > pipe_cap):
            return 0
        fd = self._pin(rd.fh, 0)
        if fd < 0:
            return 0
        if fstatat(fd, "", &st, AT_EMPTY_PATH) < 0 or st.st_size <= <int64_t>rd.offset:
            self._unpin(rd.fh)
            return 0
        length = <ssize_t>min(<int64_t>rd.size, st.st_size - <int64_t>rd.offset)
        if length < SPLICE_MIN:
            self._unpin(rd.fh)
            return 0
        oh.len = <uint32_t>(sizeof(fuse_out_header) + length)
        oh.error = 0
        oh.unique = h.unique
        if write(pw, &oh, sizeof(oh)) != sizeof(oh):
            self._unpin(rd.fh)
            _drain(pr, out)
            return 0
        off = <int64_t>rd.offset
        while got < length:
            r = splice(fd, &off, pw, NULL, length - got, 0)
            if r <= 0:
                break
            got += r
        self._unpin(rd.fh)
        if got == length:
            if splice(pr, NULL, devfd, NULL, sizeof(oh) + length, 0) < 0:
                _drain(pr, out)         # ENOENT: interrupted meanwhile; nobody waits
            return 1
        # the file shrank meanwhile (or splice failed): send what the pipe holds
        r = read(pr, out, sizeof(oh) + got)
        _drain(pr, out)
        if r >= <ssize_t>sizeof(oh):
            (<fuse_out_header *>out).len = <uint32_t>r
            write(devfd, out, r)
            return 1
        return 0

    def serve(self, req, out) -> int:
        """Answer a READ / WRITE request into `out`: the reply length, or 0 when the request
        is for the Python handler."""
        cdef const uint8_t[::1] rq = req
        cdef uint8_t[::1] o = out
        if rq.shape[0] == 0 or o.shape[0] == 0:
            return 0
        cdef const uint8_t *rp = &rq[0]
        cdef uint8_t *op = &o[0]
        with nogil:
            n = self._serve(rp, rq.shape[0], op, o.shape[0])
        return n


cdef void _drain(int pr, uint8_t *scratch) noexcept nogil:
    """Empty a reader's (non-blocking) pipe after a failed splice."""
    while read(pr, scratch, 65536) > 0:
        pass
