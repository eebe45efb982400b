# cython: language_level=3
"""Address-range dispatch for port I/O and MMIO exits.

Every device is reached through a range, never through special cases in the run loop
(crosvm's Bus). Lookup is a binary search over an immutable table that `add` replaces
atomically, so vCPU threads dispatch without the GIL and without locks. Devices written
in Cython provide a C handler and run without the GIL; Python devices (cold paths) are
wrapped by `PyDevice`, which takes the GIL only for them.
"""

cimport cython
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memset


cdef class BusDevice:
    """Base of devices the bus can call: `fn(ctx, offset, data, size, is_write)`."""

    def __cinit__(self, *args, **kwargs):
        self.fn = NULL
        self.ctx = NULL


cdef int _py_handler(void* ctx, uint64_t offset, uint8_t* data, uint32_t size,
                     bint is_write) noexcept nogil:
    with gil:
        return (<PyDevice>ctx)._call(offset, data, size, is_write)


cdef class PyDevice(BusDevice):
    """Adapts a Python object with `read(offset, size) -> int` and
    `write(offset, size, value)` to the bus. An exception is kept in `.error` and ends the
    vCPU's run with a device-error exit, so the machine can report it."""

    cdef readonly object obj
    cdef public object error

    def __init__(self, obj):
        self.obj = obj
        self.error = None
        self.fn = _py_handler
        self.ctx = <void*>self

    cdef int _call(self, uint64_t offset, uint8_t* data, uint32_t size, bint is_write):
        cdef uint32_t i
        cdef uint64_t value = 0
        try:
            if is_write:
                for i in range(size):
                    value |= (<uint64_t>data[i]) << (8 * i)
                self.obj.write(offset, size, value)
            else:
                value = self.obj.read(offset, size)
                for i in range(size):
                    data[i] = (value >> (8 * i)) & 0xff
            return 0
        except BaseException as e:
            self.error = e
            return -1


@cython.no_gc_clear   # __dealloc__ needs _tables to free them
cdef class Bus:
    """Ranges `[base, base+length)` mapped to devices; one bus for PIO, one for MMIO."""

    def __cinit__(self, str name="bus"):
        self.name = name
        self._tables = []
        self._devices = []
        self.table = NULL
        self.unhandled = 0
        self.last_unhandled = 0
        self._publish([])

    def __dealloc__(self):
        cdef object t
        for t in self._tables:
            PyMem_Free(<void*><size_t>t)
        self._tables = []

    cdef _publish(self, list entries):
        cdef int n = len(entries)
        cdef BusTable* t = <BusTable*>PyMem_Malloc(sizeof(BusTable) + n * sizeof(BusRange))
        cdef BusDevice dev
        cdef int i
        if t == NULL:
            raise MemoryError()
        t.n = n
        for i, (base, end, dev) in enumerate(entries):
            t.ranges[i].base = base
            t.ranges[i].end = end
            t.ranges[i].fn = dev.fn
            t.ranges[i].ctx = dev.ctx
        self._tables.append(<size_t>t)
        self.table = t          # a single pointer store: readers see the old or the new table

    def add(self, uint64_t base, uint64_t length, device) -> None:
        """Map a device (a BusDevice, or any object with read/write) at [base, base+length)."""
        cdef BusDevice dev = device if isinstance(device, BusDevice) else PyDevice(device)
        if length == 0 or base + length < base:
            raise ValueError(f"{self.name}: empty or wrapping range at {base:#x}")
        if dev.fn == NULL:
            raise TypeError(f"{type(device).__name__} has no bus handler")
        for b, e, d in self._devices:
            if base < e and b < base + length:
                raise ValueError(f"{self.name}: {base:#x}+{length:#x} overlaps "
                                 f"{type(d).__name__} at {b:#x}-{e - 1:#x}")
        self._devices.append((base, base + length, dev))
        self._devices.sort(key=lambda t: t[0])
        self._publish(self._devices)

    def remove(self, uint64_t base) -> None:
        """Unmap the device whose range starts at `base`."""
        before = len(self._devices)
        self._devices = [t for t in self._devices if t[0] != base]
        if len(self._devices) == before:
            raise KeyError(f"{self.name}: nothing mapped at {base:#x}")
        self._publish(self._devices)

    def devices(self):
        """[(base, end, device)] in address order; PyDevice wrappers are unwrapped."""
        return [(b, e, d.obj if isinstance(d, PyDevice) else d) for b, e, d in self._devices]

    def errors(self):
        """Exceptions kept by Python devices (cleared as they are returned)."""
        out = []
        for _, _, d in self._devices:
            if isinstance(d, PyDevice) and d.error is not None:
                out.append(d.error)
                d.error = None
        return out

    cdef int dispatch(self, uint64_t addr, uint8_t* data, uint32_t size,
                      bint is_write) noexcept nogil:
        cdef BusTable* t = self.table
        cdef int lo = 0, hi = t.n - 1, mid
        while lo <= hi:
            mid = (lo + hi) >> 1
            if addr < t.ranges[mid].base:
                hi = mid - 1
            elif addr >= t.ranges[mid].end:
                lo = mid + 1
            else:
                return t.ranges[mid].fn(t.ranges[mid].ctx, addr - t.ranges[mid].base,
                                        data, size, is_write)
        # Nothing there: reads float high as on a real bus, writes are dropped.
        self.unhandled += 1
        self.last_unhandled = addr
        if not is_write:
            memset(data, 0xff, size)
        return 0

    def access(self, uint64_t addr, uint32_t size, bint is_write, uint64_t value=0) -> int:
        """Dispatch one access from Python (tests, tools); returns the value read."""
        cdef uint8_t buf[8]
        cdef uint32_t i
        cdef uint64_t out = 0
        if not 1 <= size <= 8:
            raise ValueError("access size must be 1 to 8 bytes")
        for i in range(size):
            buf[i] = (value >> (8 * i)) & 0xff
        if self.dispatch(addr, buf, size, is_write) < 0:
            errs = self.errors()
            raise errs[0] if errs else RuntimeError(f"{self.name}: device failed at {addr:#x}")
        for i in range(size):
            out |= (<uint64_t>buf[i]) << (8 * i)
        return out
