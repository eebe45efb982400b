# C declarations from <sys/mman.h>, <sys/ioctl.h>, <signal.h>, <pthread.h>, <errno.h>, <time.h>,
# <poll.h>
# that hvcore uses and Cython's bundled posix/*.pxd lack.
from libc.stdint cimport uint64_t


cdef extern from "<sys/mman.h>" nogil:
    int memfd_create(const char *name, unsigned int flags)
    enum: MFD_CLOEXEC


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    pthread_t pthread_self()
    int pthread_kill(pthread_t thread, int sig)


cdef extern from "<signal.h>" nogil:
    int SIGRTMIN


cdef extern from "<time.h>" nogil:
    enum: CLOCK_MONOTONIC


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    ctypedef struct pthread_cond_t:
        pass
    int pthread_cond_init(pthread_cond_t *c, const void *attr)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_broadcast(pthread_cond_t *c)


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutexattr_t:
        pass
    int pthread_mutexattr_init(pthread_mutexattr_t *attr)
    int pthread_mutexattr_settype(pthread_mutexattr_t *attr, int kind)
    int pthread_mutexattr_destroy(pthread_mutexattr_t *attr)
    enum: PTHREAD_MUTEX_ADAPTIVE_NP


cdef inline int adaptive_mutex_init(pthread_mutex_t *m) noexcept nogil:
    """A mutex for short critical sections: spins a little before sleeping."""
    cdef pthread_mutexattr_t attr
    cdef int rc
    pthread_mutexattr_init(&attr)
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP)
    rc = pthread_mutex_init(m, &attr)
    pthread_mutexattr_destroy(&attr)
    return rc


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
