# C declarations from <sys/timerfd.h> that hvcore uses and Cython's bundled posix/*.pxd lack.
from posix.time cimport itimerspec


cdef extern from "<sys/timerfd.h>" nogil:
    int timerfd_create(int clockid, int flags)
    int timerfd_settime(int fd, int flags, const itimerspec *new_value, itimerspec *old_value)
    enum: TFD_NONBLOCK, TFD_CLOEXEC, TFD_TIMER_ABSTIME
