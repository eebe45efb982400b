# hvcore.qcow2: the open image, cimported by the devices that read and write it in C
# (virtio-blk's queue loop calls do_read / do_write on `q` without the GIL).
from libc.stdint cimport uint64_t

from hvcore.qcow2_io cimport Q2


cdef class Qcow2:
    cdef Q2 q
    cdef bint _locked
    cdef object _backing_read
    cdef object _decompress
    cdef check_writable(self, str what, uint64_t offset, uint64_t length)
