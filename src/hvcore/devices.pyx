# cython: language_level=3
"""Small devices that must run without the GIL: the exit-path probe used by tests and
benchmarks (it answers reads with a constant and counts every access)."""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

from hvcore.bus cimport BusDevice


cdef struct ProbeState:
    uint64_t reads
    uint64_t writes
    uint64_t last_value
    uint64_t last_offset
    uint64_t read_value


cdef int _probe_io(void* ctx, uint64_t offset, uint8_t* data, uint32_t size,
                   bint is_write) noexcept nogil:
    cdef ProbeState* s = <ProbeState*>ctx
    cdef uint64_t v = 0
    s.last_offset = offset
    if is_write:
        memcpy(&v, data, size)
        s.last_value = v
        s.writes += 1
    else:
        memcpy(data, &s.read_value, size)
        s.reads += 1
    return 0


cdef class Probe(BusDevice):
    """Counts reads and writes, remembers the last value written, reads `read_value`."""

    cdef ProbeState st

    def __cinit__(self, uint64_t read_value=0):
        self.st.reads = self.st.writes = self.st.last_value = self.st.last_offset = 0
        self.st.read_value = read_value
        self.fn = _probe_io
        self.ctx = &self.st

    @property
    def reads(self) -> int:
        return self.st.reads

    @property
    def writes(self) -> int:
        return self.st.writes

    @property
    def last_value(self) -> int:
        return self.st.last_value

    @property
    def last_offset(self) -> int:
        return self.st.last_offset
