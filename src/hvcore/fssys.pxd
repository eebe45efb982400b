# C declarations the share's fast paths need that hvcore/includes does not have yet
# (kept here, next to their only users; they belong in includes/ once others need them).
cdef extern from "<unistd.h>" nogil:
    int unlinkat(int dirfd, const char *path, int flags)


cdef extern from "<sys/inotify.h>" nogil:
    int inotify_add_watch(int fd, const char *path, unsigned int mask)
    int inotify_rm_watch(int fd, int wd)


cdef extern from "<unistd.h>" nogil:
    unsigned int geteuid()


cdef extern from "<fcntl.h>" nogil:
    enum: O_PATH


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutexattr_t:
        pass
    int pthread_mutexattr_init(pthread_mutexattr_t *attr)
    int pthread_mutexattr_settype(pthread_mutexattr_t *attr, int kind)
    enum: PTHREAD_MUTEX_ADAPTIVE_NP
