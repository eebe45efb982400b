"""pyhv's VMM against the real KVM API, with guest programs built by gcc/as here."""

from __future__ import annotations

import os

import pytest

from hvcore.devices import Probe
from pyhv.machine.machine import Machine
from tests.helpers.guestprog import asm16, asm64, c64

pytestmark = pytest.mark.usefixtures("kvm_available")

PROBE_PORT = 0x510
PROBE_MMIO = 0xD000_0000      # inside the PCI hole: no RAM there, so every access exits


@pytest.fixture
def console(tmp_path):
    path = tmp_path / "console.log"
    return path


def machine(console, **kw) -> Machine:
    kw.setdefault("memory", 16 << 20)
    kw.setdefault("irqchip", False)   # so HLT exits to us instead of waiting for interrupts
    return Machine(console=str(console), **kw)


def test_real_mode_port_io_each_width_both_ways(console):
    code = asm16(f"""
        mov dx, {PROBE_PORT}
        mov al, 0x12
        out dx, al
        mov ax, 0x3456
        out dx, ax
        mov eax, 0x789abcde
        out dx, eax
        in al, dx
        mov bl, al
        in ax, dx
        mov cx, ax
        in eax, dx
        mov dx, {PROBE_PORT + 1}
        mov al, bl
        out dx, al          # echo what the 1-byte read returned
        mov ax, cx
        out dx, ax
        out dx, eax
        hlt
    """)
    with machine(console) as m:
        probe, echo = Probe(read_value=0x1122334455667788), Probe()
        m.pio.add(PROBE_PORT, 1, probe)
        m.pio.add(PROBE_PORT + 1, 1, echo)
        m.load_flat(code, 0x1000, mode="real")
        result = m.run(timeout=30)
    assert result.kind == "halted", result.message
    assert probe.writes == 3 and probe.reads == 3
    assert probe.last_value == 0x789ABCDE
    assert echo.writes == 3
    assert echo.last_value == 0x55667788   # the dword read reached the guest intact


def test_python_device_sees_each_width(console):
    seen = []

    class Recorder:
        def read(self, offset, size):
            return {1: 0xA1, 2: 0xB2B2, 4: 0xC4C4C4C4}[size]

        def write(self, offset, size, value):
            seen.append((offset, size, value))

    code = asm16(f"""
        mov dx, {PROBE_PORT}
        in al, dx
        out dx, al
        in ax, dx
        out dx, ax
        in eax, dx
        out dx, eax
        mov dx, {PROBE_PORT + 2}
        mov al, 7
        out dx, al
        hlt
    """)
    with machine(console) as m:
        m.pio.add(PROBE_PORT, 4, Recorder())
        m.load_flat(code, 0x1000)
        result = m.run(timeout=30)
    assert result.kind == "halted", result.message
    assert seen == [(0, 1, 0xA1), (0, 2, 0xB2B2), (0, 4, 0xC4C4C4C4), (2, 1, 7)]


def test_long_mode_port_io_and_mmio(console):
    code = asm64(f"""
        mov dx, {PROBE_PORT}
        mov eax, 0xcafe
        out dx, eax
        mov rbx, {PROBE_MMIO:#x}
        mov dword ptr [rbx], 0x1234abcd
        mov qword ptr [rbx + 8], rax
        mov eax, dword ptr [rbx]
        out dx, eax         # the value the MMIO read returned, back through port I/O
        hlt
    """)
    with machine(console) as m:
        port, mmio = Probe(), Probe(read_value=0x5A5A5A5A)
        m.pio.add(PROBE_PORT, 1, port)
        m.mmio.add(PROBE_MMIO, 0x1000, mmio)
        m.load_flat(code, 0x100000, mode="long")
        result = m.run(timeout=30)
    assert result.kind == "halted", result.message
    assert mmio.writes == 2 and mmio.reads == 1
    assert mmio.last_offset == 0 and port.writes == 2
    assert port.last_value == 0x5A5A5A5A


def test_serial_output_from_freestanding_c(console):
    code = c64(r"""
        static inline void outb(unsigned short port, unsigned char v) {
            __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
        }
        static inline unsigned char inb(unsigned short port) {
            unsigned char v;
            __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
            return v;
        }
        void _start(void) {
            const char *s = "hello from a C guest\n";
            for (; *s; s++) {
                while (!(inb(0x3f8 + 5) & 0x20)) { }
                outb(0x3f8, *s);
            }
            __asm__ volatile("hlt");
        }
    """)
    with machine(console) as m:
        m.load_flat(code, 0x100000, mode="long")
        result = m.run(timeout=30)
        assert m.uart.tx_bytes == len("hello from a C guest\n")
    assert result.kind == "halted", result.message
    assert console.read_text() == "hello from a C guest\n"


def test_two_vcpus_each_write_to_the_console(console):
    def writer(text: str) -> str:
        lines = "\n".join(f"mov al, {ord(c)}\n out dx, al" for c in text)
        return f"mov dx, 0x3f8\n{lines}\nhlt\n"

    with machine(console, cpus=2) as m:
        m.load_flat(asm16(writer("A0\n"), 0x1000), 0x1000, vcpus=[0])
        m.load_flat(asm16(writer("B1\n"), 0x2000), 0x2000, vcpus=[1])
        result = m.run(timeout=30)
    assert result.kind == "halted" and result.message == "all vCPUs halted"
    out = console.read_text()
    assert sorted(out.splitlines()) == ["A0", "B1"] or sorted(out) == sorted("A0\nB1\n")


def test_hlt_ends_the_machine_with_its_rip(console):
    with machine(console) as m:
        m.load_flat(asm16("nop\nnop\nhlt\n"), 0x1000)
        result = m.run(timeout=30)
    assert result.kind == "halted" and result.ok
    assert "RIP 0x3" in result.message      # after the HLT, CS base 0x1000


def test_triple_fault_is_a_clear_error(console):
    # Long mode with an empty IDT: ud2 -> #UD -> #DF -> triple fault.
    with machine(console) as m:
        m.load_flat(asm64("ud2\n"), 0x100000, mode="long")
        result = m.run(timeout=30)
    assert result.kind == "triple-fault"
    assert not result.ok and result.exit_code != 0
    assert "triple-faulted" in result.message and "RIP" in result.message


def test_access_outside_ram_is_an_mmio_exit_not_a_crash(console):
    code = asm64(f"""
        mov rbx, 0x40000000         # 1 GiB: identity-mapped, but far beyond 16 MiB of RAM
        mov eax, dword ptr [rbx]
        mov dword ptr [rbx], 0x77
        mov dx, {PROBE_PORT}
        out dx, eax
        hlt
    """)
    with machine(console) as m:
        probe = Probe()
        m.pio.add(PROBE_PORT, 1, probe)
        m.load_flat(code, 0x100000, mode="long")
        result = m.run(timeout=30)
        pio_misses, mmio_misses = m.unhandled_accesses
    assert result.kind == "halted", result.message
    assert probe.last_value == 0xFFFFFFFF     # an empty bus reads all ones
    assert mmio_misses == 2


def test_device_exception_ends_the_machine_with_its_message(console):
    class Broken:
        def read(self, offset, size):
            raise ValueError("register 3 is write-only")

        def write(self, offset, size, value):
            pass

    with machine(console) as m:
        m.pio.add(PROBE_PORT, 4, Broken())
        m.load_flat(asm16(f"mov dx, {PROBE_PORT}\nin al, dx\nhlt\n"), 0x1000)
        result = m.run(timeout=30)
    assert result.kind == "device-error"
    assert "register 3 is write-only" in result.message


def test_stop_from_another_thread_while_guest_spins(console):
    import threading

    with machine(console, cpus=2, irqchip=True) as m:
        m.load_flat(asm16("1: jmp 1b\n"), 0x1000)
        threading.Timer(0.5, m.stop).start()
        result = m.run(timeout=30)
    assert result.kind == "stopped"


def test_i8042_reset_is_a_clean_exit(console):
    with machine(console, irqchip=True) as m:
        m.load_flat(asm16("mov al, 0xfe\nout 0x64, al\n1: jmp 1b\n"), 0x1000)
        result = m.run(timeout=30)
    assert result.kind == "reset" and result.exit_code == 0


def test_boot_timer_records_the_magic_write(console):
    with machine(console) as m:
        m.load_flat(asm16("mov dx, 0x3f0\nmov al, 7\nout dx, al\nmov al, 123\nout dx, al\n"
                          "hlt\n"), 0x1000)
        result = m.run(timeout=30)
    assert len(result.boot_times) == 1 and 0 < result.boot_times[0] < 30


def test_pci_config_space_host_bridge_and_empty_slot(console):
    code = asm16(f"""
        mov dx, 0xcf8
        mov eax, 0x80000000     # 00:00.0 register 0
        out dx, eax
        mov dx, 0xcfc
        in eax, dx
        mov dx, {PROBE_PORT}
        out dx, eax
        mov dx, 0xcf8
        mov eax, 0x80001800     # 00:03.0
        out dx, eax
        mov dx, 0xcfc
        in eax, dx
        mov dx, {PROBE_PORT + 1}
        out dx, eax
        hlt
    """)
    with machine(console) as m:
        bridge, empty = Probe(), Probe()
        m.pio.add(PROBE_PORT, 1, bridge)
        m.pio.add(PROBE_PORT + 1, 1, empty)
        m.load_flat(code, 0x1000)
        result = m.run(timeout=30)
    assert result.kind == "halted", result.message
    assert bridge.last_value == 0x0008_1B36
    assert empty.last_value == 0xFFFF_FFFF


def test_console_file_is_appended_not_truncated(console):
    console.write_text("earlier\n")
    with machine(console) as m:
        m.load_flat(asm16("mov dx, 0x3f8\nmov al, 0x41\nout dx, al\nhlt\n"), 0x1000)
        m.run(timeout=30)
    assert console.read_text() == "earlier\nA"
    assert os.path.getsize(console) == 9


@pytest.mark.parametrize("port, value, kind", [(0x600, 0x34, "poweroff"), (0x602, 0x0F, "reset")])
def test_acpi_sleep_and_reset_registers_end_the_machine_cleanly(console, port, value, kind):
    with machine(console, irqchip=True) as m:
        m.load_flat(asm16(f"mov dx, {port}\nmov al, {value}\nout dx, al\n1: jmp 1b\n"), 0x1000)
        result = m.run(timeout=30)
    assert result.kind == kind and result.exit_code == 0


def test_acpi_sleep_register_ignores_other_sleep_states(console):
    # S3 (SLP_TYP 3 with SLP_EN) is not power-off: the guest keeps running to its HLT.
    with machine(console) as m:
        m.load_flat(asm16("mov dx, 0x600\nmov al, 0x2c\nout dx, al\nhlt\n"), 0x1000)
        result = m.run(timeout=30)
    assert result.kind == "halted"


def test_kvm_internal_error_names_suberror_and_rip(console):
    from pyhv.machine.cpu import host_is_pvm

    if not host_is_pvm():
        pytest.skip("needs PVM's instruction emulator, which cannot emulate lock cmpxchg16b; "
                    "hardware KVM runs it natively and no internal error happens")
    with machine(console) as m:
        m.load_flat(asm64("mov rbx, 0x2000\nlock cmpxchg16b [rbx]\nhlt\n"), 0x100000,
                    mode="long")
        result = m.run(timeout=30)
    assert result.kind == "internal-error" and result.exit_code == 1
    assert "suberror 1 (emulation failure)" in result.message
    assert "RIP 0x100007" in result.message    # the faulting instruction, after the mov


def test_each_vcpu_sees_its_own_apic_id_in_cpuid(console):
    def report(port: int) -> str:
        return f"mov eax, 1\ncpuid\nshr ebx, 24\nmov eax, ebx\nmov dx, {port}\nout dx, eax\nhlt\n"

    with machine(console, cpus=2) as m:
        probes = [Probe(), Probe()]
        m.pio.add(PROBE_PORT, 1, probes[0])
        m.pio.add(PROBE_PORT + 1, 1, probes[1])
        m.load_flat(asm16(report(PROBE_PORT), 0x1000), 0x1000, vcpus=[0])
        m.load_flat(asm16(report(PROBE_PORT + 1), 0x2000), 0x2000, vcpus=[1])
        result = m.run(timeout=30)
    assert result.kind == "halted", result.message
    assert [p.last_value for p in probes] == [0, 1]
    assert all(p.writes == 1 for p in probes)
