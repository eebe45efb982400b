# cython: language_level=3
"""KVM through its ioctl API: the system, a VM, and vCPUs with their run loop.

The run loop releases the GIL around KVM_RUN and stays without it for port I/O and MMIO
exits, which it decodes here and dispatches through a `Bus` (uvloop's shape: keep the int
result of the blocking call, raise only after taking the GIL back). Every other exit
returns to Python, which decides what it means for the machine.
"""

import os

from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.errno cimport errno, EINTR, EAGAIN, ENOENT, EACCES, EPERM
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memset, memcpy
from posix.fcntl cimport open as c_open, O_RDWR, O_CLOEXEC
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED
from posix.signal cimport sigaction_t, sigaction, sigemptyset
from posix.unistd cimport close

from hvcore.includes.kvm cimport *
from hvcore.includes.sys cimport ioctl, pthread_self, pthread_kill, SIGRTMIN
from hvcore.bus cimport Bus
from hvcore.errors import HvError, KvmUnavailable


# Exits the run loop reports beyond KVM's own reasons.
cdef enum:
    C_EXIT_STOPPED = -1       # request_stop() was called
    C_EXIT_DEVICE_ERROR = -2  # a device handler raised; the bus keeps the exception
    C_EXIT_ERRNO = -3         # KVM_RUN failed; `last_errno` says why

EXIT_STOPPED = C_EXIT_STOPPED
EXIT_DEVICE_ERROR = C_EXIT_DEVICE_ERROR
EXIT_ERRNO = C_EXIT_ERRNO

EXIT_NAMES = {
    KVM_EXIT_UNKNOWN: "UNKNOWN", KVM_EXIT_EXCEPTION: "EXCEPTION", KVM_EXIT_IO: "IO",
    KVM_EXIT_HYPERCALL: "HYPERCALL", KVM_EXIT_DEBUG: "DEBUG", KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO", KVM_EXIT_IRQ_WINDOW_OPEN: "IRQ_WINDOW_OPEN",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN", KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY", KVM_EXIT_INTR: "INTR",
    KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR", KVM_EXIT_SYSTEM_EVENT: "SYSTEM_EVENT",
    EXIT_STOPPED: "STOPPED", EXIT_DEVICE_ERROR: "DEVICE_ERROR", EXIT_ERRNO: "ERRNO",
}
SYSTEM_EVENT_NAMES = {KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown", KVM_SYSTEM_EVENT_RESET: "reset",
                      KVM_SYSTEM_EVENT_CRASH: "crash"}
INTERNAL_ERROR_NAMES = {1: "emulation failure", 2: "simultaneous exceptions",
                        3: "unexpected exit while delivering an event",
                        4: "unexpected exit reason"}

# Capabilities pyhv relies on, checked when /dev/kvm is opened.
REQUIRED_CAPS = {
    "KVM_CAP_IRQCHIP": KVM_CAP_IRQCHIP,
    "KVM_CAP_USER_MEMORY": KVM_CAP_USER_MEMORY,
    "KVM_CAP_SET_TSS_ADDR": KVM_CAP_SET_TSS_ADDR,
    "KVM_CAP_SET_IDENTITY_MAP_ADDR": KVM_CAP_SET_IDENTITY_MAP_ADDR,
    "KVM_CAP_EXT_CPUID": KVM_CAP_EXT_CPUID,
    "KVM_CAP_PIT2": KVM_CAP_PIT2,
    "KVM_CAP_IMMEDIATE_EXIT": KVM_CAP_IMMEDIATE_EXIT,
    "KVM_CAP_IOEVENTFD": KVM_CAP_IOEVENTFD,
    "KVM_CAP_IRQFD": KVM_CAP_IRQFD,
}
OPTIONAL_CAPS = {"KVM_CAP_XCRS": KVM_CAP_XCRS, "KVM_CAP_NR_VCPUS": KVM_CAP_NR_VCPUS,
                 "KVM_CAP_MAX_VCPUS": KVM_CAP_MAX_VCPUS,
                 "KVM_CAP_NR_MEMSLOTS": KVM_CAP_NR_MEMSLOTS}

KICK_SIGNAL = SIGRTMIN + 2   # interrupts KVM_RUN in a vCPU thread; its handler does nothing


cdef void _kick_handler(int sig) noexcept nogil:
    pass


cdef bint _kick_installed = False

cdef _install_kick_handler():
    """A no-op handler without SA_RESTART, so the kick makes KVM_RUN return EINTR."""
    global _kick_installed
    cdef sigaction_t sa
    if _kick_installed:
        return
    memset(&sa, 0, sizeof(sa))
    sa.sa_handler = _kick_handler
    sigemptyset(&sa.sa_mask)
    sa.sa_flags = 0
    if sigaction(KICK_SIGNAL, &sa, NULL) != 0:
        _raise_errno("sigaction")
    _kick_installed = True


cdef int _raise_errno(str what) except -1:
    cdef int e = errno
    raise HvError(f"{what} failed: {os.strerror(e)}", e)


cdef int _ioctl_checked(int fd, unsigned long req, void* arg, str what) except -1:
    cdef int r
    with nogil:
        r = ioctl(fd, req, arg)
    if r < 0:
        _raise_errno(what)
    return r


cdef class Kvm:
    """/dev/kvm: API version and capability checks, supported CPUID, VM creation."""

    def __cinit__(self, path="/dev/kvm", required=None):
        self.fd = -1
        bpath = os.fsencode(path)
        self.fd = c_open(bpath, O_RDWR | O_CLOEXEC)
        if self.fd < 0:
            e = errno
            if e == ENOENT:
                raise KvmUnavailable(f"{path} does not exist: KVM is not available on this host "
                                     "(load kvm_intel or kvm_amd, or enable virtualization "
                                     "in the firmware / nested virtualization in the VM)")
            if e in (EACCES, EPERM):
                raise KvmUnavailable(f"permission denied opening {path}: add your user to the "
                                     "'kvm' group (sudo usermod -aG kvm $USER) and log in again")
            raise KvmUnavailable(f"cannot open {path}: {os.strerror(e)}")
        version = ioctl(self.fd, KVM_GET_API_VERSION, 0)
        if version != KVM_API_VERSION:
            raise KvmUnavailable(f"{path} speaks KVM API version {version}, pyhv needs "
                                 f"{KVM_API_VERSION}")
        caps = dict(REQUIRED_CAPS if required is None else required)
        missing = [name for name, cap in caps.items() if self.check_extension(cap) <= 0]
        if missing:
            raise KvmUnavailable(f"{path} lacks required capabilit"
                                 f"{'y' if len(missing) == 1 else 'ies'}: {', '.join(missing)}")
        self.vcpu_mmap_size = ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE, 0)
        if self.vcpu_mmap_size <= 0:
            _raise_errno("KVM_GET_VCPU_MMAP_SIZE")

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)

    def check_extension(self, int cap) -> int:
        return ioctl(self.fd, KVM_CHECK_EXTENSION, <unsigned long>cap)

    def capabilities(self) -> dict:
        """{name: value} for every capability pyhv knows about (doctor's report)."""
        return {n: self.check_extension(c) for n, c in {**REQUIRED_CAPS, **OPTIONAL_CAPS}.items()}

    @property
    def api_version(self) -> int:
        return ioctl(self.fd, KVM_GET_API_VERSION, 0)

    def supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID as [(function, index, flags, eax, ebx, ecx, edx)]."""
        cdef int n = 256
        cdef kvm_cpuid2* c
        while True:
            c = <kvm_cpuid2*>PyMem_Malloc(sizeof(kvm_cpuid2) + n * sizeof(kvm_cpuid_entry2))
            if c == NULL:
                raise MemoryError()
            memset(c, 0, sizeof(kvm_cpuid2) + n * sizeof(kvm_cpuid_entry2))
            c.nent = n
            try:
                if ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, c) == 0:
                    return [(c.entries[i].function, c.entries[i].index, c.entries[i].flags,
                             c.entries[i].eax, c.entries[i].ebx, c.entries[i].ecx,
                             c.entries[i].edx) for i in range(c.nent)]
                if errno != 7:  # E2BIG: try a larger array
                    _raise_errno("KVM_GET_SUPPORTED_CPUID")
            finally:
                PyMem_Free(c)
            n *= 2

    def create_vm(self) -> Vm:
        return Vm(self)


cdef class Vm:
    """A VM file descriptor: memory slots, in-kernel irqchip and PIT, vCPUs, IRQ lines."""

    def __cinit__(self, Kvm kvm not None):
        self.fd = -1
        self.kvm = kvm
        self._vcpus = []
        self._memory = []
        self.fd = ioctl(kvm.fd, KVM_CREATE_VM, 0)
        if self.fd < 0:
            _raise_errno("KVM_CREATE_VM")

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)

    @property
    def fd(self) -> int:
        return self.fd

    def set_tss_addr(self, uint64_t addr) -> None:
        """Three pages KVM needs for real-mode emulation on Intel; must lie outside RAM."""
        _ioctl_checked(self.fd, KVM_SET_TSS_ADDR, <void*><size_t>addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, uint64_t addr) -> None:
        cdef uint64_t a = addr
        _ioctl_checked(self.fd, KVM_SET_IDENTITY_MAP_ADDR, &a, "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        _ioctl_checked(self.fd, KVM_CREATE_IRQCHIP, NULL, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        cdef kvm_pit_config cfg
        memset(&cfg, 0, sizeof(cfg))
        cfg.flags = KVM_PIT_SPEAKER_DUMMY
        _ioctl_checked(self.fd, KVM_CREATE_PIT2, &cfg, "KVM_CREATE_PIT2")

    def set_memory_region(self, uint32_t slot, uint64_t gpa, uint64_t size,
                          uint64_t host_addr, owner=None) -> None:
        """Register host memory as guest RAM; `owner` is kept alive as long as the VM."""
        cdef kvm_userspace_memory_region r
        memset(&r, 0, sizeof(r))
        r.slot = slot
        r.guest_phys_addr = gpa
        r.memory_size = size
        r.userspace_addr = host_addr
        _ioctl_checked(self.fd, KVM_SET_USER_MEMORY_REGION, &r, "KVM_SET_USER_MEMORY_REGION")
        self._memory.append(owner)

    def irq_line(self, uint32_t irq, uint32_t level) -> None:
        cdef kvm_irq_level l
        l.irq = irq
        l.level = level
        _ioctl_checked(self.fd, KVM_IRQ_LINE, &l, "KVM_IRQ_LINE")

    def create_vcpu(self, int index, Bus pio not None, Bus mmio not None) -> Vcpu:
        vcpu = Vcpu(self, index, pio, mmio)
        self._vcpus.append(vcpu)
        return vcpu


cdef class Vcpu:
    """One vCPU: registers, CPUID, MSRs, and the run loop (call `run` from its own thread)."""

    def __cinit__(self, Vm vm not None, int index, Bus pio not None, Bus mmio not None):
        cdef void* p
        self.fd = -1
        self.krun = NULL
        self.index = index
        self.pio = pio
        self.mmio = mmio
        self.stop_requested = 0
        self.in_run = 0
        self.exits = 0
        self.fd = ioctl(vm.fd, KVM_CREATE_VCPU, <unsigned long>index)
        if self.fd < 0:
            _raise_errno(f"KVM_CREATE_VCPU {index}")
        self.run_size = vm.kvm.vcpu_mmap_size
        p = mmap(NULL, self.run_size, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd, 0)
        if p == MAP_FAILED:
            _raise_errno("mmap of kvm_run")
        self.krun = <kvm_run*>p
        _install_kick_handler()

    def __dealloc__(self):
        if self.krun != NULL:
            munmap(self.krun, self.run_size)
        if self.fd >= 0:
            close(self.fd)

    # ---- registers -------------------------------------------------------------------

    def get_regs(self) -> dict:
        cdef kvm_regs r
        _ioctl_checked(self.fd, KVM_GET_REGS, &r, "KVM_GET_REGS")
        return r

    def set_regs(self, **values) -> None:
        """Set general registers by name (rip=..., rsp=..., rflags=...); others kept."""
        cdef kvm_regs r
        _ioctl_checked(self.fd, KVM_GET_REGS, &r, "KVM_GET_REGS")
        cdef dict d = r
        unknown = set(values) - set(d)
        if unknown:
            raise KeyError(f"unknown registers: {', '.join(sorted(unknown))}")
        d.update(values)
        r = d
        _ioctl_checked(self.fd, KVM_SET_REGS, &r, "KVM_SET_REGS")

    def get_sregs(self) -> dict:
        cdef kvm_sregs s
        _ioctl_checked(self.fd, KVM_GET_SREGS, &s, "KVM_GET_SREGS")
        return s

    def set_sregs(self, **values) -> None:
        """Set special registers by name; segments and tables are dicts merged into the
        current value (so callers name only the fields they mean)."""
        cdef kvm_sregs s
        _ioctl_checked(self.fd, KVM_GET_SREGS, &s, "KVM_GET_SREGS")
        cdef dict d = s
        for k, v in values.items():
            if k not in d:
                raise KeyError(f"unknown special register {k}")
            if isinstance(v, dict):
                d[k].update(v)
            else:
                d[k] = v
        s = d
        _ioctl_checked(self.fd, KVM_SET_SREGS, &s, "KVM_SET_SREGS")

    def set_cpuid(self, entries) -> None:
        """KVM_SET_CPUID2 from [(function, index, flags, eax, ebx, ecx, edx)]."""
        cdef int n = len(entries), i = 0
        cdef kvm_cpuid2* c = <kvm_cpuid2*>PyMem_Malloc(
            sizeof(kvm_cpuid2) + n * sizeof(kvm_cpuid_entry2))
        if c == NULL:
            raise MemoryError()
        try:
            memset(c, 0, sizeof(kvm_cpuid2) + n * sizeof(kvm_cpuid_entry2))
            c.nent = n
            for e in entries:
                (c.entries[i].function, c.entries[i].index, c.entries[i].flags,
                 c.entries[i].eax, c.entries[i].ebx, c.entries[i].ecx, c.entries[i].edx) = e
                i += 1
            _ioctl_checked(self.fd, KVM_SET_CPUID2, c, "KVM_SET_CPUID2")
        finally:
            PyMem_Free(c)

    def _msrs(self, unsigned long req, list pairs):
        cdef int n = len(pairs), i, r
        cdef kvm_msrs* m = <kvm_msrs*>PyMem_Malloc(sizeof(kvm_msrs) + n * sizeof(kvm_msr_entry))
        if m == NULL:
            raise MemoryError()
        try:
            memset(m, 0, sizeof(kvm_msrs) + n * sizeof(kvm_msr_entry))
            m.nmsrs = n
            for i in range(n):
                m.entries[i].index = pairs[i][0]
                m.entries[i].data = pairs[i][1]
            r = _ioctl_checked(self.fd, req, m, "KVM_SET_MSRS" if req == KVM_SET_MSRS
                               else "KVM_GET_MSRS")
            return r, [(m.entries[i].index, m.entries[i].data) for i in range(n)]
        finally:
            PyMem_Free(m)

    def set_msrs(self, pairs) -> None:
        """Set MSRs [(index, value)]; names the first one KVM refused."""
        pairs = list(pairs)
        done, _ = self._msrs(KVM_SET_MSRS, pairs)
        if done < len(pairs):
            raise HvError(f"KVM_SET_MSRS refused MSR {pairs[done][0]:#x} "
                          f"(value {pairs[done][1]:#x})")

    def get_msrs(self, indices) -> dict:
        pairs = [(i, 0) for i in indices]
        done, out = self._msrs(KVM_GET_MSRS, pairs)
        return dict(out[:done])

    def set_fpu(self, uint16_t fcw=0x37f, uint32_t mxcsr=0x1f80) -> None:
        """The FPU state a CPU has after FNINIT, with SSE exceptions masked."""
        cdef kvm_fpu f
        memset(&f, 0, sizeof(f))
        f.fcw = fcw
        f.mxcsr = mxcsr
        _ioctl_checked(self.fd, KVM_SET_FPU, &f, "KVM_SET_FPU")

    def set_xcr0(self, uint64_t value) -> None:
        cdef kvm_xcrs x
        memset(&x, 0, sizeof(x))
        x.nr_xcrs = 1
        x.xcrs[0].xcr = 0
        x.xcrs[0].value = value
        _ioctl_checked(self.fd, KVM_SET_XCRS, &x, "KVM_SET_XCRS")

    def get_lapic(self) -> bytearray:
        cdef uint8_t regs[1024]
        _ioctl_checked(self.fd, KVM_GET_LAPIC, regs, "KVM_GET_LAPIC")
        return bytearray(regs[:1024])

    def set_lapic(self, const uint8_t[::1] regs) -> None:
        cdef uint8_t buf[1024]
        if regs.shape[0] != 1024:
            raise ValueError("the local APIC state is 1024 bytes")
        memcpy(buf, &regs[0], 1024)
        _ioctl_checked(self.fd, KVM_SET_LAPIC, buf, "KVM_SET_LAPIC")

    # ---- running ----------------------------------------------------------------------

    cdef int _loop(self) noexcept nogil:
        cdef kvm_run* run = self.krun
        cdef uint8_t* data
        cdef uint32_t i
        cdef int r
        while True:
            if self.stop_requested:
                return C_EXIT_STOPPED
            r = ioctl(self.fd, KVM_RUN, 0)
            if r < 0:
                if errno == EINTR or errno == EAGAIN:
                    continue            # kicked: the top of the loop checks for a stop
                self.last_errno = errno
                return C_EXIT_ERRNO
            self.exits += 1
            if run.exit_reason == KVM_EXIT_IO:
                data = <uint8_t*>run + run.io.data_offset
                for i in range(run.io.count):
                    if self.pio.dispatch(run.io.port, data + i * run.io.size, run.io.size,
                                         run.io.direction == KVM_EXIT_IO_OUT) < 0:
                        return C_EXIT_DEVICE_ERROR
            elif run.exit_reason == KVM_EXIT_MMIO:
                if self.mmio.dispatch(run.mmio.phys_addr, run.mmio.data, run.mmio.len,
                                      run.mmio.is_write) < 0:
                    return C_EXIT_DEVICE_ERROR
            elif run.exit_reason == KVM_EXIT_INTR:
                continue
            else:
                return run.exit_reason

    def run(self) -> int:
        """Run until an exit the loop does not handle itself; returns its reason
        (KVM_EXIT_* or EXIT_STOPPED / EXIT_DEVICE_ERROR / EXIT_ERRNO)."""
        cdef int reason
        self.thread = pthread_self()
        self.in_run = 1
        with nogil:
            reason = self._loop()
        self.in_run = 0
        if reason == C_EXIT_ERRNO:
            raise HvError(f"KVM_RUN failed on vCPU {self.index}: "
                          f"{os.strerror(self.last_errno)}", self.last_errno)
        return reason

    def request_stop(self) -> None:
        """Make `run` return EXIT_STOPPED soon, from any thread, at any moment: the flag
        covers a vCPU between runs, immediate_exit one about to enter KVM_RUN, and the
        signal one inside it."""
        self.stop_requested = 1
        self.krun.immediate_exit = 1
        # We hold the GIL, and `run` clears in_run only after taking the GIL back, so a
        # thread seen in_run is alive for the signal.
        if self.in_run:
            pthread_kill(self.thread, KICK_SIGNAL)

    def clear_stop(self) -> None:
        self.stop_requested = 0
        self.krun.immediate_exit = 0

    def exit_info(self) -> dict:
        """The decoded details of the last exit, for messages."""
        cdef kvm_run* run = self.krun
        cdef uint32_t n
        reason = run.exit_reason
        info = {"reason": EXIT_NAMES.get(reason, str(reason)), "code": reason}
        if reason == KVM_EXIT_SYSTEM_EVENT:
            info["event"] = SYSTEM_EVENT_NAMES.get(run.system_event.type,
                                                   str(run.system_event.type))
        elif reason == KVM_EXIT_INTERNAL_ERROR:
            n = min(run.internal.ndata, 16)
            info["suberror"] = run.internal.suberror
            info["suberror_name"] = INTERNAL_ERROR_NAMES.get(run.internal.suberror, "unknown")
            info["data"] = [run.internal.data[i] for i in range(n)]
        elif reason == KVM_EXIT_FAIL_ENTRY:
            info["hardware_entry_failure_reason"] = run.fail_entry.hardware_entry_failure_reason
            info["cpu"] = run.fail_entry.cpu
        elif reason == KVM_EXIT_IO:
            info.update(port=run.io.port, size=run.io.size, count=run.io.count,
                        out=run.io.direction == KVM_EXIT_IO_OUT)
        elif reason == KVM_EXIT_MMIO:
            info.update(address=run.mmio.phys_addr, size=run.mmio.len,
                        write=bool(run.mmio.is_write))
        return info
