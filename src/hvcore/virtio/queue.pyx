# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Split virtqueues (virtio 1.x, section 2.7) over guest memory, device side: take the
driver's descriptor chains, hand their buffers to a device, return them through the used
ring, and decide when the driver wants an interrupt (VIRTIO_F_EVENT_IDX or the flags).

The driver is not trusted. Every index is checked against its table, every buffer against
guest memory (a buffer that goes on into the next region is split, as QEMU does), and a
chain is bounded: no more descriptors than its table holds (so a loop ends), no more than
VQ_MAX_SEGS buffers, device-writable buffers only after device-readable ones, at most
4 GiB in all, indirect tables only when negotiated, never nested, sized in whole
descriptors. The first violation breaks the queue: `take` returns the error from then on
and the transport puts the device in NEEDS_RESET; nothing outside guest memory is read or
written, and other queues go on. Each descriptor is copied once before it is checked, so
a driver rewriting it meanwhile cannot slip a different one past the checks."""

from cpython.buffer cimport PyBUF_READ, PyBUF_WRITE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from hvcore.includes.virtio cimport (VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT,
                                     VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
                                     VRING_USED_F_NO_NOTIFY, vq_acquire, vq_full, vq_load16,
                                     vq_release, vq_store16)
from hvcore.virtio.memmap cimport MemMap

# why an indirect descriptor was refused (err_b of VQ_E_INDIRECT)
cdef enum:
    IND_NO_FEATURE = 1
    IND_WITH_NEXT = 2
    IND_SIZE = 3
    IND_NESTED = 4
    IND_NOT_HEAD = 5


class VirtqueueError(OSError):
    """The driver broke the ring protocol; the message names the queue and the field."""


cdef class SplitQueue:
    """One virtqueue of `size` entries (a power of two, at most VQ_MAX_SIZE)."""

    def __cinit__(self, MemMap mem not None, int index, int size, bint event_idx=False,
                  bint indirect=False):
        if size < 1 or size > VQ_MAX_SIZE or size & (size - 1):
            raise ValueError(f"virtqueue {index}: size {size} is not a power of two "
                             f"up to {VQ_MAX_SIZE}")
        self.mem, self.index, self.size = mem, index, size
        self.event_idx, self.indirect = event_idx, indirect

    def set_rings(self, uint64_t desc, uint64_t avail, uint64_t used) -> None:
        """The rings' guest-physical addresses (the driver's queue_desc/driver/device)."""
        cdef uint64_t n = self.size
        cdef uint8_t *d = self.mem.gpa_ptr(desc, 16 * n)
        cdef uint8_t *a = self.mem.gpa_ptr(avail, 6 + 2 * n)
        cdef uint8_t *u = self.mem.gpa_ptr(used, 6 + 8 * n)
        if desc % 16 or avail % 2 or used % 4:
            raise VirtqueueError(f"virtqueue {self.index}: misaligned rings (descriptors "
                                 f"{desc:#x}, driver {avail:#x}, device {used:#x})")
        if d == NULL or a == NULL or u == NULL:
            raise VirtqueueError(f"virtqueue {self.index}: rings outside guest memory "
                                 f"(descriptors {desc:#x}, driver {avail:#x}, "
                                 f"device {used:#x}, size {n})")
        self.desc, self.avail, self.used = <vring_desc *>d, <vring_avail *>a, <vring_used *>u
        self.used_idx = self.signalled = vq_load16(&self.used.idx)
        self.ready = True

    def reset(self) -> None:
        """Back to the state after device reset: no rings, indexes 0, no error."""
        self.desc, self.avail, self.used = NULL, NULL, NULL
        self.last_avail = self.used_idx = self.signalled = 0
        self.ready = False
        self.err = 0

    @property
    def base(self) -> int:
        """The next avail entry to take (vhost-user GET_VRING_BASE)."""
        return self.last_avail

    @base.setter
    def base(self, int value) -> None:
        self.last_avail = value

    cdef int _fail(self, int code, uint64_t a, uint64_t b, uint64_t c) noexcept nogil:
        if not self.err:
            self.err, self.err_a, self.err_b, self.err_c = code, a, b, c
        return -self.err

    cdef int _map(self, VqChain *c, uint64_t addr, uint32_t length, bint write,
                  uint64_t di) noexcept nogil:
        """Append one descriptor's buffer to `c` (split where guest memory is)."""
        cdef uint64_t got = 0, left = length, start = addr
        cdef uint8_t *p
        if length == 0:
            return self._fail(VQ_E_ZERO, di, 0, 0)
        if not write and c.nwrite:
            return self._fail(VQ_E_ORDER, di, 0, 0)
        if write:
            c.write_len += length
        else:
            c.read_len += length
        if c.read_len + c.write_len > 0xFFFFFFFFULL:
            return self._fail(VQ_E_TOTAL, c.head, 0, 0)
        while left:
            p = self.mem.gpa_span(addr, left, &got)
            if p == NULL:
                return self._fail(VQ_E_ADDR, di, start, length)
            if c.nread + c.nwrite == VQ_MAX_SEGS:
                return self._fail(VQ_E_SEGS, c.head, 0, 0)
            c.buf[c.nread + c.nwrite].ptr = p
            c.buf[c.nread + c.nwrite].len = <uint32_t>got
            if write:
                c.nwrite += 1
            else:
                c.nread += 1
            addr += got
            left -= got
        return 0

    cdef int take(self, VqChain *c) noexcept nogil:
        """Take the next chain: 1 with `c` filled, 0 when none waits, -VqErr once the
        queue is broken (this chain or an earlier one)."""
        cdef uint16_t avail_idx, head
        cdef uint32_t i, count = 0, tsize = self.size
        cdef const vring_desc *table = self.desc
        cdef vring_desc d
        cdef int rc
        if self.err:
            return -self.err
        if not self.ready:
            return 0
        avail_idx = vq_load16(&self.avail.idx)
        if avail_idx == self.last_avail:
            return 0
        if <uint16_t>(avail_idx - self.last_avail) > self.size:
            return self._fail(VQ_E_AVAIL_IDX, self.last_avail, avail_idx, self.size)
        vq_acquire()                    # the ring entry and descriptors after the index
        head = self.avail.ring[self.last_avail & (self.size - 1)]
        if head >= self.size:
            return self._fail(VQ_E_HEAD, head, 0, self.size)
        c.head, c.nread, c.nwrite, c.read_len, c.write_len = head, 0, 0, 0, 0
        i = head
        d = table[i]
        if d.flags & VRING_DESC_F_INDIRECT:
            if not self.indirect:
                return self._fail(VQ_E_INDIRECT, head, IND_NO_FEATURE, 0)
            if d.flags & VRING_DESC_F_NEXT:
                return self._fail(VQ_E_INDIRECT, head, IND_WITH_NEXT, 0)
            if d.len == 0 or d.len % 16 or d.len // 16 > VQ_MAX_SIZE:
                return self._fail(VQ_E_INDIRECT, head, IND_SIZE, d.len)
            table = <const vring_desc *>self.mem.gpa_ptr(d.addr, d.len)
            if table == NULL:
                return self._fail(VQ_E_INDIRECT_ADDR, head, d.addr, d.len)
            tsize = d.len // 16
            i = 0
        while True:
            count += 1
            if count > tsize:
                return self._fail(VQ_E_LOOP, head, 0, tsize)
            d = table[i]                # one copy: what is checked is what is used
            if d.flags & VRING_DESC_F_INDIRECT:
                return self._fail(VQ_E_INDIRECT, head,
                                  IND_NESTED if table != self.desc else IND_NOT_HEAD, 0)
            rc = self._map(c, d.addr, d.len, d.flags & VRING_DESC_F_WRITE, i)
            if rc:
                return rc
            if not d.flags & VRING_DESC_F_NEXT:
                break
            if d.next >= tsize:
                return self._fail(VQ_E_NEXT, i, d.next, tsize)
            i = d.next
        self.last_avail += 1
        return 1

    cdef void put(self, uint16_t head, uint32_t written) noexcept nogil:
        """Return a chain (`written` bytes stored in its writable buffers); the driver
        sees it at the next `publish`."""
        cdef uint16_t slot = self.used_idx & (self.size - 1)
        self.used.ring[slot].id = head
        self.used.ring[slot].len = written
        self.used_idx += 1

    cdef void publish(self) noexcept nogil:
        vq_release()                    # the used entries before the index
        vq_store16(&self.used.idx, self.used_idx)

    cdef bint want_interrupt(self) noexcept nogil:
        """Whether the driver asked to be told of what was published since the last call
        (used_event with EVENT_IDX, else the avail ring's flag); never when nothing was."""
        cdef uint16_t event, new = self.used_idx, old = self.signalled
        if new == old:
            return False
        self.signalled = new
        vq_full()                       # the used index before the driver's request
        if self.event_idx:
            event = vq_load16(&self.avail.ring[self.size])
            return <uint16_t>(new - event - 1) < <uint16_t>(new - old)
        return not (vq_load16(&self.avail.flags) & VRING_AVAIL_F_NO_INTERRUPT)

    cdef void kicks(self, bint on) noexcept nogil:
        """Ask the driver for (or spare it) notifications of new chains; after turning
        them on, check for chains again (one may have come before the driver saw it)."""
        if self.event_idx:
            if on:
                vq_store16(<uint16_t *>&self.used.ring[self.size], self.last_avail)
        else:
            vq_store16(&self.used.flags, 0 if on else VRING_USED_F_NO_NOTIFY)
        vq_full()

    # ---- for Python devices and the tests

    @property
    def error(self) -> str | None:
        """What broke the queue, in one line, or None."""
        if not self.err:
            return None
        a, b, c = self.err_a, self.err_b, self.err_c
        why = {
            VQ_E_AVAIL_IDX: f"the driver's avail index jumped from {a} to {b} "
                            f"(queue size {c})",
            VQ_E_HEAD: f"chain head {a} is outside the queue ({c} entries)",
            VQ_E_NEXT: f"descriptor {a}: next index {b} is outside its table "
                       f"({c} entries)",
            VQ_E_LOOP: f"the chain from head {a} has more descriptors than its table "
                       f"({c}): a loop",
            VQ_E_ADDR: f"descriptor {a}: buffer {b:#x}+{c:#x} is outside guest memory",
            VQ_E_ZERO: f"descriptor {a}: zero-length buffer",
            VQ_E_ORDER: f"descriptor {a}: a device-readable buffer after a "
                        "device-writable one",
            VQ_E_TOTAL: f"the chain from head {a} holds more than 4 GiB",
            VQ_E_SEGS: f"the chain from head {a} maps to more than {VQ_MAX_SEGS} "
                       "guest buffers",
            VQ_E_INDIRECT: f"head {a}: " + {
                IND_NO_FEATURE: "an indirect descriptor, but VIRTIO_F_INDIRECT_DESC was "
                                "not negotiated",
                IND_WITH_NEXT: "an indirect descriptor with the NEXT flag",
                IND_SIZE: f"an indirect table of {c} bytes (not a whole number of "
                          f"descriptors, or more than {VQ_MAX_SIZE})",
                IND_NESTED: "an indirect descriptor inside an indirect table",
                IND_NOT_HEAD: "an indirect descriptor inside a chain",
            }.get(b, "a bad indirect descriptor"),
            VQ_E_INDIRECT_ADDR: f"head {a}: indirect table {b:#x}+{c:#x} is outside guest "
                                "memory",
        }.get(self.err, f"error {self.err}")
        return f"virtqueue {self.index}: {why}"

    def pop(self):
        """The next chain as (head, readable buffers, writable buffers), memoryviews over
        guest memory; None when no chain waits. VirtqueueError once the queue is broken."""
        cdef VqChain *c = <VqChain *>PyMem_Malloc(sizeof(VqChain))
        cdef int rc
        if c == NULL:
            raise MemoryError()
        try:
            with nogil:
                rc = self.take(c)
            if rc < 0:
                raise VirtqueueError(self.error)
            if rc == 0:
                return None
            return self.views(c)
        finally:
            PyMem_Free(c)

    cdef tuple views(self, VqChain *c):
        """(head, readable, writable): a chain's buffers as memoryviews of guest memory."""
        cdef uint32_t k
        bufs = [PyMemoryView_FromMemory(<char *>c.buf[k].ptr, c.buf[k].len,
                                        PyBUF_READ if k < c.nread else PyBUF_WRITE)
                for k in range(c.nread + c.nwrite)]
        return c.head, bufs[:c.nread], bufs[c.nread:]

    def push(self, int head, int written) -> None:
        """Return one chain and publish it."""
        if not self.ready:
            raise VirtqueueError(f"virtqueue {self.index}: not set up")
        if not 0 <= head < self.size:
            raise ValueError(f"virtqueue {self.index}: head {head} outside the queue")
        self.put(head, written)
        self.publish()

    def has_chains(self) -> bool:
        """Whether the driver has published a chain not taken yet."""
        return self.ready and vq_load16(&self.avail.idx) != self.last_avail

    def interrupt_wanted(self) -> bool:
        return self.want_interrupt()

    def notifications(self, bint on) -> None:
        self.kicks(on)
