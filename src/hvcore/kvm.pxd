from libc.stdint cimport uint8_t, uint32_t, uint64_t
from hvcore.includes.kvm cimport kvm_run
from hvcore.includes.sys cimport pthread_t
from hvcore.bus cimport Bus


cdef class Kvm:
    cdef int fd
    cdef readonly int vcpu_mmap_size


cdef class Vm:
    cdef int fd
    cdef readonly Kvm kvm
    cdef list _vcpus
    cdef list _memory


cdef class Vcpu:
    cdef int fd
    cdef readonly int index
    cdef kvm_run* krun
    cdef int run_size
    cdef Bus pio
    cdef Bus mmio
    cdef volatile int stop_requested
    cdef volatile int in_run
    cdef pthread_t thread
    cdef int last_errno
    cdef readonly uint64_t exits
    cdef int _loop(self) noexcept nogil
