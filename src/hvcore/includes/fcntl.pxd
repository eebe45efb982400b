# C declarations from <fcntl.h> (_GNU_SOURCE): the *at calls and fallocate modes the file
# server needs and Python's os module lacks.
from libc.stdint cimport int64_t

cdef extern from "<fcntl.h>" nogil:
    enum:
        AT_EMPTY_PATH
        AT_SYMLINK_NOFOLLOW
        O_NOFOLLOW
        O_PATH
    int openat(int dirfd, const char *path, int flags, ...)
    int fchownat(int dirfd, const char *path, unsigned int uid, unsigned int gid, int flags)
    int fallocate(int fd, int mode, long offset, long length)
    ssize_t splice(int fd_in, int64_t *off_in, int fd_out, int64_t *off_out, size_t len,
                   unsigned int flags)


cdef extern from "<unistd.h>" nogil:
    int unlinkat(int dirfd, const char *path, int flags)
