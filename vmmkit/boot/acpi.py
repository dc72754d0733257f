"""ACPI tables for a hardware-reduced x86 microVM.

vmmkit has no firmware, so the VMM writes the tables itself: an RSDP, an
XSDT, a FADT, a MADT and a DSDT, packed into one blob that goes at
``AcpiLayout.tables_gpa`` (0xE0000 by default, inside the legacy BIOS area
the kernel scans for the RSDP; ``boot_params.acpi_rsdp_addr`` points at it
directly as well).

The platform is "hardware-reduced" ACPI (ACPI 6.5 section 4.1): no PM1
event/control blocks, no PM timer, no GPEs, no SCI and no FACS. What that
leaves for the VMM to implement is small:

* power off: the guest writes ``(SLP_TYP << 2) | SLP_EN`` to the FADT's
  SLEEP_CONTROL_REG, an 8-bit I/O port (see :func:`decode_sleep_write`);
* reset: the guest writes ``reset_value`` to the FADT's RESET_REG port;
* power button: the VMM pulses ``ged_gsi``; the Generic Event Device's
  ``_EVT`` method turns that into ``Notify(PWRB, 0x80)``, which Linux's
  ACPI button driver reports as KEY_POWER.

Devices are found through the DSDT: virtio-MMIO transports as ``LNRO0005``
devices (the id Linux's virtio_mmio driver matches on ACPI systems) and,
optionally, COM1. CPUs and the IOAPIC come from the MADT.

Linux consequences of the hardware-reduced flag worth knowing: on x86 the
kernel then replaces the legacy PIC with a null one and skips the x86 timer
setup (no PIT/HPET clock events), so ISA IRQs reach the guest only through
the IOAPIC and only when some table describes them, and the LAPIC timer
(ideally with TSC-deadline exposed in CPUID) is the clock event device.
"""

from __future__ import annotations

import collections
import struct
from typing import Sequence

import attrs

from vmmkit.boot import aml
from vmmkit.errors import VmmkitError

#: SLP_EN in the hardware-reduced sleep control register (ACPI 6.5, 4.8.3.7).
SLEEP_ENABLE = 0x20
#: SLP_TYP occupies bits 2-4 of the sleep control register.
SLEEP_TYPE_SHIFT = 2
SLEEP_TYPE_MASK = 0x07
#: WAK_STS in the sleep status register. Linux writes it (to clear it)
#: before every sleep; it polls it after a non-S5 sleep.
WAKE_STATUS = 0x80

OEM_ID = b"VMMKIT"
#: Creator of the tables; ACPI only asks that it identify the tool.
CREATOR_ID = b"VMMK"
CREATOR_REVISION = 1
OEM_REVISION = 1

HEADER_LENGTH = 36
RSDP_LENGTH = 36
RSDP_ALIGN = 16  # the kernel's RSDP scan looks at 16-byte boundaries only
TABLE_ALIGN = 8

#: The legacy BIOS area the kernel scans for "RSD PTR " (ACPI 6.5, 5.2.5.1).
BIOS_AREA_START = 0xE0000
BIOS_AREA_END = 0x100000

# Table revisions, matching ACPI 6.3 structures (the FADT minor version
# below says so too). Linux treats MADT entries identically across these.
XSDT_REVISION = 1
FADT_REVISION = 6
FADT_MINOR_REVISION = 3
FADT_LENGTH = 276
MADT_REVISION = 5
#: DSDT revision 2 or later makes AML integers 64 bits wide (5.2.11.1).
DSDT_REVISION = 2

#: The largest vCPU count the MADT can describe with xAPIC entries: APIC id
#: 0xFF is the broadcast id and the IOAPIC takes id ``vcpus``.
MAX_VCPUS = 254
#: Virtio device names are V000..VFFF.
MAX_MMIO_DEVICES = 0x1000

# COM1, the first PC serial port.
COM1_PORT = 0x3F8
COM1_PORT_COUNT = 8
COM1_IRQ = 4

#: Notify value 0x80 on a power button device means "button pressed"
#: (ACPI 6.5, 5.6.6, device object notifications).
POWER_BUTTON_PRESSED = 0x80
#: Virtio-MMIO transport id in ACPI (matched by drivers/virtio/virtio_mmio.c).
VIRTIO_MMIO_HID = "LNRO0005"
#: Generic Event Device (ACPI 6.5, 5.6.9, interrupt-signaled events).
GED_HID = "ACPI0013"


class AcpiError(VmmkitError):
    """The requested machine cannot be described by these ACPI tables."""


@attrs.frozen
class MmioDeviceDesc:
    """One virtio-MMIO transport as the DSDT describes it.

    ``gsi`` is an IOAPIC input (below ``AcpiLayout.ioapic_pins``); the
    tables declare it edge-triggered and active high, so the VMM must signal
    it as an edge (raise, then lower) per event. Transports may share a GSI;
    platform GSIs (0, 2, the GED's, COM1's 4) are refused.
    """

    base: int
    size: int
    gsi: int


@attrs.frozen
class AcpiLayout:
    """Addresses, ports and interrupts shared by the tables and the VMM's devices.

    The VMM's platform devices must answer at exactly these places: the
    sleep control/status and reset ports, the power button GSI, and the
    interrupt controllers' MMIO windows.
    """

    tables_gpa: int = 0xE0000
    sleep_control_port: int = 0x600
    sleep_status_port: int = 0x601
    reset_port: int = 0x602
    reset_value: int = 0x01
    s5_sleep_type: int = 5
    ged_gsi: int = 9
    ioapic_gpa: int = 0xFEC00000
    lapic_gpa: int = 0xFEE00000
    #: Inputs on the IOAPIC; KVM's in-kernel IOAPIC has 24.
    ioapic_pins: int = 24


@attrs.frozen
class AcpiTables:
    """The built tables: one blob to copy into guest memory, plus an index.

    ``tables`` maps each table's signature (``"XSDT"``, ``"FACP"``,
    ``"APIC"``, ``"DSDT"``, and ``"RSDP"`` for the root pointer) to its guest
    physical address and bytes.
    """

    gpa: int
    blob: bytes
    rsdp_gpa: int
    tables: dict


def decode_sleep_write(value: int) -> int | None:
    """Return the SLP_TYP written to the sleep control register, or None.

    None means SLP_EN was clear, i.e. the write did not request a sleep
    state. A result equal to ``AcpiLayout.s5_sleep_type`` means power off.
    """
    if not value & SLEEP_ENABLE:
        return None
    return (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK


def sleep_control_value(sleep_type: int) -> int:
    """The byte a guest writes to the sleep control register to enter ``sleep_type``."""
    return ((sleep_type & SLEEP_TYPE_MASK) << SLEEP_TYPE_SHIFT) | SLEEP_ENABLE


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus that byte sum to 0 mod 256."""
    return -sum(data) & 0xFF


def virtio_device_name(index: int) -> str:
    """The DSDT name of the ``index``-th virtio-MMIO device: V000, V001, ... VFFF."""
    if not 0 <= index < MAX_MMIO_DEVICES:
        raise AcpiError(f"virtio device index {index} has no ACPI name")
    return f"V{index:03X}"


# --- Generic pieces. ---


def _table_header(signature: bytes, length: int, revision: int) -> bytes:
    # OEM Table ID is "VMMK" + signature so each table is identifiable in a
    # guest's dmesg ("ACPI: FACP 0x... (v06 VMMKIT VMMKFACP ...)").
    oem_table_id = CREATOR_ID + signature
    return struct.pack(
        "<4sIBB6s8sI4sI",
        signature,
        length,
        revision,
        0,  # checksum, filled in by _sdt
        OEM_ID,
        oem_table_id,
        OEM_REVISION,
        CREATOR_ID,
        CREATOR_REVISION,
    )


def _sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: header + body, checksum fixed up (5.2.6)."""
    table = bytearray(_table_header(signature, HEADER_LENGTH + len(body), revision) + body)
    table[9] = checksum(table)
    return bytes(table)


# Generic Address Structure (5.2.3.2): address space ids and access sizes.
GAS_SYSTEM_MEMORY = 0
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1


def gas(space_id: int, bit_width: int, address: int, access_size: int = GAS_ACCESS_BYTE) -> bytes:
    """Encode a 12-byte Generic Address Structure (bit offset 0).

    The access size is given explicitly: ACPICA otherwise guesses it from
    the bit width and alignment, and a byte register must be accessed with
    byte I/O for the VMM's port handler to see one clean write.
    """
    return struct.pack("<BBBBQ", space_id, bit_width, 0, access_size, address)


def _io_byte_register(port: int) -> bytes:
    return gas(GAS_SYSTEM_IO, 8, port)


# --- RSDP and XSDT. ---


def build_rsdp(xsdt_gpa: int) -> bytes:
    """The revision 2 Root System Description Pointer (5.2.5.3).

    No RSDT: ACPI 2.0+ guests (every Linux since 2.6) use the XSDT, so the
    32-bit RSDT address is left 0. Two checksums: the first over the ACPI
    1.0 part (20 bytes), the extended one over all 36 bytes.
    """
    rsdp = bytearray(
        struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, 0, RSDP_LENGTH, xsdt_gpa, 0, b"")
    )
    rsdp[8] = checksum(rsdp[:20])
    rsdp[32] = checksum(rsdp)
    return bytes(rsdp)


def build_xsdt(table_gpas: Sequence[int]) -> bytes:
    """The Extended System Description Table: 64-bit pointers to the other tables.

    The DSDT is not listed; it is reached through the FADT (5.2.8).
    """
    body = struct.pack(f"<{len(table_gpas)}Q", *table_gpas)
    return _sdt(b"XSDT", XSDT_REVISION, body)


# --- FADT (5.2.9): field offsets from the start of the table. ---

FADT_FIRMWARE_CTRL = 36
FADT_DSDT = 40
FADT_PREFERRED_PM_PROFILE = 45
FADT_SCI_INT = 46
FADT_IAPC_BOOT_ARCH = 109
FADT_FLAGS = 112
FADT_RESET_REG = 116
FADT_RESET_VALUE = 128
FADT_MINOR_VERSION = 131
FADT_X_DSDT = 140
FADT_SLEEP_CONTROL_REG = 244
FADT_SLEEP_STATUS_REG = 256
FADT_HYPERVISOR_VENDOR_ID = 268

# FADT Flags (5.2.9, "Fixed ACPI Description Table Fixed Feature Flags").
FADT_FLAG_PWR_BUTTON = 1 << 4
FADT_FLAG_SLP_BUTTON = 1 << 5
FADT_FLAG_RESET_REG_SUP = 1 << 10
FADT_FLAG_HW_REDUCED_ACPI = 1 << 20

# IA-PC boot architecture flags (5.2.9.3).
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_PCIE_ASPM_CONTROLS = 1 << 4
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5

#: What the FADT tells Linux about the PC legacy (arch/x86/kernel/acpi/boot.c,
#: acpi_parse_fadt):
#:
#: * LEGACY_DEVICES clear: there is no ISA/LPC bus to enumerate, and Linux
#:   turns off PnP BIOS probing.
#: * 8042 clear: no PS/2 controller, so the i8042 driver skips its direct
#:   port probing when the DSDT lists no keyboard (faster boot, no exits on
#:   ports 0x60/0x64). Reboot goes through the ACPI reset register instead.
#: * VGA_NOT_PRESENT set: there is no VGA, and Linux records that probing
#:   for one (ports 0x3C0-0x3DF, memory at 0xA0000) is unsafe.
#: * MSI_NOT_SUPPORTED clear: if a PCI bus is ever added, MSI works (KVM
#:   delivers MSIs); setting it would make Linux call pci_no_msi().
#: * PCIE_ASPM_CONTROLS clear: nothing to say about ASPM.
#: * CMOS_RTC_NOT_PRESENT clear: setting it would make Linux skip the
#:   rtc_cmos platform device, leaving the guest without a wall clock
#:   driver; the VMM is expected to answer CMOS ports 0x70/0x71.
IAPC_BOOT_ARCH = IAPC_VGA_NOT_PRESENT

#: FADT Flags:
#:
#: * HW_REDUCED_ACPI: no fixed hardware (PM1/GPE blocks, PM timer, SCI,
#:   FACS); sleep and wake go through SLEEP_CONTROL/STATUS_REG.
#: * RESET_REG_SUP: RESET_REG works; Linux's default reboot method (ACPI
#:   first) writes RESET_VALUE to it.
#: * PWR_BUTTON / SLP_BUTTON: set means "no fixed-feature button". Left
#:   clear, Linux would add the fixed LNXPWRBN/LNXSLPBN devices, which need
#:   PM1 registers a hardware-reduced platform does not have. The power
#:   button is the PNP0C0C control-method device in the DSDT.
#:
#: Everything else stays clear: WBINVD and the C-state bits matter only with
#: processor objects and real sleep states; FORCE_APIC_PHYSICAL_DESTINATION
#: is unnecessary because Linux picks physical mode itself past 8 CPUs.
FADT_FLAGS_VALUE = (
    FADT_FLAG_HW_REDUCED_ACPI
    | FADT_FLAG_RESET_REG_SUP
    | FADT_FLAG_PWR_BUTTON
    | FADT_FLAG_SLP_BUTTON
)

#: FADT Hypervisor Vendor Identity (8 bytes, informational).
HYPERVISOR_VENDOR_ID = b"VMMKIT\x00\x00"


def build_fadt(dsdt_gpa: int, layout: AcpiLayout) -> bytes:
    """The Fixed ACPI Description Table, revision 6.x (276 bytes).

    Every legacy fixed-hardware field (SMI_CMD, PM blocks, GPE blocks,
    SCI_INT, FIRMWARE_CTRL, ...) stays 0: with HW_REDUCED_ACPI set, ACPICA
    ignores them and Linux installs no SCI handler. Preferred_PM_Profile is 0
    ("unspecified"): a VM is neither a laptop nor a real server, and the
    value only tunes power-management heuristics. CENTURY is 0, so Linux's
    RTC driver infers the century instead of reading a CMOS byte the VMM may
    not implement.
    """
    body = bytearray(FADT_LENGTH - HEADER_LENGTH)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into(fmt, body, offset - HEADER_LENGTH, *values)

    # Both DSDT pointers, identical: ACPICA warns and picks one when the
    # 32-bit and 64-bit fields disagree (tbfadt.c), so keep them equal.
    put(FADT_DSDT, "<I", dsdt_gpa)
    put(FADT_X_DSDT, "<Q", dsdt_gpa)
    put(FADT_IAPC_BOOT_ARCH, "<H", IAPC_BOOT_ARCH)
    put(FADT_FLAGS, "<I", FADT_FLAGS_VALUE)
    _put_gas(body, FADT_RESET_REG, _io_byte_register(layout.reset_port))
    put(FADT_RESET_VALUE, "<B", layout.reset_value)
    put(FADT_MINOR_VERSION, "<B", FADT_MINOR_REVISION)
    # Linux registers ACPI power-off only when both sleep registers exist
    # (acpi_sleep_state_supported() on hardware-reduced platforms).
    _put_gas(body, FADT_SLEEP_CONTROL_REG, _io_byte_register(layout.sleep_control_port))
    _put_gas(body, FADT_SLEEP_STATUS_REG, _io_byte_register(layout.sleep_status_port))
    put(FADT_HYPERVISOR_VENDOR_ID, "<8s", HYPERVISOR_VENDOR_ID)
    return _sdt(b"FACP", FADT_REVISION, bytes(body))


def _put_gas(body: bytearray, table_offset: int, encoded: bytes) -> None:
    start = table_offset - HEADER_LENGTH
    body[start : start + len(encoded)] = encoded


# --- MADT (5.2.12). ---

MADT_PCAT_COMPAT = 1 << 0
MADT_TYPE_LOCAL_APIC = 0
MADT_TYPE_IO_APIC = 1
MADT_TYPE_INTERRUPT_OVERRIDE = 2
MADT_TYPE_LOCAL_APIC_NMI = 4
MADT_LAPIC_ENABLED = 1 << 0
#: MPS INTI flags 0: polarity and trigger "conform to the bus", which for
#: the ISA bus means active high, edge-triggered (5.2.12.5).
MPS_INTI_CONFORMS = 0
#: ACPI processor UID 0xFF in a Local APIC NMI entry means "all processors".
ALL_PROCESSORS = 0xFF


def _madt_local_apic(index: int) -> bytes:
    # Processor UID and APIC id are both the vCPU index; KVM gives each
    # vCPU an initial APIC id equal to its vcpu id, and the CPUID the VMM
    # sets must agree.
    return struct.pack("<BBBBI", MADT_TYPE_LOCAL_APIC, 8, index, index, MADT_LAPIC_ENABLED)


def _madt_io_apic(ioapic_id: int, address: int) -> bytes:
    return struct.pack("<BBBBII", MADT_TYPE_IO_APIC, 12, ioapic_id, 0, address, 0)


def _madt_timer_override() -> bytes:
    # The PC wiring: ISA IRQ0 (PIT) reaches IOAPIC pin 2, because pin 0
    # carries the 8259's INTR output. A hardware-reduced Linux guest never
    # programs the PIT, but the entry keeps the ISA-to-GSI map conventional
    # for anything that looks at IRQ0.
    return struct.pack("<BBBBIH", MADT_TYPE_INTERRUPT_OVERRIDE, 10, 0, 0, 2, MPS_INTI_CONFORMS)


def _madt_lapic_nmi() -> bytes:
    # NMIs arrive on LINT1 of every CPU, the PC convention; Linux warns if
    # this entry names another pin.
    return struct.pack("<BBBHB", MADT_TYPE_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, MPS_INTI_CONFORMS, 1)


def build_madt(vcpus: int, layout: AcpiLayout) -> bytes:
    """The Multiple APIC Description Table: the vCPUs' local APICs and the IOAPIC.

    PCAT_COMPAT is set because KVM's in-kernel irqchip does include a pair
    of 8259s; a hardware-reduced Linux guest leaves them alone (it installs
    a null legacy PIC and masks LINT0) and routes everything through the
    IOAPIC.
    The IOAPIC's id is ``vcpus``, the first id after the CPUs', so no APIC
    ids collide; its GSI base is 0, so GSI n is IOAPIC pin n.
    """
    _check_vcpus(vcpus)
    entries = [_madt_local_apic(i) for i in range(vcpus)]
    entries.append(_madt_io_apic(vcpus, layout.ioapic_gpa))
    entries.append(_madt_timer_override())
    entries.append(_madt_lapic_nmi())
    body = struct.pack("<II", layout.lapic_gpa, MADT_PCAT_COMPAT) + b"".join(entries)
    return _sdt(b"APIC", MADT_REVISION, body)


# --- DSDT (5.2.11.1). ---


def _sleep_states(layout: AcpiLayout) -> bytes:
    # \_S5 = {SLP_TYPa, SLP_TYPb, reserved, reserved} (7.4.2). Hardware-
    # reduced Linux uses only SLP_TYPa; without \_S5 it does not register
    # ACPI power-off at all.
    return aml.name("\\_S5", aml.package(layout.s5_sleep_type, 0, 0, 0))


def _power_button() -> bytes:
    # A control-method power button (PNP0C0C, 4.8.2.2.1) that Linux's
    # ACPI button driver binds; Notify(0x80) on it is a button press.
    return aml.device(
        "PWRB",
        aml.name("_HID", aml.eisaid("PNP0C0C")),
        aml.name("_UID", 0),
    )


def _generic_event_device(layout: AcpiLayout) -> bytes:
    # Linux's evged driver requests every interrupt in _CRS and, when one
    # fires, runs _EVT with the GSI as Arg0 (no _Exx/_Lxx methods here).
    crs = aml.resource_template(
        aml.interrupt(layout.ged_gsi, edge=True, active_high=True, shared=False)
    )
    evt = aml.method(
        "_EVT",
        1,
        aml.if_(
            aml.lequal(aml.arg(0), layout.ged_gsi),
            aml.notify("\\_SB.PWRB", POWER_BUTTON_PRESSED),
        ),
    )
    return aml.device(
        "GED0",
        aml.name("_HID", GED_HID),
        aml.name("_UID", 0),
        aml.name("_CRS", crs),
        evt,
    )


def _com1() -> bytes:
    # With the legacy PIC gone (hardware-reduced), Linux maps ISA IRQ 4 to
    # the IOAPIC only if an ACPI device claims it; the 8250_pnp driver does
    # that for this PNP0501 device and takes over the built-in 0x3F8 port.
    crs = aml.resource_template(
        aml.io(COM1_PORT, COM1_PORT, 1, COM1_PORT_COUNT),
        aml.irq_no_flags(COM1_IRQ),
    )
    return aml.device(
        "COM1",
        aml.name("_HID", aml.eisaid("PNP0501")),
        aml.name("_UID", 0),
        aml.name("_CRS", crs),
    )


def _virtio_mmio_device(index: int, desc: MmioDeviceDesc, shared: bool) -> bytes:
    # No _CCA: on x86 Linux assumes coherent DMA when _CCA is absent
    # (CONFIG_ACPI_CCA_REQUIRED is an arm64 option), and so do all virtio
    # transports on a VMM that shares memory with the guest.
    #
    # A GSI used by several transports is marked Shared. Linux's
    # virtio_mmio requests its IRQ with IRQF_SHARED and each handler checks
    # its own device's interrupt status, so sharing works as long as the VMM
    # pulses the line once per event.
    crs = aml.resource_template(
        aml.memory32_fixed(desc.base, desc.size, writable=True),
        aml.interrupt(desc.gsi, edge=True, active_high=True, shared=shared),
    )
    return aml.device(
        virtio_device_name(index),
        aml.name("_HID", VIRTIO_MMIO_HID),
        aml.name("_UID", index),
        aml.name("_CRS", crs),
    )


def build_dsdt(devices: Sequence[MmioDeviceDesc], layout: AcpiLayout, *, serial: bool = True) -> bytes:
    """The Differentiated System Description Table: \\_S5 and the devices under \\_SB.

    Each virtio-MMIO transport's interrupt is Exclusive unless another
    transport has the same GSI, in which case both are declared Shared.
    """
    sb_terms = [_power_button(), _generic_event_device(layout)]
    if serial:
        sb_terms.append(_com1())
    gsi_users = collections.Counter(d.gsi for d in devices)
    sb_terms.extend(
        _virtio_mmio_device(i, d, shared=gsi_users[d.gsi] > 1) for i, d in enumerate(devices)
    )
    aml_code = _sleep_states(layout) + aml.scope("\\_SB", *sb_terms)
    return _sdt(b"DSDT", DSDT_REVISION, aml_code)


# --- Validation. ---


def _check_vcpus(vcpus: int) -> None:
    if not 1 <= vcpus <= MAX_VCPUS:
        raise AcpiError(f"ACPI tables describe 1-{MAX_VCPUS} vCPUs, not {vcpus}")


def _check_layout(layout: AcpiLayout) -> None:
    if layout.tables_gpa % RSDP_ALIGN:
        raise AcpiError(f"ACPI tables address {layout.tables_gpa:#x} must be 16-byte aligned")
    if not 0 <= layout.s5_sleep_type <= SLEEP_TYPE_MASK:
        raise AcpiError(f"SLP_TYP {layout.s5_sleep_type} does not fit in 3 bits")
    if not 0 <= layout.reset_value <= 0xFF:
        raise AcpiError(f"reset value {layout.reset_value:#x} is not a byte")
    ports = (layout.sleep_control_port, layout.sleep_status_port, layout.reset_port)
    if any(not 0 < p <= 0xFFFF for p in ports):
        raise AcpiError(f"sleep/reset ports {ports} must be 16-bit I/O ports")
    if len(set(ports)) != len(ports):
        raise AcpiError(f"sleep control, sleep status and reset ports {ports} must differ")
    for label, gpa in (("IOAPIC", layout.ioapic_gpa), ("LAPIC", layout.lapic_gpa)):
        if not 0 < gpa < 1 << 32:
            raise AcpiError(f"{label} address {gpa:#x} must be below 4 GiB")
    if not 0 <= layout.ged_gsi < layout.ioapic_pins:
        raise AcpiError(f"GED GSI {layout.ged_gsi} is not an IOAPIC pin")


def _reserved_gsis(layout: AcpiLayout, serial: bool) -> dict:
    """Platform GSIs, checking that the GED does not land on another one."""
    reserved = {0: "the 8259 output", 2: "the timer (IRQ0 override)"}
    if serial:
        reserved[COM1_IRQ] = "COM1"
    if layout.ged_gsi in reserved:
        raise AcpiError(f"GED GSI {layout.ged_gsi} is reserved for {reserved[layout.ged_gsi]}")
    reserved[layout.ged_gsi] = "the GED"
    return reserved


def _check_devices(devices: Sequence[MmioDeviceDesc], layout: AcpiLayout, serial: bool) -> None:
    if len(devices) > MAX_MMIO_DEVICES:
        raise AcpiError(f"at most {MAX_MMIO_DEVICES} virtio-MMIO devices, not {len(devices)}")
    reserved = _reserved_gsis(layout, serial)
    windows = [(layout.ioapic_gpa, 0x1000, "the IOAPIC"), (layout.lapic_gpa, 0x1000, "the LAPIC")]
    for index, dev in enumerate(devices):
        label = f"virtio-MMIO device {index}"
        if not 0 <= dev.gsi < layout.ioapic_pins:
            raise AcpiError(f"{label}: GSI {dev.gsi} is not one of {layout.ioapic_pins} IOAPIC pins")
        if dev.gsi in reserved:
            # Platform interrupts are declared Exclusive (or belong to the
            # timer), so no transport may share them.
            raise AcpiError(f"{label}: GSI {dev.gsi} is reserved for {reserved[dev.gsi]}")
        if dev.base < 0 or dev.size <= 0 or dev.base + dev.size > 1 << 32:
            raise AcpiError(f"{label}: window {dev.base:#x}+{dev.size:#x} must be inside 4 GiB")
        for base, size, other in windows:
            if dev.base < base + size and base < dev.base + dev.size:
                raise AcpiError(f"{label}: window {dev.base:#x}+{dev.size:#x} overlaps {other}")
        windows.append((dev.base, dev.size, label))


def _check_placement(gpa: int, length: int) -> None:
    end = gpa + length
    if BIOS_AREA_START <= gpa < BIOS_AREA_END and end > BIOS_AREA_END:
        raise AcpiError(
            f"ACPI tables ({length} bytes at {gpa:#x}) run past the BIOS area end "
            f"{BIOS_AREA_END:#x}; use fewer devices or another tables_gpa"
        )
    if end > 1 << 32:
        raise AcpiError(f"ACPI tables at {gpa:#x} must end below 4 GiB (32-bit DSDT pointer)")


# --- Assembly. ---


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & -alignment


def _offsets(sizes: Sequence[int]) -> list:
    """Offsets for consecutive pieces, each 8-byte aligned, the first at 0."""
    offsets, cursor = [], 0
    for size in sizes:
        offsets.append(cursor)
        cursor = _align(cursor + size, TABLE_ALIGN)
    return offsets


def _concat(pieces: Sequence[bytes], offsets: Sequence[int]) -> bytes:
    blob = bytearray(offsets[-1] + len(pieces[-1]))
    for piece, offset in zip(pieces, offsets):
        blob[offset : offset + len(piece)] = piece
    return bytes(blob)


def build_acpi_tables(
    vcpus: int,
    devices: Sequence[MmioDeviceDesc],
    layout: AcpiLayout = AcpiLayout(),
    *,
    serial: bool = True,
) -> AcpiTables:
    """Build every table for ``vcpus`` vCPUs and the given virtio-MMIO devices.

    The blob is laid out RSDP, XSDT, FACP, APIC, DSDT from ``layout.tables_gpa``
    (16-byte aligned, so the RSDP is where the kernel's scan looks), each
    table 8-byte aligned. ``serial`` adds COM1 (0x3F8, IRQ 4) to the DSDT.
    Raises :class:`AcpiError` for machines the tables cannot describe.
    """
    _check_vcpus(vcpus)
    _check_layout(layout)
    _check_devices(devices, layout, serial)
    madt = build_madt(vcpus, layout)
    dsdt = build_dsdt(devices, layout, serial=serial)
    xsdt_len = HEADER_LENGTH + 8 * 2
    sizes = [RSDP_LENGTH, xsdt_len, FADT_LENGTH, len(madt), len(dsdt)]
    rsdp_gpa, xsdt_gpa, fadt_gpa, madt_gpa, dsdt_gpa = (
        layout.tables_gpa + off for off in _offsets(sizes)
    )
    fadt = build_fadt(dsdt_gpa, layout)
    xsdt = build_xsdt([fadt_gpa, madt_gpa])
    rsdp = build_rsdp(xsdt_gpa)
    pieces = [rsdp, xsdt, fadt, madt, dsdt]
    gpas = [rsdp_gpa, xsdt_gpa, fadt_gpa, madt_gpa, dsdt_gpa]
    blob = _concat(pieces, [g - layout.tables_gpa for g in gpas])
    _check_placement(layout.tables_gpa, len(blob))
    names = ["RSDP", "XSDT", "FACP", "APIC", "DSDT"]
    tables = {n: (g, p) for n, g, p in zip(names, gpas, pieces)}
    return AcpiTables(gpa=layout.tables_gpa, blob=blob, rsdp_gpa=rsdp_gpa, tables=tables)
