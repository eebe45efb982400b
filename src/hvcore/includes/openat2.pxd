# C declarations from <linux/openat2.h> and <sys/syscall.h>: openat2(2) for lookups that cannot
# leave their directory (glibc 2.36 has no wrapper, so it is called through syscall(2)).
from libc.stdint cimport uint64_t


cdef extern from "<linux/openat2.h>" nogil:
    struct open_how:
        uint64_t flags
        uint64_t mode
        uint64_t resolve
    enum:
        RESOLVE_NO_XDEV
        RESOLVE_NO_MAGICLINKS
        RESOLVE_NO_SYMLINKS
        RESOLVE_BENEATH


cdef extern from "<sys/syscall.h>" nogil:
    enum: SYS_openat2


cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)
