from libc.stdint cimport uint8_t, uint32_t, uint64_t

# A device's access handler: `data` holds `size` little-endian bytes (filled by the handler
# on reads). Returns 0, or -1 when the handler failed (the device keeps the exception).
ctypedef int (*io_handler)(void* ctx, uint64_t offset, uint8_t* data, uint32_t size,
                           bint is_write) noexcept nogil

cdef struct BusRange:
    uint64_t base
    uint64_t end            # exclusive
    io_handler fn
    void* ctx

cdef struct BusTable:
    int n
    BusRange ranges[1]      # really n entries

cdef class BusDevice:
    cdef io_handler fn
    cdef void* ctx

cdef class Bus:
    cdef BusTable* table
    cdef list _tables       # every table ever published, freed at dealloc (readers hold none)
    cdef list _devices
    cdef readonly str name
    cdef readonly uint64_t unhandled
    cdef readonly uint64_t last_unhandled
    cdef _publish(self, list entries)
    cdef int dispatch(self, uint64_t addr, uint8_t* data, uint32_t size,
                      bint is_write) noexcept nogil
