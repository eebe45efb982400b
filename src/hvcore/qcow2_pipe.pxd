# <unistd.h> lseek whence values Cython's posix.unistd does not declare (Linux, _GNU_SOURCE).
cdef extern from "<unistd.h>" nogil:
    enum: SEEK_DATA
    enum: SEEK_HOLE
