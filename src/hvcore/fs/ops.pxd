# hvcore.fs.ops: what other hvcore modules cimport (the reply encoders read Stat's struct).
from hvcore.includes.stat cimport stat


cdef class Stat:
    cdef stat st


cdef long _open_beneath(int dirfd, const char *p, int flags, int mode,
                        int *err) noexcept nogil
