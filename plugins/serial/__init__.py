"""The serial console: a 16550A UART on COM1 (port 0x3F8, IRQ 4).

Output goes to stdout (filtered for ``--exec``), a file, or nowhere, per
``[serial] output``. When stdin is a terminal and ``[serial] input = "auto"``,
keystrokes reach the guest: the terminal is put in raw mode and restored
when the VM stops (also on errors).
"""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
import tty

from vmmkit import threads
from vmmkit.devices.uart8250 import COM1_BASE, COM1_IRQ, UART_PORT_COUNT, Uart8250
from vmmkit.hookspecs import hookimpl

CTRL_A = b"\x01"


class SerialConsole:
    """The COM1 UART plus its host side: output sink and terminal input."""

    def __init__(self, vm):
        self.vm = vm
        spec = vm.spec.serial
        self._file = None
        if spec.output == "stdout":
            out = vm.console_writer()
        elif spec.output == "none":
            out = lambda data: None  # noqa: E731
        else:
            self._file = open(spec.output, "ab", buffering=0)
            out = self._file.write
        irq = vm.irq_line(COM1_IRQ)
        self.uart = Uart8250(out, irq.trigger)
        vm.add_pio_device("serial", self.uart, COM1_BASE, UART_PORT_COUNT)
        self._saved_tty = None
        self._stop = threading.Event()
        # Paused VM (vmmkit_vm_paused): keystrokes wait on the host side, none reach the UART.
        self._input_lock = threading.Lock()
        self._resumed = threading.Event()
        self._resumed.set()
        self._wants_input = (spec.input == "auto" and vm.exec_command is None and sys.stdin.isatty())

    def start(self) -> None:
        """Begin forwarding terminal input (raw mode), if input is on."""
        if not self._wants_input:
            return
        fd = sys.stdin.fileno()
        self._saved_tty = termios.tcgetattr(fd)
        tty.setraw(fd)
        threads.start_thread(threads.ROLE_DEVICE, "serial-input", self._input_loop, fd)

    def _input_loop(self, fd: int) -> None:
        pending = b""
        escape = False
        while not self._stop.is_set():
            if not pending:
                ready, _, _ = select.select([fd], [], [], 0.2)
                if not ready:
                    continue
                data = os.read(fd, 256)
                if not data:
                    return
                # Ctrl-A x stops the VM, as in QEMU; Ctrl-A Ctrl-A sends one Ctrl-A.
                out = b""
                for b in data:
                    ch = bytes([b])
                    if escape:
                        escape = False
                        if ch == b"x":
                            self.vm.request_stop("signal", "Ctrl-A x")
                            return
                        out += ch
                    elif ch == CTRL_A:
                        escape = True
                    else:
                        out += ch
                pending = out
            with self._input_lock:
                paused = not self._resumed.is_set()
                taken = 0 if paused else self.uart.enqueue_input(pending)
            if paused:
                self._resumed.wait(0.2)
                continue
            pending = pending[taken:]
            if pending:
                self._stop.wait(0.005)  # the guest's FIFO is full: let it drain

    def pause(self) -> None:
        """Hold terminal input on the host side until :meth:`resume` (returns once none is in flight)."""
        with self._input_lock:
            self._resumed.clear()

    def resume(self) -> None:
        """Let held input through again."""
        self._resumed.set()

    def stop(self) -> None:
        """Stop input and restore the terminal."""
        self._stop.set()
        if self._saved_tty is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved_tty)
            self._saved_tty = None
        if self._file is not None:
            self._file.close()


@hookimpl
def vmmkit_vm_setup_platform(vm):
    """Attach COM1."""
    vm.serial_console = SerialConsole(vm)


@hookimpl
def vmmkit_vm_started(vm):
    """Start terminal input once the guest runs."""
    vm.serial_console.start()


@hookimpl
def vmmkit_vm_paused(vm):
    """No keystrokes reach a paused guest's UART."""
    vm.serial_console.pause()


@hookimpl
def vmmkit_vm_resumed(vm):
    """Deliver what was typed during the pause."""
    vm.serial_console.resume()


@hookimpl
def vmmkit_vm_stopping(vm):
    """Give the terminal back."""
    vm.serial_console.stop()


@hookimpl
def vmmkit_save_state(vm):
    """The UART's registers and pending input."""
    return {"serial": vm.serial_console.uart.state()}


@hookimpl
def vmmkit_restore_state(vm, state):
    """Restore the UART."""
    if "serial" in state:
        vm.serial_console.uart.restore(state["serial"])
