"""Machine: a KVM VM with its RAM, buses, legacy devices and vCPU threads.

`_build_devices` lists every device in order, each created by its own module, so the
assembly stays readable (the complaint about Firecracker's builder.rs we do not repeat).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from hvcore.bus import Bus
from hvcore.kvm import EXIT_DEVICE_ERROR, EXIT_STOPPED, Kvm
from hvcore.memory import GuestMemory
from hvcore.uart import Uart
from pyhv.errors import PyhvError
from pyhv.machine import layout, longmode
from pyhv.machine.cpu import configure_vcpu
from pyhv.machine.devices import power
from pyhv.machine.devices.boottimer import BootTimer
from pyhv.machine.devices.cmos import Cmos
from pyhv.machine.devices.i8042 import I8042
from pyhv.machine.devices.pci import PciConfigSpace
from pyhv.machine.devices.power import AcpiPower
from pyhv.machine.exit import MachineExit, describe
from pyhv.machine.mptable import MAX_CPUS, validate_cpus


class Machine:
    """A micro-VM. Use as a context manager; load a kernel or flat code, then `run()`.

    `console` is where the serial port's output goes: an fd, a path (opened for append),
    or None for standard output.
    """

    def __init__(self, memory: int = 512 << 20, cpus: int = 1,
                 console: int | str | os.PathLike | None = None, irqchip: bool = True,
                 kvm_path: str = "/dev/kvm"):
        validate_cpus(cpus)
        layout.validate_memory(memory)
        self.kvm = Kvm(kvm_path)
        limit = self.kvm.capabilities().get("KVM_CAP_MAX_VCPUS") or MAX_CPUS
        if cpus > limit:
            raise PyhvError(f"--cpus {cpus} is more than this host's KVM allows ({limit})")
        self.cpus = cpus
        self.irqchip = irqchip
        self.started = time.monotonic()
        self._own_console_fd = None
        if console is None:
            console_fd = 1
        elif isinstance(console, int):
            console_fd = console
        else:
            console_fd = os.open(console, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                                 0o644)
            self._own_console_fd = console_fd
        self.vm = self.kvm.create_vm()
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
        if irqchip:
            self.vm.create_irqchip()
            self.vm.create_pit2()
        self.memory = GuestMemory(layout.ram_regions(memory))
        for slot, (gpa, size, host, _offset) in enumerate(self.memory.layout):
            self.vm.set_memory_region(slot, gpa, size, host, self.memory)
        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO")
        self._build_devices(console_fd)
        supported = self.kvm.supported_cpuid()
        self.vcpus = []
        for i in range(cpus):
            vcpu = self.vm.create_vcpu(i, self.pio, self.mmio)
            configure_vcpu(vcpu, supported, i, cpus, irqchip)
            self.vcpus.append(vcpu)
        self._result: MachineExit | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._halted = 0
        self._threads: list[threading.Thread] = []

    def _build_devices(self, console_fd: int) -> None:
        mem = self.memory.size
        below_4g = min(mem, layout.MMIO_GAP_START)
        self.uart = Uart(console_fd, self.vm.fd if self.irqchip else -1,
                         layout.SERIAL_IRQ)
        self.i8042 = I8042(on_reset=lambda: self.stop("reset", "guest reset the machine "
                                                      "through the i8042 controller"))
        self.cmos = Cmos(below_4g, mem - below_4g)
        self.pci = PciConfigSpace()
        self.boot_timer = BootTimer(self.started)
        self.power = AcpiPower(
            on_poweroff=lambda: self.stop("poweroff", "guest powered off (ACPI S5)"),
            on_reset=lambda: self.stop("reset", "guest reset the machine (ACPI reset register)"))
        self.pio.add(layout.SERIAL_PORT, layout.SERIAL_PORTS, self.uart)
        self.pio.add(layout.I8042_DATA_PORT, 5, self.i8042)
        self.pio.add(layout.CMOS_PORT, layout.CMOS_PORTS, self.cmos)
        self.pio.add(layout.PCI_CONFIG_ADDRESS, 8, self.pci)
        self.pio.add(0x3F0, 1, self.boot_timer)
        self.pio.add(power.BASE_PORT, power.PORTS, self.power)

    # ---- loading ---------------------------------------------------------------------

    def load_flat(self, code: bytes, addr: int, mode: str = "real",
                  vcpus: list[int] | None = None, entry: int | None = None) -> None:
        """Copy `code` to `addr` and point the vCPUs (all by default) at `entry` (default
        `addr`) in real mode (CS:IP, 16-byte aligned below 1 MiB) or long mode (identity
        paging of the first 4 GiB, flat 64-bit segments)."""
        entry = addr if entry is None else entry
        self.memory.write(addr, code)
        targets = [self.vcpus[i] for i in (range(self.cpus) if vcpus is None else vcpus)]
        if mode == "real":
            if entry >= 1 << 20 or entry & 0xF:
                raise PyhvError(f"real-mode entry {entry:#x} must be 16-byte aligned below 1 MiB")
            for v in targets:
                v.set_sregs(cs={"base": entry, "selector": entry >> 4})
                v.set_regs(rip=0, rflags=2, rsp=0)
        elif mode == "long":
            self.setup_long_mode()
            for v in targets:
                v.set_sregs(**longmode.long_mode_sregs(layout.PML4_START, layout.BOOT_GDT,
                                                       layout.BOOT_IDT))
                v.set_regs(rip=entry, rflags=2, rsp=layout.BOOT_STACK_TOP)
        else:
            raise PyhvError(f"unknown CPU mode {mode!r} (real or long)")

    def setup_long_mode(self) -> None:
        """Write the boot GDT and identity page tables (shared by Linux and flat code)."""
        self.memory.write(layout.PML4_START, longmode.identity_page_tables(layout.PML4_START))
        self.memory.write(layout.BOOT_GDT, longmode.gdt())

    def load_linux(self, kernel: str | Path, initrd: str | Path | None = None,
                   cmdline: str = "", extract: bool = True, protocol: str = "auto"):
        """Load a bzImage or ELF vmlinux (see pyhv.machine.linux)."""
        from pyhv.machine.linux import load_linux

        return load_linux(self, kernel, initrd, cmdline, extract=extract, protocol=protocol)

    # ---- running ---------------------------------------------------------------------

    def run(self, timeout: float | None = None) -> MachineExit:
        """Run every vCPU in its own thread until the machine ends; returns how it ended."""
        self._threads = [threading.Thread(target=self._vcpu_main, args=(v,),
                                          name=f"vcpu{v.index}", daemon=True)
                         for v in self.vcpus]
        for t in self._threads:
            t.start()
        if not self._done.wait(timeout):
            self.stop("timeout", f"machine still running after {timeout:g} s")
        for t in self._threads:
            t.join()
        assert self._result is not None
        self._result.boot_times = list(self.boot_timer.marks)
        return self._result

    def stop(self, kind: str = "stopped", message: str = "stopped by the host") -> None:
        """End the machine from any thread; the first reason given is the one reported."""
        self._finish(MachineExit(kind, message))

    def _finish(self, result: MachineExit) -> None:
        with self._lock:
            if self._result is None:
                self._result = result
        for v in self.vcpus:
            v.request_stop()
        self._done.set()

    def _vcpu_main(self, vcpu) -> None:
        try:
            reason = vcpu.run()
            if reason == EXIT_STOPPED:
                return
            if reason == EXIT_DEVICE_ERROR:
                errors = self.pio.errors() + self.mmio.errors()
                cause = f"{type(errors[0]).__name__}: {errors[0]}" if errors else "unknown"
                self._finish(MachineExit("device-error", f"a device failed on vCPU "
                                         f"{vcpu.index}: {cause}", vcpu.index))
                return
            info = vcpu.exit_info()
            regs = vcpu.get_regs()
            result = describe(vcpu, info, regs)
            if result.kind == "halted":
                with self._lock:
                    self._halted += 1
                    if self._halted < self.cpus:
                        return      # the others keep running
                result = MachineExit("halted", "all vCPUs halted" if self.cpus > 1
                                     else result.message, vcpu.index)
            self._finish(result)
        except Exception as e:  # noqa: BLE001 - reported as the machine's end, one line
            self._finish(MachineExit("error", f"vCPU {vcpu.index}: {e}", vcpu.index))

    @property
    def unhandled_accesses(self) -> tuple[int, int]:
        """(port I/O, MMIO) accesses that hit no device: reads gave all ones."""
        return self.pio.unhandled, self.mmio.unhandled

    def close(self) -> None:
        if self._threads and not self._done.is_set():
            self.stop()
            for t in self._threads:
                t.join()
        if self._own_console_fd is not None:
            os.close(self._own_console_fd)
            self._own_console_fd = None

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
