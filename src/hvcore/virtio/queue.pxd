# hvcore.virtio.queue: split virtqueues, cimported by the devices' C paths.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from hvcore.includes.virtio cimport vring_avail, vring_desc, vring_used
from hvcore.virtio.memmap cimport MemMap

cdef enum:
    VQ_MAX_SIZE = 1024              # queue size and chain length limit (QEMU's as well)
    VQ_MAX_SEGS = 1024              # guest buffers one chain may map to

cdef enum VqErr:
    VQ_OK = 0
    VQ_E_AVAIL_IDX = 1              # the driver's avail index ran more than a queue ahead
    VQ_E_HEAD = 2                   # a head index outside the queue
    VQ_E_NEXT = 3                   # a next index outside the queue (or table)
    VQ_E_LOOP = 4                   # a chain longer than its queue or table: a loop
    VQ_E_ADDR = 5                   # a buffer outside guest memory
    VQ_E_ZERO = 6                   # a zero-length buffer
    VQ_E_ORDER = 7                  # a device-readable buffer after a device-writable one
    VQ_E_TOTAL = 8                  # buffers summing to more than 4 GiB
    VQ_E_SEGS = 9                   # more guest buffers than VQ_MAX_SEGS
    VQ_E_INDIRECT = 10              # an indirect table without the feature, nested, or badly sized
    VQ_E_INDIRECT_ADDR = 11         # an indirect table outside guest memory

cdef struct VqBuf:
    uint8_t *ptr
    uint32_t len

cdef struct VqChain:
    uint16_t head
    uint32_t nread                  # buf[0:nread] the device reads
    uint32_t nwrite                 # buf[nread:nread + nwrite] the device writes
    uint64_t read_len, write_len
    VqBuf buf[VQ_MAX_SEGS]

cdef class SplitQueue:
    cdef readonly int index
    cdef readonly uint16_t size
    cdef MemMap mem
    cdef vring_desc *desc
    cdef vring_avail *avail
    cdef vring_used *used
    cdef uint16_t last_avail        # next avail ring slot to take
    cdef uint16_t used_idx          # ours; published to used.idx by publish()
    cdef uint16_t signalled         # used_idx at the last interrupt (EVENT_IDX)
    cdef readonly bint event_idx, indirect, ready
    cdef readonly int err
    cdef uint64_t err_a, err_b, err_c
    cdef int take(self, VqChain *c) noexcept nogil
    cdef void put(self, uint16_t head, uint32_t written) noexcept nogil
    cdef void publish(self) noexcept nogil
    cdef bint want_interrupt(self) noexcept nogil
    cdef void kicks(self, bint on) noexcept nogil
    cdef tuple views(self, VqChain *c)
    cdef int _fail(self, int code, uint64_t a, uint64_t b, uint64_t c) noexcept nogil
    cdef int _map(self, VqChain *c, uint64_t addr, uint32_t length, bint write,
                  uint64_t di) noexcept nogil
