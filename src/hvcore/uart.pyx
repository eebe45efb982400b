# cython: language_level=3
"""16550A UART: the serial console, entirely without the GIL.

A Linux console writes every byte through THR and polls LSR around it, so this device
is on the hot path of boot output; it runs in the vCPU thread in C. Transmitted bytes
go straight to an fd (terminal or log). Received bytes come from `feed` (the terminal
reader thread) into a bounded FIFO; interrupts are pulsed on IRQ 4 through KVM_IRQ_LINE.
"""

import os

from libc.errno cimport errno, EINTR, EAGAIN
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memset
from posix.unistd cimport write

from hvcore.bus cimport BusDevice
from hvcore.includes.kvm cimport KVM_IRQ_LINE, kvm_irq_level
from hvcore.includes.sys cimport (ioctl, pthread_mutex_t, pthread_mutex_init,
                                  pthread_mutex_destroy, pthread_mutex_lock,
                                  pthread_mutex_unlock)

DEF RX_SIZE = 4096

# register offsets and bits (PC16550D datasheet)
cdef enum:
    IER_RDI = 0x01
    IER_THRI = 0x02
    IIR_NONE = 0x01
    IIR_THRI = 0x02
    IIR_RDI = 0x04
    IIR_FIFO = 0xc0
    LCR_DLAB = 0x80
    LSR_DR = 0x01
    LSR_THRE = 0x20
    LSR_TEMT = 0x40
    MCR_LOOP = 0x10
    MSR_DEFAULT = 0xb0     # DCD | DSR | CTS: a terminal is always attached


cdef struct UartState:
    uint8_t ier, lcr, mcr, lsr_extra, scr, fcr, dll, dlm
    bint thri_pending
    int out_fd
    int vm_fd
    uint32_t irq
    uint8_t rx[RX_SIZE]
    uint32_t rx_head, rx_count
    uint64_t tx_bytes
    int tx_errno
    pthread_mutex_t lock


cdef void _pulse_irq(UartState* s) noexcept nogil:
    cdef kvm_irq_level l
    if s.vm_fd < 0:
        return
    l.irq = s.irq
    l.level = 1
    ioctl(s.vm_fd, KVM_IRQ_LINE, &l)
    l.level = 0
    ioctl(s.vm_fd, KVM_IRQ_LINE, &l)


cdef bint _irq_pending(UartState* s) noexcept nogil:
    return ((s.ier & IER_RDI) and s.rx_count > 0) or ((s.ier & IER_THRI) and s.thri_pending)


cdef void _rx_push(UartState* s, uint8_t b) noexcept nogil:
    if s.rx_count < RX_SIZE:
        s.rx[(s.rx_head + s.rx_count) % RX_SIZE] = b
        s.rx_count += 1


cdef void _transmit(UartState* s, uint8_t b) noexcept nogil:
    cdef long r
    if s.mcr & MCR_LOOP:
        _rx_push(s, b)
        return
    s.tx_bytes += 1
    if s.out_fd < 0:
        return
    while True:
        r = write(s.out_fd, &b, 1)
        if r < 0 and (errno == EINTR or errno == EAGAIN):
            continue
        if r < 0:
            s.tx_errno = errno     # a closed terminal must not stop the guest
        return


cdef int _uart_io(void* ctx, uint64_t offset, uint8_t* data, uint32_t size,
                  bint is_write) noexcept nogil:
    cdef UartState* s = <UartState*>ctx
    cdef uint8_t v = data[0], out = 0
    cdef bint pulse = False
    pthread_mutex_lock(&s.lock)
    if is_write:
        if offset == 0:
            if s.lcr & LCR_DLAB:
                s.dll = v
            else:
                _transmit(s, v)
                s.thri_pending = True     # THR empties at once
                pulse = _irq_pending(s)
        elif offset == 1:
            if s.lcr & LCR_DLAB:
                s.dlm = v
            else:
                # Enabling THRI with THR empty raises the interrupt, as on real hardware.
                if (v & IER_THRI) and not (s.ier & IER_THRI):
                    s.thri_pending = True
                s.ier = v & 0x0f
                pulse = _irq_pending(s)
        elif offset == 2:
            s.fcr = v & 0xc9
            if v & 0x02:
                s.rx_count = 0
        elif offset == 3:
            s.lcr = v
        elif offset == 4:
            s.mcr = v & 0x1f
        elif offset == 7:
            s.scr = v
    else:
        if offset == 0:
            if s.lcr & LCR_DLAB:
                out = s.dll
            elif s.rx_count > 0:
                out = s.rx[s.rx_head]
                s.rx_head = (s.rx_head + 1) % RX_SIZE
                s.rx_count -= 1
                pulse = s.rx_count > 0 and (s.ier & IER_RDI) != 0
        elif offset == 1:
            out = s.dlm if s.lcr & LCR_DLAB else s.ier
        elif offset == 2:
            if (s.ier & IER_RDI) and s.rx_count > 0:
                out = IIR_RDI
            elif (s.ier & IER_THRI) and s.thri_pending:
                out = IIR_THRI
                s.thri_pending = False     # reading IIR clears the THRE source
            else:
                out = IIR_NONE
            if s.fcr & 0x01:
                out |= IIR_FIFO
        elif offset == 3:
            out = s.lcr
        elif offset == 4:
            out = s.mcr
        elif offset == 5:
            out = LSR_THRE | LSR_TEMT | (LSR_DR if s.rx_count > 0 else 0)
        elif offset == 6:
            if s.mcr & MCR_LOOP:
                # loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD
                out = ((s.mcr & 0x01) << 5) | ((s.mcr & 0x02) << 3) \
                    | ((s.mcr & 0x04) << 4) | ((s.mcr & 0x08) << 4)
            else:
                out = MSR_DEFAULT
        elif offset == 7:
            out = s.scr
        memset(data, 0, size)
        data[0] = out
    pthread_mutex_unlock(&s.lock)
    if pulse:
        _pulse_irq(s)
    return 0


cdef class Uart(BusDevice):
    """A 16550A at 8 ports; `out_fd` gets transmitted bytes (-1 drops them)."""

    cdef UartState st

    def __cinit__(self, int out_fd=-1, int vm_fd=-1, uint32_t irq=4):
        memset(&self.st, 0, sizeof(UartState))
        pthread_mutex_init(&self.st.lock, NULL)
        self.st.out_fd = out_fd
        self.st.vm_fd = vm_fd
        self.st.irq = irq
        self.st.tx_errno = 0
        self.fn = _uart_io
        self.ctx = &self.st

    def __dealloc__(self):
        pthread_mutex_destroy(&self.st.lock)

    def feed(self, const uint8_t[::1] data) -> int:
        """Queue received bytes (from the terminal); returns how many fit in the FIFO."""
        cdef uint32_t i, n = data.shape[0], taken = 0
        cdef bint pulse
        with nogil:
            pthread_mutex_lock(&self.st.lock)
            for i in range(n):
                if self.st.rx_count >= RX_SIZE:
                    break
                _rx_push(&self.st, data[i])
                taken += 1
            pulse = taken > 0 and (self.st.ier & IER_RDI) != 0
            pthread_mutex_unlock(&self.st.lock)
            if pulse:
                _pulse_irq(&self.st)
        return taken

    @property
    def tx_bytes(self) -> int:
        return self.st.tx_bytes

    @property
    def tx_error(self) -> str | None:
        """Why output was dropped, if writing to the terminal or log ever failed."""
        return os.strerror(self.st.tx_errno) if self.st.tx_errno else None

    @property
    def rx_pending(self) -> int:
        return self.st.rx_count
