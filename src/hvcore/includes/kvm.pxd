# C declarations from <linux/kvm.h> (and <asm/kvm.h> through it): only what hvcore uses.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t


cdef extern from "<linux/kvm.h>" nogil:
    enum: KVM_API_VERSION

    # /dev/kvm ioctls
    unsigned long KVM_GET_API_VERSION
    unsigned long KVM_CREATE_VM
    unsigned long KVM_CHECK_EXTENSION
    unsigned long KVM_GET_VCPU_MMAP_SIZE
    unsigned long KVM_GET_SUPPORTED_CPUID
    unsigned long KVM_GET_MSR_INDEX_LIST

    # VM ioctls
    unsigned long KVM_SET_USER_MEMORY_REGION
    unsigned long KVM_SET_TSS_ADDR
    unsigned long KVM_SET_IDENTITY_MAP_ADDR
    unsigned long KVM_CREATE_IRQCHIP
    unsigned long KVM_CREATE_PIT2
    unsigned long KVM_CREATE_VCPU
    unsigned long KVM_IRQ_LINE
    unsigned long KVM_IOEVENTFD
    unsigned long KVM_IRQFD

    # vCPU ioctls
    unsigned long KVM_RUN
    unsigned long KVM_GET_REGS
    unsigned long KVM_SET_REGS
    unsigned long KVM_GET_SREGS
    unsigned long KVM_SET_SREGS
    unsigned long KVM_SET_CPUID2
    unsigned long KVM_SET_MSRS
    unsigned long KVM_GET_MSRS
    unsigned long KVM_SET_FPU
    unsigned long KVM_SET_XCRS
    unsigned long KVM_GET_LAPIC
    unsigned long KVM_SET_LAPIC

    # capabilities
    enum:
        KVM_CAP_IRQCHIP
        KVM_CAP_HLT
        KVM_CAP_USER_MEMORY
        KVM_CAP_SET_TSS_ADDR
        KVM_CAP_EXT_CPUID
        KVM_CAP_PIT2
        KVM_CAP_IOEVENTFD
        KVM_CAP_IRQFD
        KVM_CAP_SET_IDENTITY_MAP_ADDR
        KVM_CAP_IMMEDIATE_EXIT
        KVM_CAP_XCRS
        KVM_CAP_NR_MEMSLOTS
        KVM_CAP_MAX_VCPUS
        KVM_CAP_NR_VCPUS

    enum:
        KVM_EXIT_UNKNOWN
        KVM_EXIT_EXCEPTION
        KVM_EXIT_IO
        KVM_EXIT_HYPERCALL
        KVM_EXIT_DEBUG
        KVM_EXIT_HLT
        KVM_EXIT_MMIO
        KVM_EXIT_IRQ_WINDOW_OPEN
        KVM_EXIT_SHUTDOWN
        KVM_EXIT_FAIL_ENTRY
        KVM_EXIT_INTR
        KVM_EXIT_INTERNAL_ERROR
        KVM_EXIT_SYSTEM_EVENT
        KVM_EXIT_IO_IN
        KVM_EXIT_IO_OUT
        KVM_SYSTEM_EVENT_SHUTDOWN
        KVM_SYSTEM_EVENT_RESET
        KVM_SYSTEM_EVENT_CRASH
        KVM_PIT_SPEAKER_DUMMY

    # Anonymous members of struct kvm_run, declared under names Cython never emits.
    struct _kvm_run_io:
        uint8_t direction
        uint8_t size
        uint16_t port
        uint32_t count
        uint64_t data_offset

    struct _kvm_run_mmio:
        uint64_t phys_addr
        uint8_t data[8]
        uint32_t len
        uint8_t is_write

    struct _kvm_run_fail_entry:
        uint64_t hardware_entry_failure_reason
        uint32_t cpu

    struct _kvm_run_internal:
        uint32_t suberror
        uint32_t ndata
        uint64_t data[16]

    struct _kvm_run_system_event:
        uint32_t type
        uint32_t ndata
        uint64_t data[16]

    struct kvm_run:
        uint8_t request_interrupt_window
        uint8_t immediate_exit
        uint32_t exit_reason
        uint8_t if_flag
        _kvm_run_io io
        _kvm_run_mmio mmio
        _kvm_run_fail_entry fail_entry
        _kvm_run_internal internal
        _kvm_run_system_event system_event

    struct kvm_userspace_memory_region:
        uint32_t slot
        uint32_t flags
        uint64_t guest_phys_addr
        uint64_t memory_size
        uint64_t userspace_addr

    struct kvm_regs:
        uint64_t rax, rbx, rcx, rdx
        uint64_t rsi, rdi, rsp, rbp
        uint64_t r8, r9, r10, r11
        uint64_t r12, r13, r14, r15
        uint64_t rip, rflags

    struct kvm_segment:
        uint64_t base
        uint32_t limit
        uint16_t selector
        uint8_t type
        uint8_t present, dpl, db, s, l, g, avl
        uint8_t unusable

    struct kvm_dtable:
        uint64_t base
        uint16_t limit

    struct kvm_sregs:
        kvm_segment cs, ds, es, fs, gs, ss
        kvm_segment tr, ldt
        kvm_dtable gdt, idt
        uint64_t cr0, cr2, cr3, cr4, cr8
        uint64_t efer
        uint64_t apic_base
        unsigned long long interrupt_bitmap[4]   # __u64: unsigned long long

    struct kvm_fpu:
        uint8_t fpr[8][16]
        uint16_t fcw
        uint16_t fsw
        uint8_t ftwx
        uint16_t last_opcode
        uint64_t last_ip
        uint64_t last_dp
        uint8_t xmm[16][16]
        uint32_t mxcsr

    struct kvm_cpuid_entry2:
        uint32_t function
        uint32_t index
        uint32_t flags
        uint32_t eax, ebx, ecx, edx

    struct kvm_cpuid2:
        uint32_t nent
        kvm_cpuid_entry2 entries[0]

    struct kvm_msr_entry:
        uint32_t index
        uint64_t data

    struct kvm_msrs:
        uint32_t nmsrs
        kvm_msr_entry entries[0]

    struct kvm_msr_list:
        uint32_t nmsrs
        uint32_t indices[0]

    struct kvm_xcr:
        uint32_t xcr
        uint64_t value

    struct kvm_xcrs:
        uint32_t nr_xcrs
        uint32_t flags
        kvm_xcr xcrs[16]

    struct kvm_pit_config:
        uint32_t flags

    struct kvm_irq_level:
        uint32_t irq
        uint32_t level

    struct kvm_ioeventfd:
        uint64_t datamatch
        uint64_t addr
        uint32_t len
        int32_t fd
        uint32_t flags

    struct kvm_irqfd:
        uint32_t fd
        uint32_t gsi
        uint32_t flags
        uint32_t resamplefd
