# hvcore.virtio.memmap: where guest memory is in this process, for the virtqueues.
from libc.stdint cimport uint8_t, uint64_t

cdef enum:
    MAX_MEM_REGIONS = 32            # vhost-user's VHOST_USER_MAX_RAM_SLOTS

cdef struct MemRegion:
    uint64_t gpa                    # guest-physical start
    uint64_t size
    uint64_t uaddr                  # the frontend's user address (vhost-user ring addresses)
    uint8_t *host                   # mapped here

cdef class MemMap:
    cdef MemRegion r[MAX_MEM_REGIONS]
    cdef int n
    cdef list keep                  # what keeps each mapping alive
    cdef _add(self, uint64_t gpa, uint64_t size, uint64_t uaddr, uint8_t *host)
    cdef uint8_t *gpa_span(self, uint64_t gpa, uint64_t length, uint64_t *got) noexcept nogil
    cdef uint8_t *gpa_ptr(self, uint64_t gpa, uint64_t length) noexcept nogil
