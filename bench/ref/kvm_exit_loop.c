/*
 * kvm_exit_loop.c - anchor for pyhv's VM-exit benchmark.
 *
 * Measures VM-exit round trips per second through the raw KVM API with the
 * leanest possible VMM loop (KVM_RUN, look at kvm_run, answer, KVM_RUN ...).
 * pyhv's Python/Cython run loop is compared against this number.
 *
 *   gcc -O2 -Wall -Wextra -o kvm_exit_loop kvm_exit_loop.c
 *   kvm_exit_loop pio|mmio ITERATIONS
 *   -> {"mode": "pio", "iterations": N, "seconds": S, "exits_per_second": R}
 *
 * ITERATIONS counts VM exits (each KVM_RUN that returns), timed after a
 * warm-up of 1000 exits.  One guest loop iteration = 2 exits (write + read).
 *
 * Guest: 16-bit real mode, code at GPA 0x1000, entry CS:IP = 0000:1000.
 *   pio : port 0x510, 1-byte OUT then 1-byte IN.
 *   mmio: GPA 0xd0000000 (outside the 2 MiB RAM slot), 4-byte store then
 *         4-byte load.  Reached from real mode by giving DS a 4 GiB limit
 *         through KVM_SET_SREGS ("unreal mode" set up by the host; no
 *         protected-mode switch in the guest).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE   (2u << 20)          /* one 2 MiB slot at GPA 0 */
#define CODE_GPA   0x1000u             /* guest code load address */
#define TSS_ADDR   0xfffbd000u
#define PIO_PORT   0x510u
#define MMIO_GPA   0xd0000000ull
#define IN_VALUE   0x5a                /* byte returned to guest IN */
#define MMIO_VALUE 0x5a5a5a5au         /* dword returned to guest load */
#define WARMUP     1000ull

/*
 * pio guest, real mode, at 0000:1000
 *   1000: ba 10 05        mov  dx, 0x510
 *   1003: b0 42           mov  al, 0x42
 *   1005: ee        loop: out  dx, al        ; exit 1 (KVM_EXIT_IO out)
 *   1006: ec              in   al, dx        ; exit 2 (KVM_EXIT_IO in)
 *   1007: eb fc           jmp  loop (1005)
 */
static const uint8_t guest_pio[] = {
	0xba, 0x10, 0x05,
	0xb0, 0x42,
	0xee,
	0xec,
	0xeb, 0xfc,
};

/*
 * mmio guest, real mode with DS.base = 0, DS.limit = 0xffffffff, at 0000:1000
 *   1000: 66 bb 00 00 00 d0     mov  ebx, 0xd0000000
 *   1006: 66 b8 78 56 34 12     mov  eax, 0x12345678
 *   100c: 67 66 89 03     loop: mov  [ebx], eax   ; exit 1 (KVM_EXIT_MMIO write)
 *   1010: 67 66 8b 03           mov  eax, [ebx]   ; exit 2 (KVM_EXIT_MMIO read)
 *   1014: eb f6                 jmp  loop (100c)
 */
static const uint8_t guest_mmio[] = {
	0x66, 0xbb, 0x00, 0x00, 0x00, 0xd0,
	0x66, 0xb8, 0x78, 0x56, 0x34, 0x12,
	0x67, 0x66, 0x89, 0x03,
	0x67, 0x66, 0x8b, 0x03,
	0xeb, 0xf6,
};

static void die(const char *call)
{
	fprintf(stderr, "kvm_exit_loop: %s failed: %s\n", call, strerror(errno));
	exit(1);
}

static int xioctl(int fd, unsigned long req, unsigned long arg, const char *name)
{
	int r = ioctl(fd, req, arg);
	if (r < 0)
		die(name);
	return r;
}

static void usage(void)
{
	fprintf(stderr, "usage: kvm_exit_loop pio|mmio ITERATIONS\n");
	exit(2);
}

static const char *exit_name(uint32_t r)
{
	switch (r) {
	case KVM_EXIT_UNKNOWN: return "UNKNOWN";
	case KVM_EXIT_EXCEPTION: return "EXCEPTION";
	case KVM_EXIT_IO: return "IO";
	case KVM_EXIT_HLT: return "HLT";
	case KVM_EXIT_MMIO: return "MMIO";
	case KVM_EXIT_SHUTDOWN: return "SHUTDOWN";
	case KVM_EXIT_FAIL_ENTRY: return "FAIL_ENTRY";
	case KVM_EXIT_INTR: return "INTR";
	case KVM_EXIT_INTERNAL_ERROR: return "INTERNAL_ERROR";
	default: return "?";
	}
}

static void bad_exit(int vcpu, struct kvm_run *run)
{
	struct kvm_regs regs;
	fprintf(stderr, "kvm_exit_loop: unexpected exit reason %u (%s)",
		run->exit_reason, exit_name(run->exit_reason));
	if (run->exit_reason == KVM_EXIT_IO)
		fprintf(stderr, " port=0x%x dir=%s size=%u count=%u",
			run->io.port, run->io.direction ? "out" : "in",
			run->io.size, run->io.count);
	else if (run->exit_reason == KVM_EXIT_MMIO)
		fprintf(stderr, " addr=0x%llx len=%u write=%u",
			(unsigned long long)run->mmio.phys_addr,
			run->mmio.len, run->mmio.is_write);
	else if (run->exit_reason == KVM_EXIT_INTERNAL_ERROR)
		fprintf(stderr, " suberror=%u", run->internal.suberror);
	else if (run->exit_reason == KVM_EXIT_FAIL_ENTRY)
		fprintf(stderr, " hw_reason=0x%llx",
			(unsigned long long)run->fail_entry.hardware_entry_failure_reason);
	if (ioctl(vcpu, KVM_GET_REGS, &regs) == 0)
		fprintf(stderr, " rip=0x%llx", (unsigned long long)regs.rip);
	fprintf(stderr, "\n");
	exit(1);
}

int main(int argc, char **argv)
{
	int mmio;
	char *end;
	unsigned long long iters;

	if (argc != 3)
		usage();
	if (strcmp(argv[1], "pio") == 0)
		mmio = 0;
	else if (strcmp(argv[1], "mmio") == 0)
		mmio = 1;
	else
		usage();
	errno = 0;
	iters = strtoull(argv[2], &end, 10);
	if (errno || *end || end == argv[2] || iters == 0)
		usage();

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open(/dev/kvm)");
	int api = xioctl(kvm, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION");
	if (api != KVM_API_VERSION) {
		fprintf(stderr, "kvm_exit_loop: KVM_GET_API_VERSION returned %d, want %d\n",
			api, KVM_API_VERSION);
		return 1;
	}

	int vm = xioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM");
	xioctl(vm, KVM_SET_TSS_ADDR, TSS_ADDR, "KVM_SET_TSS_ADDR");
	xioctl(vm, KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP");

	int memfd = memfd_create("kvm_exit_loop-ram", MFD_CLOEXEC);
	if (memfd < 0)
		die("memfd_create");
	if (ftruncate(memfd, MEM_SIZE) < 0)
		die("ftruncate(memfd)");
	uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (mem == MAP_FAILED)
		die("mmap(guest memory)");

	struct kvm_userspace_memory_region region = {
		.slot = 0,
		.flags = 0,
		.guest_phys_addr = 0,
		.memory_size = MEM_SIZE,
		.userspace_addr = (uintptr_t)mem,
	};
	xioctl(vm, KVM_SET_USER_MEMORY_REGION, (unsigned long)&region,
	       "KVM_SET_USER_MEMORY_REGION");

	if (mmio)
		memcpy(mem + CODE_GPA, guest_mmio, sizeof(guest_mmio));
	else
		memcpy(mem + CODE_GPA, guest_pio, sizeof(guest_pio));

	int vcpu = xioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
	int run_size = xioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
	if ((size_t)run_size < sizeof(struct kvm_run)) {
		fprintf(stderr, "kvm_exit_loop: KVM_GET_VCPU_MMAP_SIZE returned %d\n", run_size);
		return 1;
	}
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap(kvm_run)");

	/* Real mode, CS:IP = 0000:1000. */
	struct kvm_sregs sregs;
	xioctl(vcpu, KVM_GET_SREGS, (unsigned long)&sregs, "KVM_GET_SREGS");
	sregs.cs.selector = 0;
	sregs.cs.base = 0;
	if (mmio) {
		/* Unreal mode: flat 4 GiB DS so [ebx] can reach 0xd0000000. */
		sregs.ds.selector = 0;
		sregs.ds.base = 0;
		sregs.ds.limit = 0xffffffff;
		sregs.ds.g = 1;
	}
	xioctl(vcpu, KVM_SET_SREGS, (unsigned long)&sregs, "KVM_SET_SREGS");

	struct kvm_regs regs;
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_GPA;
	regs.rsp = 0x8000;
	regs.rflags = 0x2;
	xioctl(vcpu, KVM_SET_REGS, (unsigned long)&regs, "KVM_SET_REGS");

	unsigned long long total = WARMUP + iters, n;
	struct timespec t0 = {0, 0}, t1;
	for (n = 0; n < total; n++) {
		if (n == WARMUP)
			clock_gettime(CLOCK_MONOTONIC, &t0);
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN) {
				n--;
				continue;
			}
			die("KVM_RUN");
		}
		if (run->exit_reason == KVM_EXIT_IO && !mmio &&
		    run->io.port == PIO_PORT && run->io.size == 1 && run->io.count == 1) {
			if (run->io.direction == KVM_EXIT_IO_IN)
				*((uint8_t *)run + run->io.data_offset) = IN_VALUE;
		} else if (run->exit_reason == KVM_EXIT_MMIO && mmio &&
			   run->mmio.phys_addr == MMIO_GPA && run->mmio.len == 4) {
			if (!run->mmio.is_write) {
				uint32_t v = MMIO_VALUE;
				memcpy(run->mmio.data, &v, 4);
			}
		} else {
			bad_exit(vcpu, run);
		}
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);

	/* Sanity check outside the timed region: the value the host answered
	 * must have reached the guest's AL / EAX. */
	xioctl(vcpu, KVM_GET_REGS, (unsigned long)&regs, "KVM_GET_REGS");
	if (mmio ? (uint32_t)regs.rax != MMIO_VALUE : (uint8_t)regs.rax != IN_VALUE) {
		fprintf(stderr, "kvm_exit_loop: guest rax=0x%llx after the loop, "
			"host answer did not reach the guest\n",
			(unsigned long long)regs.rax);
		return 1;
	}

	double secs = (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
	printf("{\"mode\": \"%s\", \"iterations\": %llu, \"seconds\": %.6f, "
	       "\"exits_per_second\": %.1f}\n",
	       mmio ? "mmio" : "pio", iters, secs, secs > 0 ? iters / secs : 0.0);
	return 0;
}
