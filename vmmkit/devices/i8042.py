"""A minimal i8042 PS/2 keyboard controller: enough for Linux to probe it fast and to reset the VM.

There is no keyboard or mouse behind it and no interrupt line. What the
model must get right is the controller protocol Linux's i8042 driver
(drivers/input/serio/i8042.c) runs at boot, because every command whose
answer never comes costs a 500 ms busy-wait (``i8042_wait_read`` spins
10000 x 50 us) and a missing IRQ costs a 250 ms sleep:

* The status register never shows IBF (commands are processed on the
  spot) and always shows the keylock switch open, or Linux warns "Keylock
  active". OBF is set exactly when a response byte is waiting on port 0x60.
* ``i8042_controller_init`` reads the command byte (CTR) until two reads
  agree, then writes it back: 0x20/0x60 keep one byte.
* AUX (mouse) detection, ``i8042_check_aux``: the AUX loopback command 0xD3
  is answered at once but as *keyboard* data (status AUXDATA clear), which
  Linux reports as "auxerr"; it then asks for the AUX interface test 0xA9
  and a non-zero, non-0xFA/0xFF answer (we report the clock line stuck)
  makes it conclude there is no AUX port, immediately. Answering 0xA9 with
  0 ("interface OK") would instead send Linux on to its AUX IRQ delivery
  test, which waits 250 ms for an IRQ 12 that this model cannot raise.
  Since the active-multiplexing probe only runs once an AUX port was found,
  guests need neither ``i8042.noaux`` nor ``i8042.nomux``.
* 0xA7/0xA8 and 0xAD/0xAE set and clear the disable bits in the CTR, which
  ``i8042_toggle_aux`` polls for.

The keyboard port still gets registered; atkbd's probe then times out
waiting for keyboard answers, asleep in the serio worker, off the boot path.

Reset: command 0xFE (and the other "pulse output port" commands 0xF0-0xFF
that pulse bit 0, the CPU reset line), or writing the output port (0xD1)
with bit 0 clear, calls ``reset()``. That is Linux's ``reboot=k`` path.

Port layout: the controller decodes the data port at offset 0 (0x60) and the
status/command port at offset 4 (0x64) of a :data:`I8042_PORT_COUNT`-port
range at :data:`I8042_BASE`. Offsets 1-3 read as 0xff and ignore writes:
port 0x61 (NMI status, PIT channel 2 gate) is not the controller's; KVM's
in-kernel PIT (KVM_CREATE_PIT2) answers it before the exit reaches the
userspace bus, and without one, all-ones is what Linux copes with best (its
PIT calibration loop polling bit 5 ends instead of spinning).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

import attrs

__all__ = [
    "COMMAND_OFFSET",
    "DATA_OFFSET",
    "I8042",
    "I8042State",
    "I8042_BASE",
    "I8042_PORT_COUNT",
]

#: Where the controller sits on the port I/O bus: 0x60 (data) .. 0x64 (status/command).
I8042_BASE = 0x60
I8042_PORT_COUNT = 5
#: Offsets of the data port (0x60) and the status/command port (0x64) in that range.
DATA_OFFSET = 0
COMMAND_OFFSET = 4

#: Version of :class:`I8042State`'s layout.
STATE_VERSION = 1

# Status register bits.
_STR_OBF = 0x01        # output buffer full: a byte waits on port 0x60
_STR_SYS = 0x04        # system flag, mirrors CTR bit 2
_STR_CMDDAT = 0x08     # last write went to port 0x64 (command) rather than 0x60
_STR_KEYLOCK = 0x10    # 1 = keylock switch open (keyboard not inhibited)

# Command byte (CTR) bits.
_CTR_KBDINT = 0x01
_CTR_SYS = 0x04
_CTR_KBDDIS = 0x10
_CTR_AUXDIS = 0x20
_CTR_XLATE = 0x40
#: What a PC BIOS leaves in the CTR: keyboard interrupt on, POST passed,
#: scancode translation on, AUX disabled (there is no AUX port here).
_DEFAULT_CTR = _CTR_KBDINT | _CTR_SYS | _CTR_AUXDIS | _CTR_XLATE

# Output port: bit 0 is the CPU reset line (active low), bit 1 the A20 gate.
_OUTP_RESET_RELEASED = 0x01
_OUTP_A20 = 0x02
#: Reset released and A20 on, so a guest doing read-modify-write of the
#: output port (0xD0, then 0xD1 with the value) to flip A20 does not reset
#: the machine by accident.
_DEFAULT_OUTPUT_PORT = _OUTP_RESET_RELEASED | _OUTP_A20

# Controller commands (written to port 0x64).
_CMD_READ_CTR = 0x20
_CMD_READ_RAM_LAST = 0x3F      # 0x21-0x3F read internal RAM bytes 1-31
_CMD_WRITE_CTR = 0x60
_CMD_WRITE_RAM_LAST = 0x7F     # 0x61-0x7F write internal RAM bytes 1-31
_CMD_AUX_DISABLE = 0xA7
_CMD_AUX_ENABLE = 0xA8
_CMD_AUX_TEST = 0xA9
_CMD_SELF_TEST = 0xAA
_CMD_KBD_TEST = 0xAB
_CMD_KBD_DISABLE = 0xAD
_CMD_KBD_ENABLE = 0xAE
_CMD_READ_OUTPUT_PORT = 0xD0
_CMD_WRITE_OUTPUT_PORT = 0xD1
_CMD_WRITE_KBD_OUTPUT = 0xD2   # echo a byte as if from the keyboard
_CMD_WRITE_AUX_OUTPUT = 0xD3   # echo a byte as if from the mouse
_CMD_WRITE_AUX = 0xD4          # send a byte to the mouse
_CMD_PULSE_FIRST = 0xF0        # 0xF0-0xFF pulse output port bits 0-3 whose command bit is 0

# Commands that take a parameter byte on port 0x60.
_COMMANDS_WITH_DATA = frozenset(
    {_CMD_WRITE_OUTPUT_PORT, _CMD_WRITE_KBD_OUTPUT, _CMD_WRITE_AUX_OUTPUT, _CMD_WRITE_AUX}
) | frozenset(range(_CMD_WRITE_CTR, _CMD_WRITE_RAM_LAST + 1))

# Responses.
_SELF_TEST_PASSED = 0x55
_INTERFACE_OK = 0x00
#: AUX interface test result "clock line stuck high": nothing is connected.
#: Linux treats 0x01-0x03 (anything but 0x00, 0xFA, 0xFF) as "no AUX port".
_AUX_INTERFACE_ABSENT = 0x02


def _byte(instance: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFF:
        raise ValueError(f"{attribute.name}: expected a byte value 0..255, found {value!r}")


def _optional_byte(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None:
        _byte(instance, attribute, value)


def _pending_command(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and value not in _COMMANDS_WITH_DATA:
        raise ValueError(f"{attribute.name}: expected None or a command that takes data, found {value!r}")


def _version(instance: Any, attribute: Any, value: Any) -> None:
    if value != STATE_VERSION:
        raise ValueError(f"unsupported I8042State version {value!r} (this build reads {STATE_VERSION})")


@attrs.frozen
class I8042State:
    """A snapshot of an :class:`I8042`'s registers; ``version`` identifies the layout."""

    version: int = attrs.field(default=STATE_VERSION, validator=_version)
    #: The controller command byte (CTR).
    ctr: int = attrs.field(default=_DEFAULT_CTR, validator=_byte)
    #: The output port (bit 0: reset line released, bit 1: A20).
    output_port: int = attrs.field(default=_DEFAULT_OUTPUT_PORT, validator=_byte)
    #: The byte waiting on the data port (status OBF), or ``None``.
    output: Optional[int] = attrs.field(default=None, validator=_optional_byte)
    #: A command written to port 0x64 that still waits for its parameter byte.
    pending_command: Optional[int] = attrs.field(default=None, validator=_pending_command)
    #: Status bit 3: the last write went to the command port.
    last_write_was_command: bool = attrs.field(default=False, converter=bool)


class I8042:
    """The PS/2 controller at ports 0x60/0x64; ``reset()`` is called when the guest pulls the reset line.

    ``reset`` is called with the device lock held, from the vCPU thread that
    made the access; it should request the reset (e.g. signal the VMM loop)
    rather than tear the VM down in place. Its exceptions propagate.
    """

    #: The device serialises its own accesses; see :class:`vmmkit.bus.BusDevice`.
    bus_lock = False

    def __init__(self, reset: Callable[[], None]) -> None:
        """Create a controller in the state a BIOS would hand over."""
        self._reset = reset
        self._lock = threading.RLock()
        self._ctr = _DEFAULT_CTR
        self._output_port = _DEFAULT_OUTPUT_PORT
        self._output: Optional[int] = None
        self._pending: Optional[int] = None
        self._last_write_was_command = False

    # ------------------------------------------------------------------
    # Bus interface

    def bus_read(self, offset: int, size: int) -> bytes:
        """Return ``size`` bytes for a guest read at ``offset`` (0: data port, 4: status).

        Only byte 0 of a wider access is decoded; the rest, and the
        undecoded offsets, read as 0xff.
        """
        if size <= 0:
            return b""
        with self._lock:
            if offset == DATA_OFFSET:
                value = self._read_data()
            elif offset == COMMAND_OFFSET:
                value = self._status()
            else:
                value = 0xFF
        return bytes((value,)) + b"\xff" * (size - 1)

    def bus_write(self, offset: int, data: bytes) -> None:
        """Handle a guest write at ``offset`` (0: data/parameter byte, 4: command); only byte 0 counts."""
        if not data:
            return
        with self._lock:
            if offset == DATA_OFFSET:
                self._write_data(data[0] & 0xFF)
            elif offset == COMMAND_OFFSET:
                self._write_command(data[0] & 0xFF)

    # ------------------------------------------------------------------
    # Snapshots

    def state(self) -> I8042State:
        """Return a snapshot of the controller's registers."""
        with self._lock:
            return I8042State(
                ctr=self._ctr,
                output_port=self._output_port,
                output=self._output,
                pending_command=self._pending,
                last_write_was_command=self._last_write_was_command,
            )

    def restore(self, state: I8042State) -> None:
        """Load a snapshot taken by :meth:`state` (from this or another instance)."""
        if not isinstance(state, I8042State):
            raise TypeError(f"expected an I8042State, found {type(state).__name__}")
        with self._lock:
            self._ctr = state.ctr
            self._output_port = state.output_port
            self._output = state.output
            self._pending = state.pending_command
            self._last_write_was_command = state.last_write_was_command

    # ------------------------------------------------------------------
    # Controller logic

    def _status(self) -> int:
        # IBF (bit 1) is never set: a command is done by the time the guest
        # polls, so i8042_wait_write() returns on its first read.
        status = _STR_KEYLOCK
        if self._output is not None:
            status |= _STR_OBF
        if self._ctr & _CTR_SYS:
            status |= _STR_SYS
        if self._last_write_was_command:
            status |= _STR_CMDDAT
        return status

    def _read_data(self) -> int:
        value = self._output
        self._output = None
        return 0 if value is None else value

    def _respond(self, value: int) -> None:
        # A new response replaces an unread one: Linux flushes before its
        # commands, and a one-byte buffer can't leave a stale byte ahead of
        # the answer the guest is waiting for.
        self._output = value

    def _write_command(self, command: int) -> None:
        self._last_write_was_command = True
        # A new command aborts one that still waited for its parameter.
        self._pending = None
        if command == _CMD_READ_CTR:
            self._respond(self._ctr)
        elif _CMD_READ_CTR < command <= _CMD_READ_RAM_LAST:
            self._respond(0)   # internal RAM beyond the CTR: not kept
        elif command in _COMMANDS_WITH_DATA:
            self._pending = command
        elif command == _CMD_AUX_DISABLE:
            self._ctr |= _CTR_AUXDIS
        elif command == _CMD_AUX_ENABLE:
            self._ctr &= ~_CTR_AUXDIS
        elif command == _CMD_AUX_TEST:
            self._respond(_AUX_INTERFACE_ABSENT)
        elif command == _CMD_SELF_TEST:
            self._respond(_SELF_TEST_PASSED)
        elif command == _CMD_KBD_TEST:
            self._respond(_INTERFACE_OK)
        elif command == _CMD_KBD_DISABLE:
            self._ctr |= _CTR_KBDDIS
        elif command == _CMD_KBD_ENABLE:
            self._ctr &= ~_CTR_KBDDIS
        elif command == _CMD_READ_OUTPUT_PORT:
            self._respond(self._output_port)
        elif command >= _CMD_PULSE_FIRST:
            # Bits 0-3 set to 0 select the output port lines to pulse; bit 0
            # is the reset line. 0xFE is the classic "reset the CPU".
            if not command & 0x01:
                self._reset()
        # Anything else (0xC0 read input port, 0xE0 test inputs, vendor
        # commands, ...) is ignored without a response. Linux never sends them.

    def _write_data(self, value: int) -> None:
        self._last_write_was_command = False
        command, self._pending = self._pending, None
        if command is None:
            # A byte for the keyboard itself. There is no keyboard, so it is
            # dropped and no answer comes (atkbd's probe times out).
            return
        if command == _CMD_WRITE_CTR:
            self._ctr = value
        elif command == _CMD_WRITE_OUTPUT_PORT:
            # The reset line is a pulse from the guest's point of view: the
            # VMM resets the machine and the line reads as released again.
            self._output_port = value | _OUTP_RESET_RELEASED
            if not value & _OUTP_RESET_RELEASED:
                self._reset()
        elif command in (_CMD_WRITE_KBD_OUTPUT, _CMD_WRITE_AUX_OUTPUT):
            # Both echo as keyboard data: with AUXDATA clear Linux's AUX
            # loopback check fails at once ("auxerr"), see the module docstring.
            self._respond(value)
        # _CMD_WRITE_AUX (a byte for the mouse) and internal RAM writes
        # (0x61-0x7F) are accepted and dropped.
