"""The hardware-reduced ACPI power-management registers: sleep control, sleep status, reset.

The FADT points the guest at these ports (see vmmkit.boot.acpi.AcpiLayout).
Linux powers off by writing SLP_TYP=S5 with SLP_EN to the control register,
and reboots by writing the reset value to the reset register.
"""

from __future__ import annotations

from typing import Callable

from vmmkit.boot.acpi import AcpiLayout, decode_sleep_write


class AcpiPowerManagement:
    """Three byte-wide ports: control (+0), status (+1), reset (+2)."""

    bus_lock = False  # no state: a poweroff from one vCPU must not wait on another

    def __init__(self, layout: AcpiLayout, on_poweroff: Callable[[], None], on_reset: Callable[[], None]):
        self.layout = layout
        self.on_poweroff = on_poweroff
        self.on_reset = on_reset

    @property
    def base(self) -> int:
        """First port (the sleep control register)."""
        return self.layout.sleep_control_port

    def bus_read(self, offset: int, size: int) -> bytes:
        """All registers read as zero (no wake status: we never sleep and wake)."""
        return bytes(size)

    def bus_write(self, offset: int, data: bytes) -> None:
        """Act on a power-off or reset request; anything else is ignored."""
        if not data:
            return
        port = self.base + offset
        if port == self.layout.sleep_control_port:
            if decode_sleep_write(data[0]) == self.layout.s5_sleep_type:
                self.on_poweroff()
        elif port == self.layout.reset_port and data[0] == self.layout.reset_value:
            self.on_reset()
