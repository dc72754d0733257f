"""An 8250/16550A UART, the PC serial port the guest's console runs on.

The model is written against what Linux's ``serial8250`` driver
(drivers/tty/serial/8250/8250_port.c) does with the port, because that is
the guest that matters and it is picky:

* **Probe** (``autoconfig``): it writes IER and reads it back (only the low
  four bits may stick), puts the port in loopback with ``MCR = LOOP | OUT2 |
  RTS`` and expects ``MSR & 0xF0 == 0x90``, then enables the FIFO and reads
  the top two IIR bits: ``11`` makes it a 16550A. Further 16550A-variant
  probes poke offset 2 with odd LCR values and look at IIR bits 4/5 and IER
  bits 4-7; they must all read as zero for the port to stay a plain 16550A.
* **THRE test** (``serial8250_do_startup``): it enables THRI in IER, reads
  IIR expecting a THRE interrupt, disables and re-enables THRI and expects
  the interrupt *again*. A UART that does not re-arm THRE on that rising edge
  gets flagged ``UART_BUG_THRE`` (and ``UART_BUG_TXEN`` by the next test) and
  is driven from a polling timer instead of interrupts. So enabling ETBEI
  while THR is empty (always, here) arms the THRE interrupt, as on real
  16550s and in QEMU.
* **Edge-triggered IRQ 4**: the VMM turns :meth:`irq` calls into edges on an
  edge-triggered line. The ISR loops reading IIR until it says "no
  interrupt", so an edge is needed whenever the interrupt output goes from
  idle to pending. On top of that every THR write with ETBEI enabled signals
  a fresh THRE interrupt: the ISR gives up after ``PASS_LIMIT`` loops with
  THRE still pending, and without a new edge for the THRE that follows its
  last write the transmitter would stall (the classic "TX stall" of
  emulated UARTs on edge-triggered lines; Firecracker does the same).
  Extra edges only cost the guest a spurious interrupt, which its ISR
  answers with "IIR: no interrupt".

Transmission is instantaneous: a THR write goes straight to ``out`` and THR
is empty again before the guest's next instruction, so LSR always reports
THRE | TEMT. The receive side is a FIFO of :data:`RX_FIFO_CAPACITY` bytes fed
by :meth:`Uart8250.enqueue_input`, which accepts only what fits: the host
side keeps the rest and retries when :meth:`Uart8250.wants_input` says there
is room, so host input is never dropped (OE only happens in loopback, where
the guest overruns itself).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import attrs

__all__ = [
    "COM1_BASE",
    "COM1_IRQ",
    "RX_FIFO_CAPACITY",
    "UART_PORT_COUNT",
    "Uart8250",
    "Uart8250State",
]

#: The legacy COM1 port range and its ISA IRQ.
COM1_BASE = 0x3F8
COM1_IRQ = 4
#: Number of consecutive ports a UART decodes.
UART_PORT_COUNT = 8

#: How many received bytes the UART buffers for the guest. A real 16550A has
#: 16; Linux reads up to 256 per interrupt while LSR.DR is set, so a deeper
#: FIFO just means fewer interrupts per pasted line. It is the same in
#: 16450 mode (FIFO disabled): the buffer is a host-side convenience.
RX_FIFO_CAPACITY = 64

#: Version of :class:`Uart8250State`'s layout.
STATE_VERSION = 1

# Register offsets.
_RBR_THR = 0   # DLL when LCR.DLAB
_IER = 1       # DLM when LCR.DLAB
_IIR_FCR = 2
_LCR = 3
_MCR = 4
_LSR = 5
_MSR = 6
_SCR = 7

# IER: the four 16550A interrupt enables. Bits 4-7 must read back as zero or
# Linux takes the port for an XScale (UUE, bit 6) or 16750 (bit 5).
_IER_ERBFI = 0x01   # received data available
_IER_ETBEI = 0x02   # transmitter holding register empty
_IER_ELSI = 0x04    # receiver line status
_IER_EDSSI = 0x08   # modem status
_IER_MASK = 0x0F

# IIR interrupt identification, in priority order.
_IIR_NO_INT = 0x01
_IIR_RLS = 0x06
_IIR_RDI = 0x04
_IIR_THRI = 0x02
_IIR_MSI = 0x00
_IIR_FIFO_ENABLED = 0xC0   # both bits: a 16550A with working FIFOs

# FCR.
_FCR_ENABLE = 0x01
_FCR_CLEAR_RX = 0x02
# Bits kept while the FIFO is on: enable, DMA mode, RX trigger level. Bits 1-2
# self-clear; bits 4-5 are 16750-only and stay zero.
_FCR_STORED = 0xC9

# LCR.
_LCR_DLAB = 0x80

# MCR.
_MCR_DTR = 0x01
_MCR_RTS = 0x02
_MCR_OUT1 = 0x04
_MCR_OUT2 = 0x08
_MCR_LOOP = 0x10
_MCR_MASK = 0x1F    # bit 5 (AFE) is 16750-only

# LSR.
_LSR_DR = 0x01
_LSR_OE = 0x02
_LSR_THRE = 0x20
_LSR_TEMT = 0x40
_LSR_ERRORS = 0x1E  # OE | PE | FE | BI: cleared by reading LSR

# MSR.
_MSR_DCTS = 0x01
_MSR_DDSR = 0x02
_MSR_TERI = 0x04
_MSR_DDCD = 0x08
_MSR_DELTAS = 0x0F
_MSR_CTS = 0x10
_MSR_DSR = 0x20
_MSR_RI = 0x40
_MSR_DCD = 0x80
#: Modem lines outside loopback: the "modem" is always there and ready
#: (CTS, DSR, DCD). DCD keeps a non-CLOCAL open from blocking and CTS keeps
#: CRTSCTS flow control from stalling output.
_MSR_LINES_IDLE = _MSR_CTS | _MSR_DSR | _MSR_DCD

# Power-on values where they differ from zero: 9600 baud, 8N1, like a PC
# BIOS would leave them (the guest reprograms both anyway).
_DEFAULT_DLL = 0x0C
_DEFAULT_LCR = 0x03


def _byte(instance: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFF:
        raise ValueError(f"{attribute.name}: expected a byte value 0..255, found {value!r}")


def _to_bytes(value: Any) -> Any:
    # Accept any bytes-like buffer (a deserialiser may hand back a bytearray).
    return bytes(value) if isinstance(value, (bytearray, memoryview)) else value


def _rx_fifo(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{attribute.name}: expected bytes, found {type(value).__name__}")
    if len(value) > RX_FIFO_CAPACITY:
        raise ValueError(f"{attribute.name}: expected at most {RX_FIFO_CAPACITY} bytes, found {len(value)}")


def _version(instance: Any, attribute: Any, value: Any) -> None:
    if value != STATE_VERSION:
        raise ValueError(f"unsupported Uart8250State version {value!r} (this build reads {STATE_VERSION})")


@attrs.frozen
class Uart8250State:
    """A snapshot of a :class:`Uart8250`: every guest-visible register and the RX FIFO.

    Values derived from these (LSR.DR/THRE/TEMT, the MSR line bits, IIR,
    whether the interrupt output is asserted) are recomputed on restore.
    ``version`` identifies the layout; restoring another version fails.
    """

    version: int = attrs.field(default=STATE_VERSION, validator=_version)
    dll: int = attrs.field(default=_DEFAULT_DLL, validator=_byte)
    dlm: int = attrs.field(default=0, validator=_byte)
    ier: int = attrs.field(default=0, validator=_byte)
    lcr: int = attrs.field(default=_DEFAULT_LCR, validator=_byte)
    mcr: int = attrs.field(default=0, validator=_byte)
    scr: int = attrs.field(default=0, validator=_byte)
    #: FCR as written (enable, DMA mode, trigger level); write-only to the guest.
    fcr: int = attrs.field(default=0, validator=_byte)
    #: The sticky LSR error bits (OE, PE, FE, BI) not yet cleared by an LSR read.
    lsr_errors: int = attrs.field(default=0, validator=_byte)
    #: The MSR delta bits (DCTS, DDSR, TERI, DDCD) not yet cleared by an MSR read.
    msr_deltas: int = attrs.field(default=0, validator=_byte)
    #: A THRE interrupt is armed (not yet acknowledged by an IIR read or THR write).
    thr_interrupt_pending: bool = attrs.field(default=False, converter=bool)
    #: Received bytes not yet read by the guest, oldest first.
    rx_fifo: bytes = attrs.field(default=b"", converter=_to_bytes, validator=_rx_fifo)


class Uart8250:
    """A 16550A UART on the port I/O bus (COM1: :data:`COM1_BASE`, IRQ :data:`COM1_IRQ`).

    ``out(data)`` receives each transmitted byte, one call per THR write.
    ``irq()`` signals one interrupt edge to the guest (see the module
    docstring for when). Both are called with the device's lock held and in
    guest order; exceptions they raise propagate to the caller (the vCPU
    thread or the input thread).

    Thread safety: the device locks itself, so the bus need not
    (``bus_lock = False``): vCPU threads call :meth:`bus_read` /
    :meth:`bus_write` while an input thread calls :meth:`enqueue_input`.
    """

    #: The device serialises its own accesses (input arrives from a host
    #: thread that does not go through the bus), see :class:`vmmkit.bus.BusDevice`.
    bus_lock = False

    def __init__(self, out: Callable[[bytes], None], irq: Callable[[], None]) -> None:
        """Create a UART in its power-on state that transmits to ``out`` and interrupts via ``irq``."""
        self._out = out
        self._irq = irq
        self._lock = threading.RLock()
        self._dll = _DEFAULT_DLL
        self._dlm = 0
        self._ier = 0
        self._lcr = _DEFAULT_LCR
        self._mcr = 0
        self._scr = 0
        self._fcr = 0
        self._lsr_errors = 0
        self._msr_deltas = 0
        self._thr_pending = False
        self._rx = bytearray()
        # Whether the interrupt output is asserted, i.e. an edge has been
        # signalled and the condition has not gone idle since. Derived from
        # the registers and kept in sync by _update_irq.
        self._asserted = False

    # ------------------------------------------------------------------
    # Bus interface

    def bus_read(self, offset: int, size: int) -> bytes:
        """Return ``size`` bytes for a guest read at ``offset`` (relative to the base port).

        Byte 0 is the register at ``offset``; the bytes of a wider access
        (``inw``/``inl``) and offsets past the eight registers read as 0xff,
        like an undriven ISA bus.
        """
        if size <= 0:
            return b""
        with self._lock:
            value = self._read(offset) if 0 <= offset < UART_PORT_COUNT else 0xFF
        return bytes((value,)) + b"\xff" * (size - 1)

    def bus_write(self, offset: int, data: bytes) -> None:
        """Handle a guest write of ``data`` at ``offset``: byte 0 goes to the register, the rest is dropped."""
        if not data or not 0 <= offset < UART_PORT_COUNT:
            return
        with self._lock:
            self._write(offset, data[0] & 0xFF)

    # ------------------------------------------------------------------
    # Host side

    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes from the host for the guest to receive; return how many were accepted.

        Accepts as many as fit in the RX FIFO (possibly none) and raises the
        receive interrupt when the guest enabled it. The caller keeps the
        rest and retries once :meth:`wants_input` is true again. Nothing is
        accepted in loopback mode, where the UART's input pin is
        disconnected (Linux's probe must not see host keystrokes).
        """
        with self._lock:
            if self._mcr & _MCR_LOOP:
                return 0
            count = min(len(data), RX_FIFO_CAPACITY - len(self._rx))
            if count <= 0:
                return 0
            self._rx += bytes(data[:count])
            self._update_irq()
            return count

    def wants_input(self) -> bool:
        """Whether :meth:`enqueue_input` would accept at least one byte now."""
        with self._lock:
            return not self._mcr & _MCR_LOOP and len(self._rx) < RX_FIFO_CAPACITY

    # ------------------------------------------------------------------
    # Snapshots

    def state(self) -> Uart8250State:
        """Return a snapshot of the registers and the RX FIFO."""
        with self._lock:
            return Uart8250State(
                dll=self._dll,
                dlm=self._dlm,
                ier=self._ier,
                lcr=self._lcr,
                mcr=self._mcr,
                scr=self._scr,
                fcr=self._fcr,
                lsr_errors=self._lsr_errors,
                msr_deltas=self._msr_deltas,
                thr_interrupt_pending=self._thr_pending,
                rx_fifo=bytes(self._rx),
            )

    def restore(self, state: Uart8250State) -> None:
        """Load a snapshot taken by :meth:`state` (from this or another instance).

        If the snapshot has an interrupt pending, ``irq()`` is called once:
        an edge signalled just before the snapshot may still have been in
        flight (irqfd injection is asynchronous) and missing from the saved
        interrupt controller state, and a lost edge would hang the guest's
        console, whereas a duplicate one is a harmless spurious interrupt.
        """
        if not isinstance(state, Uart8250State):
            raise TypeError(f"expected a Uart8250State, found {type(state).__name__}")
        with self._lock:
            self._dll = state.dll
            self._dlm = state.dlm
            self._ier = state.ier & _IER_MASK
            self._lcr = state.lcr
            self._mcr = state.mcr & _MCR_MASK
            self._scr = state.scr
            self._fcr = state.fcr & _FCR_STORED if state.fcr & _FCR_ENABLE else 0
            self._lsr_errors = state.lsr_errors & _LSR_ERRORS
            self._msr_deltas = state.msr_deltas & _MSR_DELTAS
            self._thr_pending = state.thr_interrupt_pending
            self._rx = bytearray(state.rx_fifo)
            self._asserted = False
            self._update_irq()

    # ------------------------------------------------------------------
    # Register logic

    def _read(self, offset: int) -> int:
        dlab = self._lcr & _LCR_DLAB
        if offset == _RBR_THR:
            if dlab:
                return self._dll
            return self._read_rbr()
        if offset == _IER:
            return self._dlm if dlab else self._ier
        if offset == _IIR_FCR:
            return self._read_iir()
        if offset == _LCR:
            return self._lcr
        if offset == _MCR:
            return self._mcr
        if offset == _LSR:
            return self._read_lsr()
        if offset == _MSR:
            return self._read_msr()
        return self._scr   # _SCR

    def _write(self, offset: int, value: int) -> None:
        dlab = self._lcr & _LCR_DLAB
        if offset == _RBR_THR:
            if dlab:
                self._dll = value   # divisor latch: no byte goes out
            else:
                self._write_thr(value)
        elif offset == _IER:
            if dlab:
                self._dlm = value
            else:
                self._write_ier(value)
        elif offset == _IIR_FCR:
            self._write_fcr(value)
        elif offset == _LCR:
            self._lcr = value
        elif offset == _MCR:
            self._write_mcr(value)
        elif offset == _SCR:
            self._scr = value
        # LSR and MSR are read-only (writes to them are factory-test hooks
        # on real chips): ignore.

    def _read_rbr(self) -> int:
        if not self._rx:
            return 0
        value = self._rx.pop(0)
        self._update_irq()   # the FIFO may have run dry: RDI goes idle
        return value

    def _write_thr(self, value: int) -> None:
        if self._mcr & _MCR_LOOP:
            # Loopback: the transmitter feeds the receiver and the line stays
            # idle. Linux's probe and some self-tests read the byte back.
            if len(self._rx) < RX_FIFO_CAPACITY:
                self._rx.append(value)
            else:
                self._lsr_errors |= _LSR_OE   # the guest overran its own FIFO
        else:
            self._out(bytes((value,)))
        # Writing THR acknowledges the THRE interrupt, and since the byte is
        # gone at once THR is empty again: a new THRE interrupt. Signal it as
        # a new edge whenever ETBEI is on, even if the output was already
        # asserted, so an ISR that stopped at PASS_LIMIT gets called again.
        self._thr_pending = True
        self._update_irq(force=bool(self._ier & _IER_ETBEI))

    def _write_ier(self, value: int) -> None:
        value &= _IER_MASK
        if value & _IER_ETBEI and not self._ier & _IER_ETBEI:
            # Rising edge of ETBEI with THR empty arms THRE. Linux's startup
            # THRE test and __start_tx (which enables THRI and waits for the
            # interrupt to start sending) depend on it.
            self._thr_pending = True
        self._ier = value
        self._update_irq()

    def _read_iir(self) -> int:
        source = self._interrupt_source()
        if source == _IIR_THRI:
            # Reading IIR acknowledges THRE when it is the reported source.
            self._thr_pending = False
            self._update_irq()
        fifo = _IIR_FIFO_ENABLED if self._fcr & _FCR_ENABLE else 0
        return source | fifo

    def _write_fcr(self, value: int) -> None:
        enable = value & _FCR_ENABLE
        if value & _FCR_CLEAR_RX or enable != self._fcr & _FCR_ENABLE:
            # Linux's serial8250_clear_fifos; switching the FIFOs on or off
            # also empties them on a real 16550A.
            self._rx.clear()
        # With FCR0 clear the other bits are not programmed (16550A rule);
        # this also makes Linux's EFR write (0 to offset 2 under LCR=0xBF)
        # simply turn the FIFO off, as on a genuine 16550A.
        self._fcr = value & _FCR_STORED if enable else 0
        self._update_irq()

    def _read_lsr(self) -> int:
        value = _LSR_THRE | _LSR_TEMT | self._lsr_errors
        if self._rx:
            value |= _LSR_DR
        if self._lsr_errors:
            self._lsr_errors = 0   # error bits clear on read, and so does RLS
            self._update_irq()
        return value

    def _write_mcr(self, value: int) -> None:
        before = self._modem_lines()
        self._mcr = value & _MCR_MASK
        after = self._modem_lines()
        changed = before ^ after
        # The delta bits latch line changes until MSR is read; entering and
        # leaving loopback changes the lines too, as on real hardware.
        if changed & _MSR_CTS:
            self._msr_deltas |= _MSR_DCTS
        if changed & _MSR_DSR:
            self._msr_deltas |= _MSR_DDSR
        if before & _MSR_RI and not after & _MSR_RI:
            self._msr_deltas |= _MSR_TERI   # trailing edge of RI only
        if changed & _MSR_DCD:
            self._msr_deltas |= _MSR_DDCD
        self._update_irq()

    def _read_msr(self) -> int:
        value = self._modem_lines() | self._msr_deltas
        if self._msr_deltas:
            self._msr_deltas = 0
            self._update_irq()
        return value

    def _modem_lines(self) -> int:
        """The MSR line bits (CTS, DSR, RI, DCD) as the UART sees them now."""
        if not self._mcr & _MCR_LOOP:
            return _MSR_LINES_IDLE
        # Loopback wires the modem outputs to the inputs: RTS->CTS, DTR->DSR,
        # OUT1->RI, OUT2->DCD. Linux's probe writes LOOP|OUT2|RTS and wants
        # exactly DCD|CTS (0x90) back.
        mcr = self._mcr
        lines = 0
        if mcr & _MCR_RTS:
            lines |= _MSR_CTS
        if mcr & _MCR_DTR:
            lines |= _MSR_DSR
        if mcr & _MCR_OUT1:
            lines |= _MSR_RI
        if mcr & _MCR_OUT2:
            lines |= _MSR_DCD
        return lines

    # ------------------------------------------------------------------
    # Interrupts

    def _interrupt_source(self) -> int:
        """The IIR identification bits of the highest-priority enabled pending interrupt."""
        ier = self._ier
        if ier & _IER_ELSI and self._lsr_errors:
            return _IIR_RLS
        if ier & _IER_ERBFI and self._rx:
            # We never report the character-timeout variant (0x0C): data is
            # reported as soon as it arrives, whatever the trigger level, and
            # Linux drains the FIFO on either.
            return _IIR_RDI
        if ier & _IER_ETBEI and self._thr_pending:
            return _IIR_THRI
        if ier & _IER_EDSSI and self._msr_deltas:
            return _IIR_MSI
        return _IIR_NO_INT

    def _update_irq(self, force: bool = False) -> None:
        """Recompute the interrupt output and signal an edge when it rises (or when ``force``d).

        The output is not gated by MCR.OUT2 (as it is on a PC board): QEMU,
        Firecracker and Cloud Hypervisor don't gate it either, and guests
        tested there may never set OUT2.
        """
        pending = self._interrupt_source() != _IIR_NO_INT
        rising = pending and not self._asserted
        self._asserted = pending
        if pending and (rising or force):
            self._irq()
