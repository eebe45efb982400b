# C declarations from <sys/inotify.h>: the event record the host watch decodes, and watches.
from libc.stdint cimport uint32_t, int32_t


cdef extern from "<sys/inotify.h>" nogil:
    struct inotify_event:
        int32_t wd
        uint32_t mask
        uint32_t cookie
        uint32_t len
        char name[1]
    int inotify_add_watch(int fd, const char *path, unsigned int mask)
    int inotify_rm_watch(int fd, int wd)
