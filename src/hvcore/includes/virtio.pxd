# C declarations from <linux/virtio_ring.h> (split virtqueues, virtio 1.x: little-endian,
# which is the host's order on the x86 hosts pyhv runs on) and the memory fences the ring
# protocol needs between a driver on another CPU and the device.
from libc.stdint cimport uint16_t, uint32_t, uint64_t


cdef extern from "<linux/virtio_ring.h>" nogil:
    enum:
        VRING_DESC_F_NEXT
        VRING_DESC_F_WRITE
        VRING_DESC_F_INDIRECT
        VRING_USED_F_NO_NOTIFY
        VRING_AVAIL_F_NO_INTERRUPT
        VIRTIO_RING_F_INDIRECT_DESC
        VIRTIO_RING_F_EVENT_IDX
    struct vring_desc:
        uint64_t addr
        uint32_t len
        uint16_t flags
        uint16_t next
    struct vring_avail:
        uint16_t flags
        uint16_t idx
        uint16_t ring[1]
    struct vring_used_elem:
        uint32_t id
        uint32_t len
    struct vring_used:
        uint16_t flags
        uint16_t idx
        vring_used_elem ring[1]


cdef extern from *:
    """
    /* acquire: what the driver wrote before publishing an index is visible after reading
       it; release: what we wrote is visible before the index we publish; full: a store
       (used idx) ordered before a later load (used_event), as vring_need_event needs */
    #define pyhv_vq_acquire() __atomic_thread_fence(__ATOMIC_ACQUIRE)
    #define pyhv_vq_release() __atomic_thread_fence(__ATOMIC_RELEASE)
    #define pyhv_vq_full() __atomic_thread_fence(__ATOMIC_SEQ_CST)
    static inline uint16_t pyhv_vq_load16(const volatile uint16_t *p) { return *p; }
    static inline void pyhv_vq_store16(volatile uint16_t *p, uint16_t v) { *p = v; }
    """
    void vq_acquire "pyhv_vq_acquire"() nogil
    void vq_release "pyhv_vq_release"() nogil
    void vq_full "pyhv_vq_full"() nogil
    uint16_t vq_load16 "pyhv_vq_load16"(const uint16_t *p) nogil
    void vq_store16 "pyhv_vq_store16"(uint16_t *p, uint16_t v) nogil
