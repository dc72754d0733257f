"""Platform devices every x86 VM has: ACPI power/reset registers, the i8042 (reset line), the CMOS RTC."""

from __future__ import annotations

from vmmkit.boot.acpi import AcpiLayout
from vmmkit.devices.i8042 import I8042, I8042_BASE, I8042_PORT_COUNT
from vmmkit.hookspecs import hookimpl

from .acpi_pm import AcpiPowerManagement
from .rtc import RTC_BASE, RTC_PORTS, CmosRtc


@hookimpl
def vmmkit_vm_setup_platform(vm):
    """Attach the power-management ports, the i8042 and the RTC."""
    layout = AcpiLayout()
    pm = AcpiPowerManagement(layout, lambda: vm.request_stop("poweroff"), lambda: vm.request_stop("reboot"))
    vm.add_pio_device("acpi-pm", pm, layout.sleep_control_port, 3)
    vm.i8042 = I8042(lambda: vm.request_stop("reboot"))
    vm.add_pio_device("i8042", vm.i8042, I8042_BASE, I8042_PORT_COUNT)
    vm.rtc = CmosRtc()
    vm.add_pio_device("rtc", vm.rtc, RTC_BASE, RTC_PORTS)


@hookimpl
def vmmkit_save_state(vm):
    """The i8042 and RTC state."""
    return {"i8042": vm.i8042.state(), "rtc": vm.rtc.state()}


@hookimpl
def vmmkit_restore_state(vm, state):
    """Restore the i8042 and RTC."""
    if "i8042" in state:
        vm.i8042.restore(state["i8042"])
    if "rtc" in state:
        vm.rtc.restore(state["rtc"])
