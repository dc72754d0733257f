"""Tests for the minimal i8042 controller model (host only, no KVM)."""

from __future__ import annotations

import random
from typing import Optional, Tuple

import pytest

from vmmkit.devices.i8042 import COMMAND_OFFSET, DATA_OFFSET, I8042, I8042State

STR_OBF, STR_IBF, STR_SYS, STR_CMDDAT, STR_KEYLOCK, STR_AUXDATA = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
CTR_KBDDIS, CTR_AUXDIS = 0x10, 0x20


class Ctl:
    """An I8042 plus a reset counter and port helpers."""

    def __init__(self) -> None:
        self.resets = 0
        self.dev = I8042(self._reset)

    def _reset(self) -> None:
        self.resets += 1

    def status(self) -> int:
        return self.dev.bus_read(COMMAND_OFFSET, 1)[0]

    def data(self) -> int:
        return self.dev.bus_read(DATA_OFFSET, 1)[0]

    def command(self, cmd: int, *params: int) -> None:
        self.dev.bus_write(COMMAND_OFFSET, bytes((cmd,)))
        for param in params:
            self.dev.bus_write(DATA_OFFSET, bytes((param,)))

    def ask(self, cmd: int, *params: int) -> int:
        self.command(cmd, *params)
        assert self.status() & STR_OBF
        value = self.data()
        assert not self.status() & STR_OBF
        return value


@pytest.fixture
def ctl() -> Ctl:
    return Ctl()


def test_idle_status(ctl: Ctl) -> None:
    status = ctl.status()
    assert not status & (STR_OBF | STR_IBF)
    assert status & STR_KEYLOCK           # else Linux warns "Keylock active"
    assert status & STR_SYS               # POST done (CTR bit 2)
    assert ctl.data() == 0                # nothing pending reads as 0


def test_self_test(ctl: Ctl) -> None:
    assert ctl.ask(0xAA) == 0x55
    assert ctl.status() & STR_CMDDAT
    assert ctl.resets == 0


def test_command_byte_roundtrip(ctl: Ctl) -> None:
    initial = ctl.ask(0x20)
    assert ctl.ask(0x20) == initial       # Linux wants two identical reads
    ctl.command(0x60, 0x52)
    assert not ctl.status() & STR_CMDDAT
    assert ctl.ask(0x20) == 0x52
    assert not ctl.status() & STR_SYS     # the status SYS bit follows CTR bit 2
    ctl.command(0x60, 0x47)
    assert ctl.ask(0x20) == 0x47
    assert ctl.status() & STR_SYS


def test_interface_tests(ctl: Ctl) -> None:
    assert ctl.ask(0xAB) == 0x00
    # No AUX port: anything but 0x00/0xFA/0xFF makes Linux give up on AUX at once.
    assert ctl.ask(0xA9) not in (0x00, 0xFA, 0xFF)


def test_enable_disable_commands_toggle_ctr(ctl: Ctl) -> None:
    ctl.command(0xA8)
    assert not ctl.ask(0x20) & CTR_AUXDIS
    ctl.command(0xA7)
    assert ctl.ask(0x20) & CTR_AUXDIS
    ctl.command(0xAD)
    assert ctl.ask(0x20) & CTR_KBDDIS
    ctl.command(0xAE)
    assert not ctl.ask(0x20) & CTR_KBDDIS
    assert ctl.status() & STR_OBF == 0


def test_loopback_commands_echo_as_keyboard_data(ctl: Ctl) -> None:
    ctl.command(0xD2, 0x33)
    assert ctl.status() & (STR_OBF | STR_AUXDATA) == STR_OBF
    assert ctl.data() == 0x33
    ctl.command(0xD3, 0x5A)
    assert ctl.status() & (STR_OBF | STR_AUXDATA) == STR_OBF   # Linux: "auxerr"
    assert ctl.data() == 0x5A


def test_reset_commands(ctl: Ctl) -> None:
    ctl.command(0xFE)
    assert ctl.resets == 1
    ctl.command(0xFF)                     # pulses nothing
    ctl.command(0xF1)                     # bit 0 set: reset line not pulsed
    assert ctl.resets == 1
    ctl.command(0xF0)                     # pulses all four lines, reset included
    assert ctl.resets == 2


def test_output_port_write_resets_only_with_bit0_clear(ctl: Ctl) -> None:
    out = ctl.ask(0xD0)
    assert out & 0x01                     # reset line released
    ctl.command(0xD1, out)                # read-modify-write must not reset
    ctl.command(0xD1, 0xDF)               # Linux's A20 enable
    assert ctl.resets == 0
    assert ctl.ask(0xD0) == 0xDF
    ctl.command(0xD1, 0xDE)
    assert ctl.resets == 1
    assert ctl.ask(0xD0) & 0x01


def test_keyboard_bytes_are_dropped(ctl: Ctl) -> None:
    ctl.dev.bus_write(DATA_OFFSET, b"\xf2")  # GETID to a keyboard that isn't there
    assert not ctl.status() & STR_OBF
    assert ctl.resets == 0


def test_new_command_cancels_pending_parameter(ctl: Ctl) -> None:
    ctl.command(0x60)
    ctl.command(0xAA)
    assert ctl.data() == 0x55
    ctl.dev.bus_write(DATA_OFFSET, b"\x00")  # now a keyboard byte, not the CTR
    assert ctl.ask(0x20) != 0x00


# ----------------------------------------------------------------------
# Linux's probe, replayed with its polling loops


class LinuxDriver:
    """Enough of drivers/input/serio/i8042.c to count how long its polls would spin."""

    LOOPS = 10000   # I8042_CTL_TIMEOUT: each loop is udelay(50)

    def __init__(self, ctl: Ctl) -> None:
        self.ctl = ctl
        self.spins = 0

    def wait_write(self) -> bool:
        for _ in range(self.LOOPS):
            if not self.ctl.status() & STR_IBF:
                return True
            self.spins += 1
        return False

    def wait_read(self) -> bool:
        for _ in range(self.LOOPS):
            if self.ctl.status() & STR_OBF:
                return True
            self.spins += 1
        return False

    def command(self, command: int, param: Optional[int] = None) -> Tuple[int, Optional[int]]:
        """__i8042_command: returns (error, response)."""
        if not self.wait_write():
            return -1, None
        self.ctl.dev.bus_write(COMMAND_OFFSET, bytes((command & 0xFF,)))
        for _ in range((command >> 12) & 0xF):
            if not self.wait_write():
                return -1, None
            self.ctl.dev.bus_write(DATA_OFFSET, bytes((param,)))
        value = param
        for _ in range((command >> 8) & 0xF):
            if not self.wait_read():
                return -1, None
            if command == 0x11D3 and not self.ctl.status() & STR_AUXDATA:
                return -1, None   # auxerr
            value = self.ctl.data()
        return 0, value

    def flush(self) -> int:
        count = 0
        while self.ctl.status() & STR_OBF:
            self.ctl.data()
            count += 1
            assert count < 16
        return count

    def check_aux(self) -> bool:
        self.flush()
        err, param = self.command(0x11D3, 0x5A)
        if err or param != 0x5A:
            err2, param = self.command(0x01A9)
            if err2 or (param and param not in (0xFA, 0xFF)):
                return False
        raise AssertionError("Linux would go on to a 250 ms AUX IRQ test")


def test_linux_probe_is_fast_and_finds_no_aux(ctl: Ctl) -> None:
    drv = LinuxDriver(ctl)
    assert drv.flush() == 0                            # i8042_controller_check
    assert drv.command(0x01AA) == (0, 0x55)            # i8042_controller_selftest
    _, ctr0 = drv.command(0x0120)                      # i8042_controller_init
    _, ctr1 = drv.command(0x0120)
    assert ctr0 == ctr1
    assert ctl.status() & STR_KEYLOCK
    ctr = (ctr0 | 0x10) & ~0x01
    assert drv.command(0x1060, ctr)[0] == 0
    assert drv.command(0x0120) == (0, ctr)
    assert drv.check_aux() is False                    # i8042_setup_aux -> -ENODEV
    ctr = (ctr & ~0x10) | 0x01                         # i8042_enable_kbd_port
    assert drv.command(0x1060, ctr)[0] == 0
    assert drv.spins == 0
    assert ctl.resets == 0


# ----------------------------------------------------------------------
# Hostile guest and state


def test_wide_and_out_of_range_accesses(ctl: Ctl) -> None:
    ctl.command(0xAA)
    assert ctl.dev.bus_read(DATA_OFFSET, 4) == b"\x55\xff\xff\xff"
    assert ctl.dev.bus_read(DATA_OFFSET, 0) == b""
    for offset in [1, 2, 3, 5, 6, 255, -1, 1 << 20]:
        assert ctl.dev.bus_read(offset, 1) == b"\xff"
        assert ctl.dev.bus_read(offset, 2) == b"\xff\xff"
        ctl.dev.bus_write(offset, b"\xfe")
    ctl.dev.bus_write(COMMAND_OFFSET, b"")
    assert ctl.resets == 0
    ctl.dev.bus_write(COMMAND_OFFSET, b"\xfe\x00")    # outw: byte 0 counts
    assert ctl.resets == 1


def test_random_guest_never_raises() -> None:
    rng = random.Random(8042)
    ctl = Ctl()
    for _ in range(20000):
        offset = rng.choice([0, 4, 4, rng.randrange(-2, 300)])
        if rng.random() < 0.5:
            size = rng.choice([1, 1, 2, 4])
            assert len(ctl.dev.bus_read(offset, size)) == size
        else:
            ctl.dev.bus_write(offset, bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 1, 2]))))
        ctl.dev.state()
    assert ctl.resets > 0


def test_state_roundtrip() -> None:
    a = Ctl()
    a.command(0x60, 0x61)
    a.command(0xD2, 0x99)                 # a byte waiting in the output buffer
    a.command(0xD1)                       # and a command waiting for its parameter
    state = a.dev.state()
    assert state.version == 1
    assert (state.ctr, state.output, state.pending_command) == (0x61, 0x99, 0xD1)

    b = Ctl()
    b.dev.restore(state)
    assert b.dev.state() == state
    assert b.status() == a.status()
    for ctl in (a, b):
        assert ctl.data() == 0x99
        ctl.dev.bus_write(DATA_OFFSET, b"\x00")   # completes the pending 0xD1: reset
        assert ctl.resets == 1
        assert ctl.ask(0x20) == 0x61


def test_fresh_state_and_validation() -> None:
    assert Ctl().dev.state() == I8042State()
    with pytest.raises(ValueError):
        I8042State(version=0)
    with pytest.raises(ValueError):
        I8042State(ctr=-1)
    with pytest.raises(ValueError):
        I8042State(output=300)
    with pytest.raises(ValueError):
        I8042State(pending_command=0xAA)   # takes no parameter
    with pytest.raises(TypeError):
        Ctl().dev.restore(None)  # type: ignore[arg-type]
