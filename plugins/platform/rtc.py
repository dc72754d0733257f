"""A read-only MC146818 CMOS RTC at ports 0x70/0x71, reporting the host's UTC time.

Linux reads the wall clock from it at boot (the FADT says a CMOS RTC is
present); without it the guest starts in 1970. Writes to the time are
ignored: the guest keeps its own clock with kvm-clock.
"""

from __future__ import annotations

import threading
import time

import attrs

RTC_BASE = 0x70
RTC_PORTS = 2
_STATUS_A, _STATUS_B, _STATUS_C, _STATUS_D = 0x0A, 0x0B, 0x0C, 0x0D
STATUS_B_24H = 0x02  # 24-hour mode, BCD (bit 2 clear)
STATUS_D_VALID = 0x80  # "valid RAM and time": the battery is fine


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


@attrs.frozen
class RtcState:
    """The RTC's state: the selected register and the CMOS RAM bytes the guest wrote."""

    version: int = 1
    index: int = 0
    ram: bytes = bytes(128)


class CmosRtc:
    """Index port 0x70 selects a register, data port 0x71 reads it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.index = 0
        self.ram = bytearray(128)

    def _register(self, index: int) -> int:
        t = time.gmtime()
        clock = {0x00: t.tm_sec, 0x02: t.tm_min, 0x04: t.tm_hour, 0x06: t.tm_wday + 1,
                 0x07: t.tm_mday, 0x08: t.tm_mon, 0x09: t.tm_year % 100, 0x32: t.tm_year // 100}
        if index in clock:
            return _bcd(clock[index])
        if index == _STATUS_A:
            return 0x26  # 32.768 kHz time base, 1024 Hz rate; update-in-progress never set
        if index == _STATUS_B:
            return STATUS_B_24H
        if index == _STATUS_C:
            return 0
        if index == _STATUS_D:
            return STATUS_D_VALID
        return self.ram[index & 0x7F]

    def bus_read(self, offset: int, size: int) -> bytes:
        """Port 0x71 reads the selected register; 0x70 reads as 0xff."""
        with self._lock:
            value = self._register(self.index) if offset == 1 else 0xFF
        return bytes([value]) + b"\xff" * (size - 1)

    def bus_write(self, offset: int, data: bytes) -> None:
        """Port 0x70 selects (bit 7 is the NMI mask, ignored); 0x71 writes CMOS RAM."""
        if not data:
            return
        with self._lock:
            if offset == 0:
                self.index = data[0] & 0x7F
            elif offset == 1 and self.index > _STATUS_D:
                self.ram[self.index] = data[0]

    def state(self) -> RtcState:
        """Snapshot state."""
        with self._lock:
            return RtcState(index=self.index, ram=bytes(self.ram))

    def restore(self, state: RtcState) -> None:
        """Restore from state()."""
        with self._lock:
            self.index, self.ram = state.index, bytearray(state.ram)
