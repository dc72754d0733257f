"""Tests for the 8250/16550A UART model (host only, no KVM)."""

from __future__ import annotations

import random
import threading
from typing import List

import attrs
import pytest

from vmmkit.devices.uart8250 import RX_FIFO_CAPACITY, Uart8250, Uart8250State

# Register offsets and bits, spelled out here so the tests don't just echo the module.
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 0x01, 0x02, 0x04, 0x08
IIR_NO_INT, IIR_THRI, IIR_RDI, IIR_RLSI, IIR_MSI = 0x01, 0x02, 0x04, 0x06, 0x00
IIR_FIFO = 0xC0
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80


class Port:
    """A UART plus recorders for what it transmits and how many edges it signals."""

    def __init__(self) -> None:
        self.out: List[bytes] = []
        self.irqs = 0
        self.uart = Uart8250(self.out.append, self._irq)

    def _irq(self) -> None:
        self.irqs += 1

    def rd(self, offset: int) -> int:
        data = self.uart.bus_read(offset, 1)
        assert len(data) == 1
        return data[0]

    def wr(self, offset: int, value: int) -> None:
        self.uart.bus_write(offset, bytes((value,)))

    @property
    def sent(self) -> bytes:
        return b"".join(self.out)


@pytest.fixture
def port() -> Port:
    return Port()


# ----------------------------------------------------------------------
# Transmit and divisor latch


def test_thr_write_transmits_one_call_per_byte(port: Port) -> None:
    for byte in b"hi\n":
        port.wr(THR, byte)
    assert port.out == [b"h", b"i", b"\n"]
    assert port.rd(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT


def test_dlab_switches_to_divisor_latch_and_does_not_transmit(port: Port) -> None:
    port.wr(IER, 0x05)
    port.wr(LCR, 0x83)          # DLAB | 8N1
    port.wr(DLL, 0x01)
    port.wr(DLM, 0x02)
    assert port.out == []
    assert (port.rd(DLL), port.rd(DLM)) == (0x01, 0x02)
    port.wr(LCR, 0x03)
    assert port.rd(IER) == 0x05          # IER untouched by the DLM write
    assert port.rd(LCR) == 0x03
    port.wr(THR, ord("x"))
    assert port.sent == b"x"
    port.wr(LCR, 0x83)
    assert (port.rd(DLL), port.rd(DLM)) == (0x01, 0x02)


def test_ier_keeps_only_the_16550a_bits(port: Port) -> None:
    # Linux's autoconfig: 0x0F must stick, and bits 4-7 must read back as 0
    # or the port is taken for an XScale (UUE) or a 16750.
    port.wr(IER, 0xFF)
    assert port.rd(IER) == 0x0F
    port.wr(IER, 0x00)
    assert port.rd(IER) == 0x00


# ----------------------------------------------------------------------
# THRE interrupt


def test_enabling_thre_interrupt_raises_irq_and_iir_read_clears_it(port: Port) -> None:
    port.wr(FCR, 0x01)
    port.wr(IER, IER_THRI)
    assert port.irqs == 1
    assert port.rd(IIR) == IIR_FIFO | IIR_THRI          # 0xC2
    assert port.rd(IIR) == IIR_FIFO | IIR_NO_INT        # acknowledged by the read
    assert port.irqs == 1


def test_iir_without_fifo_has_no_fifo_bits(port: Port) -> None:
    assert port.rd(IIR) == IIR_NO_INT
    port.wr(IER, IER_THRI)
    assert port.rd(IIR) == IIR_THRI


def test_linux_thre_test_sees_thre_rearmed(port: Port) -> None:
    # serial8250_do_startup: IER=THRI, read IIR, IER=0, IER=THRI, read IIR.
    # Both reads must report THRI or Linux sets UART_BUG_THRE and polls.
    port.wr(IER, IER_THRI)
    iir1 = port.rd(IIR)
    port.wr(IER, 0)
    port.wr(IER, IER_THRI)
    iir = port.rd(IIR)
    port.wr(IER, 0)
    assert not iir1 & IIR_NO_INT
    assert not iir & IIR_NO_INT
    # The UART_BUG_TXEN test right after: IER=THRI, LSR, IIR.
    port.wr(IER, IER_THRI)
    lsr = port.rd(LSR)
    iir = port.rd(IIR)
    port.wr(IER, 0)
    assert lsr & LSR_TEMT and not iir & IIR_NO_INT


def test_rewriting_ier_with_thri_already_set_does_not_rearm(port: Port) -> None:
    port.wr(IER, IER_THRI)
    port.rd(IIR)
    port.wr(IER, IER_THRI | IER_RDI)     # THRI stays on: no rising edge
    assert port.rd(IIR) == IIR_NO_INT
    assert port.irqs == 1


def test_every_thr_write_with_etbei_signals_an_edge(port: Port) -> None:
    # The TX-stall guard: even with THRE still pending (the ISR hit its pass
    # limit without reading IIR again), each write gives a fresh edge.
    port.wr(IER, IER_THRI)
    assert port.irqs == 1
    for n, byte in enumerate(b"abcd", start=2):
        port.wr(THR, byte)
        assert port.irqs == n
    assert port.rd(IIR) == IIR_THRI
    port.wr(THR, ord("e"))
    assert port.irqs == 6
    assert port.sent == b"abcde"


def test_thr_write_without_etbei_signals_nothing(port: Port) -> None:
    port.wr(IER, IER_RDI)
    for byte in b"console":
        port.wr(THR, byte)
    assert port.irqs == 0
    assert port.rd(IIR) == IIR_NO_INT


def test_console_write_restoring_ier_rearms_thre(port: Port) -> None:
    # serial8250_console_write clears IER, polls LSR and writes THR, then
    # restores IER: the THRE interrupt of the interrupted tty write must
    # come back, with an edge, or the tty transmit stalls.
    port.wr(IER, IER_RDI | IER_THRI)
    port.rd(IIR)
    edges = port.irqs
    port.wr(IER, 0)
    for byte in b"printk":
        assert port.rd(LSR) & LSR_THRE
        port.wr(THR, byte)
    port.wr(IER, IER_RDI | IER_THRI)
    assert port.irqs == edges + 1
    assert port.rd(IIR) == IIR_THRI


# ----------------------------------------------------------------------
# Receive


def test_rx_sets_dr_raises_irq_and_rbr_drains(port: Port) -> None:
    port.wr(IER, IER_RDI)
    assert port.irqs == 0
    assert port.uart.enqueue_input(b"ok") == 2
    assert port.irqs == 1
    assert port.rd(LSR) & LSR_DR
    assert port.rd(IIR) == IIR_RDI
    assert port.rd(RBR) == ord("o")
    assert port.rd(IIR) == IIR_RDI        # still data
    assert port.rd(RBR) == ord("k")
    assert not port.rd(LSR) & LSR_DR
    assert port.rd(IIR) == IIR_NO_INT
    assert port.rd(RBR) == 0              # empty FIFO reads as 0


def test_rx_without_erbfi_sets_dr_but_no_irq(port: Port) -> None:
    assert port.uart.enqueue_input(b"a") == 1
    assert port.irqs == 0
    assert port.rd(LSR) & LSR_DR
    assert port.rd(IIR) == IIR_NO_INT
    port.wr(IER, IER_RDI)                 # enabling it later raises it
    assert port.irqs == 1
    assert port.rd(IIR) == IIR_RDI


def test_rdi_has_priority_over_thri(port: Port) -> None:
    port.wr(FCR, 0x01)
    port.wr(IER, IER_RDI | IER_THRI)
    port.uart.enqueue_input(b"z")
    assert port.rd(IIR) == IIR_FIFO | IIR_RDI
    assert port.rd(IIR) == IIR_FIFO | IIR_RDI   # reading IIR doesn't ack RDI or THRI
    assert port.rd(RBR) == ord("z")
    assert port.rd(IIR) == IIR_FIFO | IIR_THRI
    assert port.rd(IIR) == IIR_FIFO | IIR_NO_INT


def test_edges_only_on_rising_interrupt_output(port: Port) -> None:
    port.wr(IER, IER_RDI)
    port.uart.enqueue_input(b"a")
    port.uart.enqueue_input(b"b")         # still pending: the ISR drains all
    assert port.irqs == 1
    port.rd(RBR)
    port.rd(RBR)
    port.uart.enqueue_input(b"c")         # idle -> pending again
    assert port.irqs == 2


def test_enqueue_input_is_bounded_and_reports_what_it_took(port: Port) -> None:
    data = bytes(range(RX_FIFO_CAPACITY + 10))
    assert port.uart.enqueue_input(data) == RX_FIFO_CAPACITY
    assert not port.uart.wants_input()
    assert port.uart.enqueue_input(b"more") == 0
    assert port.uart.enqueue_input(b"") == 0
    assert port.rd(RBR) == 0
    assert port.uart.wants_input()
    assert port.uart.enqueue_input(data[RX_FIFO_CAPACITY:]) == 1
    received = bytes(port.rd(RBR) for _ in range(RX_FIFO_CAPACITY))
    assert received == data[1:RX_FIFO_CAPACITY] + data[RX_FIFO_CAPACITY:RX_FIFO_CAPACITY + 1]
    assert not port.rd(LSR) & LSR_DR
    assert not port.rd(LSR) & LSR_OE      # backpressure, not overrun


def test_fcr_clear_rx_empties_the_fifo(port: Port) -> None:
    port.wr(FCR, 0x01)
    port.uart.enqueue_input(b"stale")
    port.wr(FCR, 0x01 | 0x02 | 0x04)
    assert not port.rd(LSR) & LSR_DR
    port.uart.enqueue_input(b"x")
    port.wr(FCR, 0x00)                    # turning the FIFO off empties it too
    assert not port.rd(LSR) & LSR_DR
    assert port.rd(IIR) == IIR_NO_INT


def test_input_thread_and_guest_reads_keep_order(port: Port) -> None:
    # The host input thread calls enqueue_input while a vCPU thread reads:
    # the device locks itself (bus_lock = False), so nothing is lost or reordered.
    assert Uart8250.bus_lock is False
    data = random.Random(1).randbytes(4000)

    def feed() -> None:
        pos = 0
        while pos < len(data):
            pos += port.uart.enqueue_input(data[pos:pos + 100])

    feeder = threading.Thread(target=feed)
    feeder.start()
    received = bytearray()
    while len(received) < len(data):
        if port.rd(LSR) & LSR_DR:
            received.append(port.rd(RBR))
    feeder.join()
    assert bytes(received) == data


# ----------------------------------------------------------------------
# Loopback, overrun, modem status


def test_loopback_thr_goes_to_rbr_not_out(port: Port) -> None:
    port.wr(MCR, MCR_LOOP)
    port.wr(THR, 0x5A)
    assert port.out == []
    assert port.rd(LSR) & LSR_DR
    assert port.rd(RBR) == 0x5A
    port.wr(MCR, 0)
    port.wr(THR, 0x41)
    assert port.sent == b"A"


def test_loopback_refuses_host_input(port: Port) -> None:
    port.wr(MCR, MCR_LOOP)
    assert not port.uart.wants_input()
    assert port.uart.enqueue_input(b"keys") == 0
    assert not port.rd(LSR) & LSR_DR
    port.wr(MCR, 0)
    assert port.uart.wants_input()
    assert port.uart.enqueue_input(b"keys") == 4


def test_loopback_rx_interrupt(port: Port) -> None:
    port.wr(IER, IER_RDI)
    port.wr(MCR, MCR_LOOP)
    port.wr(THR, 1)
    assert port.irqs == 1
    assert port.rd(IIR) == IIR_RDI


def test_overrun_sets_oe_cleared_by_lsr_read(port: Port) -> None:
    port.wr(IER, IER_RLSI)
    port.wr(MCR, MCR_LOOP)
    for n in range(RX_FIFO_CAPACITY):
        port.wr(THR, n)
    assert port.irqs == 0
    port.wr(THR, 0xEE)                    # one too many: lost, OE
    assert port.irqs == 1
    assert port.rd(IIR) == IIR_RLSI
    lsr = port.rd(LSR)
    assert lsr & LSR_OE and lsr & LSR_DR
    assert not port.rd(LSR) & LSR_OE
    assert port.rd(IIR) == IIR_NO_INT
    assert [port.rd(RBR) for _ in range(RX_FIFO_CAPACITY)] == list(range(RX_FIFO_CAPACITY))


@pytest.mark.parametrize(
    "mcr, lines",
    [
        (MCR_DTR, MSR_DSR),
        (MCR_RTS, MSR_CTS),
        (MCR_OUT1, MSR_RI),
        (MCR_OUT2, MSR_DCD),
        (MCR_OUT2 | MCR_RTS, MSR_DCD | MSR_CTS),   # Linux's probe: expects 0x90
        (0x0F, 0xF0),
        (0x00, 0x00),
    ],
)
def test_msr_mirrors_mcr_in_loopback(port: Port, mcr: int, lines: int) -> None:
    port.wr(MCR, MCR_LOOP | mcr)
    assert port.rd(MSR) & 0xF0 == lines
    assert port.rd(MCR) == MCR_LOOP | mcr


def test_msr_outside_loopback_reports_a_ready_modem(port: Port) -> None:
    assert port.rd(MSR) == MSR_CTS | MSR_DSR | MSR_DCD
    port.wr(MCR, MCR_DTR | MCR_RTS | MCR_OUT2)
    assert port.rd(MSR) == MSR_CTS | MSR_DSR | MSR_DCD


def test_msr_deltas_latch_and_clear_on_read(port: Port) -> None:
    port.wr(IER, IER_MSI)
    port.wr(MCR, MCR_LOOP | MCR_OUT1 | MCR_RTS | MCR_DTR | MCR_OUT2)
    assert port.irqs == 0                  # RI rising: no TERI; others unchanged
    port.wr(MCR, MCR_LOOP | MCR_RTS | MCR_DTR | MCR_OUT2)   # RI trailing edge
    assert port.irqs == 1
    assert port.rd(IIR) == IIR_MSI
    msr = port.rd(MSR)
    assert msr & 0x0F == 0x04              # TERI
    assert port.rd(MSR) & 0x0F == 0
    assert port.rd(IIR) == IIR_NO_INT
    port.wr(MCR, MCR_LOOP)                 # CTS, DSR, DCD drop
    assert port.rd(MSR) == 0x01 | 0x02 | 0x08


def test_scratch_register(port: Port) -> None:
    assert port.rd(SCR) == 0
    for value in (0x55, 0xAA, 0x00, 0xFF):
        port.wr(SCR, value)
        assert port.rd(SCR) == value
    assert port.out == []


def test_linux_autoconfig_finds_a_16550a(port: Port) -> None:
    """Replay serial8250's autoconfig() and autoconfig_16550a() and check what they conclude."""
    u = port
    # Existence test via IER.
    scratch = u.rd(IER)
    u.wr(IER, 0)
    scratch2 = u.rd(IER) & 0x0F
    u.wr(IER, 0x0F)
    scratch3 = u.rd(IER) & 0x0F
    u.wr(IER, scratch)
    assert (scratch2, scratch3) == (0, 0x0F)
    save_mcr, save_lcr = u.rd(MCR), u.rd(LCR)
    # Loopback test.
    u.wr(MCR, MCR_LOOP | 0x0A)
    status1 = u.rd(MSR) & 0xF0
    u.wr(MCR, save_mcr)
    assert status1 == 0x90
    # FIFO type from IIR bits 6-7 (EFR write first: 0 to offset 2 under LCR=0xBF).
    u.wr(LCR, 0xBF)
    u.wr(FCR, 0)
    u.wr(LCR, 0)
    u.wr(FCR, 0x01)
    assert u.rd(IIR) >> 6 == 3
    # autoconfig_16550a: EFR probes (offset 2 under LCR 0x80 / 0xBF) must read non-zero.
    u.wr(LCR, 0x80)
    assert u.rd(IIR) != 0
    u.wr(LCR, 0xBF)
    assert u.rd(IIR) != 0
    # NS16550A probe: IIR bit 4 must not track MCR.LOOP.
    u.wr(LCR, 0)
    mcr = u.rd(MCR)
    u.wr(LCR, 0xE0)
    status2 = u.rd(IIR)
    assert not (status2 ^ mcr) & MCR_LOOP
    u.wr(LCR, 0)
    u.wr(MCR, mcr ^ MCR_LOOP)
    u.wr(LCR, 0xE0)
    status2 = u.rd(IIR)
    u.wr(LCR, 0)
    u.wr(MCR, mcr)
    assert not (status2 ^ mcr) & MCR_LOOP
    # TI16750 probe: 64-byte FIFO bit (IIR bit 5) never set.
    u.wr(FCR, 0x01 | 0x20)
    assert u.rd(IIR) & 0xE0 == 0xC0
    u.wr(LCR, 0x80)
    u.wr(FCR, 0x01 | 0x20)
    assert u.rd(IIR) & 0xE0 == 0xC0
    u.wr(LCR, save_lcr)
    # Startup: clear FIFOs, LSR must not read as 0xff.
    u.wr(FCR, 0x01)
    u.wr(FCR, 0x07)
    u.wr(FCR, 0)
    for reg in (LSR, RBR, IIR, MSR):
        u.rd(reg)
    assert u.rd(LSR) != 0xFF
    assert u.out == []


# ----------------------------------------------------------------------
# Hostile guest


def test_wide_and_out_of_range_accesses(port: Port) -> None:
    port.wr(SCR, 0x12)
    assert port.uart.bus_read(SCR, 4) == b"\x12\xff\xff\xff"
    assert port.uart.bus_read(SCR, 2) == b"\x12\xff"
    assert port.uart.bus_read(0, 0) == b""
    for offset in list(range(8, 256)) + [-1, 1 << 20]:
        assert port.uart.bus_read(offset, 1) == b"\xff"
        assert port.uart.bus_read(offset, 4) == b"\xff" * 4
        port.uart.bus_write(offset, b"\x00\x01\x02\x03")
    port.uart.bus_write(THR, b"AB")          # outw: low byte only
    port.uart.bus_write(THR, b"")
    port.uart.bus_write(THR, bytearray(b"C"))
    port.uart.bus_write(THR, memoryview(b"D"))
    assert port.sent == b"ACD"
    assert port.rd(SCR) == 0x12


def test_random_guest_never_raises() -> None:
    rng = random.Random(8250)
    port = Port()
    for _ in range(20000):
        choice = rng.random()
        offset = rng.choice([rng.randrange(8), rng.randrange(-4, 300)])
        if choice < 0.45:
            size = rng.choice([1, 1, 1, 2, 4, 8])
            assert len(port.uart.bus_read(offset, size)) == size
        elif choice < 0.9:
            data = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 1, 2, 4])))
            port.uart.bus_write(offset, data)
        else:
            taken = port.uart.enqueue_input(bytes(rng.randrange(256) for _ in range(rng.randrange(100))))
            assert 0 <= taken <= RX_FIFO_CAPACITY
        state = port.uart.state()
        assert len(state.rx_fifo) <= RX_FIFO_CAPACITY
        assert state.ier <= 0x0F and state.mcr <= 0x1F


# ----------------------------------------------------------------------
# State


def test_state_roundtrip_with_pending_input() -> None:
    a = Port()
    a.wr(LCR, 0x83)
    a.wr(DLL, 0x01)
    a.wr(LCR, 0x1B)
    a.wr(FCR, 0xC1)
    a.wr(IER, IER_RDI | IER_THRI)
    a.wr(MCR, MCR_DTR | MCR_RTS | MCR_OUT2)
    a.wr(SCR, 0x77)
    a.uart.enqueue_input(b"pending")
    a.rd(RBR)
    state = a.uart.state()
    assert state.version == 1
    assert state.rx_fifo == b"ending"

    b = Port()
    b.uart.restore(state)
    assert b.uart.state() == state
    # The restored device re-signals its pending interrupt once.
    assert b.irqs == 1
    assert [b.rd(reg) for reg in (IER, LCR, MCR, SCR, MSR)] == [a.rd(reg) for reg in (IER, LCR, MCR, SCR, MSR)]
    assert bytes(b.rd(RBR) for _ in range(6)) == b"ending"
    assert bytes(a.rd(RBR) for _ in range(6)) == b"ending"
    b.wr(LCR, 0x9B)
    assert b.rd(DLL) == 0x01


def test_restored_device_behaves_identically() -> None:
    rng = random.Random(16550)
    a = Port()
    for _ in range(3000):
        _random_op(rng, a)
    b = Port()
    b.uart.restore(a.uart.state())
    a.irqs = b.irqs = 0
    a.out.clear()
    for _ in range(3000):
        seed = rng.random()
        ra, rb = random.Random(seed), random.Random(seed)
        assert _random_op(ra, a) == _random_op(rb, b)
    assert a.out == b.out
    assert a.irqs == b.irqs
    assert a.uart.state() == b.uart.state()


def _random_op(rng: random.Random, port: Port) -> object:
    choice = rng.random()
    offset = rng.randrange(8)
    if choice < 0.5:
        return port.uart.bus_read(offset, 1)
    if choice < 0.95:
        # Keep loopback rare so input is mostly accepted.
        value = rng.randrange(256)
        if offset == MCR and rng.random() < 0.8:
            value &= ~MCR_LOOP
        port.uart.bus_write(offset, bytes((value,)))
        return None
    return port.uart.enqueue_input(bytes(rng.randrange(256) for _ in range(rng.randrange(20))))


def test_fresh_state_matches_a_fresh_device() -> None:
    assert Port().uart.state() == Uart8250State()


def test_state_validation() -> None:
    with pytest.raises(ValueError):
        Uart8250State(version=2)
    with pytest.raises(ValueError):
        Uart8250State(ier=256)
    with pytest.raises(ValueError):
        Uart8250State(rx_fifo=bytes(RX_FIFO_CAPACITY + 1))
    with pytest.raises(TypeError):
        Uart8250State(rx_fifo="text")  # type: ignore[arg-type]
    assert Uart8250State(rx_fifo=bytearray(b"ab")).rx_fifo == b"ab"
    with pytest.raises(TypeError):
        Port().uart.restore(object())  # type: ignore[arg-type]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Uart8250State().ier = 1  # type: ignore[misc]
