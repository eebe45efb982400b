# C declarations from <sys/stat.h>: fstatat(2) and utimensat(2), nanosecond times.
from posix.time cimport timespec


cdef extern from "<sys/stat.h>" nogil:
    ctypedef unsigned long dev_t
    ctypedef unsigned long ino_t
    struct stat:
        dev_t st_dev
        ino_t st_ino
        unsigned long st_nlink
        unsigned int st_mode
        unsigned int st_uid
        unsigned int st_gid
        dev_t st_rdev
        long st_size
        long st_blksize
        long st_blocks
        timespec st_atim
        timespec st_mtim
        timespec st_ctim
    int fstatat(int dirfd, const char *path, stat *buf, int flags)
    int utimensat(int dirfd, const char *path, const timespec *times, int flags)
    enum:
        UTIME_NOW
        UTIME_OMIT
