"""The interactive console: terminal input reaches the guest's UART (polled and by receive
interrupt through the in-kernel 8259), and Ctrl-A x quits as in QEMU."""

from __future__ import annotations

import os
import pty
import threading
import time

import pytest

from pyhv.machine.console import Console
from pyhv.machine.machine import Machine
from tests.helpers.guestprog import asm16

pytestmark = pytest.mark.usefixtures("kvm_available")

POLLING_ECHO = """
    1:  mov dx, 0x3fd
        in al, dx
        test al, 1
        jz 1b
        mov dx, 0x3f8
        in al, dx
        out dx, al
        jmp 1b
"""

# IRQ 4 -> 8259 (vector base 0x20) -> LINT0 (ExtINT): the handler drains RBR and echoes.
INTERRUPT_ECHO = """
        cli
        xor ax, ax
        mov ds, ax
        mov ss, ax
        mov sp, 0x7000
        mov word ptr [0x24 * 4], offset handler
        mov word ptr [0x24 * 4 + 2], 0
        mov al, 0x11
        out 0x20, al
        mov al, 0x20
        out 0x21, al
        mov al, 0x04
        out 0x21, al
        mov al, 0x01
        out 0x21, al
        mov al, 0xef            # unmask IRQ 4 only
        out 0x21, al
        mov dx, 0x3f9
        mov al, 0x01            # IER: received-data interrupt
        out dx, al
        sti
    1:  hlt
        jmp 1b
    handler:
        mov dx, 0x3fd
        in al, dx
        test al, 1
        jz 2f
        mov dx, 0x3f8
        in al, dx
        out dx, al
        jmp handler
    2:  mov al, 0x20
        out 0x20, al            # EOI
        iret
"""


def wait_for(path, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = path.read_text() if path.exists() else ""
        if text in got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"console shows {got!r}, expected {text!r}")


@pytest.mark.parametrize("program", [POLLING_ECHO, INTERRUPT_ECHO], ids=["polled", "irq"])
def test_terminal_input_is_echoed_and_ctrl_a_x_quits(program, tmp_path):
    log = tmp_path / "console.log"
    master, slave = pty.openpty()
    try:
        with Machine(memory=16 << 20, console=str(log), irqchip=True) as m:
            m.load_flat(asm16(program, 0x1000), 0x1000)
            with Console(m.uart, on_quit=lambda: m.stop("quit", "quit from the console"),
                         fd=slave, out_fd=slave):
                os.write(master, b"hello \x01\x01 world")
                runner = threading.Thread(target=lambda: setattr(m, "result", m.run(60)))
                runner.start()
                wait_for(log, "hello \x01 world")
                os.write(master, b"\x01x")
                runner.join(30)
            assert not runner.is_alive()
            assert m.result.kind == "quit" and m.result.exit_code == 0
    finally:
        os.close(master)
        os.close(slave)
