"""Tests for vmmkit.boot.aml and vmmkit.boot.acpi (host only, no KVM).

The table checks decode the bytes with offsets taken from the ACPI
specification rather than from the module's own constants, so a wrong
constant shows up as a failure. The iasl/acpiexec tests cross-check with
ACPICA, the same interpreter Linux uses.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmmkit.boot import aml
from vmmkit.boot.acpi import (
    SLEEP_ENABLE,
    AcpiError,
    AcpiLayout,
    MmioDeviceDesc,
    build_acpi_tables,
    decode_sleep_write,
    sleep_control_value,
    virtio_device_name,
)

MMIO_BASE = 0xD0000000
#: GSIs a VMM might hand to virtio transports on KVM's 24-pin IOAPIC: not
#: the timer (0, 2), COM1 (4) or the GED (9).
FREE_GSIS = [g for g in range(5, 24) if g != 9]

SDT_SIGNATURES = ("XSDT", "FACP", "APIC", "DSDT")
INSTALL_HINT = "install acpica-tools (e.g. `apt-get install -y acpica-tools`)"


def make_devices(count: int) -> list[MmioDeviceDesc]:
    """``count`` transports 4 KiB apart, GSIs reused round-robin past 18 devices."""
    return [
        MmioDeviceDesc(MMIO_BASE + i * 0x1000, 0x1000, FREE_GSIS[i % len(FREE_GSIS)])
        for i in range(count)
    ]


# --- Independent decoding helpers. ---


def header(table: bytes) -> dict:
    sig, length, rev, _, oem = struct.unpack_from("<4sIBB6s", table)
    return {"sig": sig.decode(), "length": length, "revision": rev, "oem": oem}


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    entries, offset = [], 44  # header (36) + local APIC address + flags
    while offset < len(madt):
        etype, elen = madt[offset], madt[offset + 1]
        assert elen >= 2, "zero-length MADT entry"
        entries.append((etype, madt[offset : offset + elen]))
        offset += elen
    assert offset == len(madt)
    return entries


def decode_gas(table: bytes, offset: int) -> tuple[int, int, int, int, int]:
    return struct.unpack_from("<BBBBQ", table, offset)


def decode_pkg_length(encoded: bytes) -> int:
    """Decode a PkgLength per ACPI 20.2.4, for round-trip checks."""
    lead = encoded[0]
    follow = lead >> 6
    if follow == 0:
        return lead & 0x3F
    value = lead & 0x0F
    for i in range(follow):
        value |= encoded[1 + i] << (4 + 8 * i)
    return value


@pytest.fixture(scope="module")
def tables():
    return build_acpi_tables(4, make_devices(3))


# --- Checksums and layout of the blob. ---


@pytest.mark.parametrize("vcpus,ndev", [(1, 0), (2, 1), (4, 8), (64, 64)])
def test_every_table_checksum_is_zero(vcpus, ndev):
    result = build_acpi_tables(vcpus, make_devices(ndev))
    for sig in SDT_SIGNATURES:
        gpa, table = result.tables[sig]
        assert header(table)["length"] == len(table)
        assert sum(table) % 256 == 0, sig


def test_rsdp_fields_and_both_checksums(tables):
    gpa, rsdp = tables.tables["RSDP"]
    assert gpa == tables.rsdp_gpa == tables.gpa
    assert len(rsdp) == 36
    sig, _, oem, rev, rsdt, length, xsdt, _, _ = struct.unpack("<8sB6sBIIQB3s", rsdp)
    assert sig == b"RSD PTR "
    assert oem == b"VMMKIT"
    assert rev == 2
    assert length == 36
    assert rsdt == 0
    assert xsdt == tables.tables["XSDT"][0]
    assert sum(rsdp[:20]) % 256 == 0, "ACPI 1.0 checksum"
    assert sum(rsdp) % 256 == 0, "extended checksum"


def test_blob_starts_with_aligned_rsdp(tables):
    assert tables.gpa == AcpiLayout().tables_gpa
    assert tables.rsdp_gpa % 16 == 0
    assert tables.blob.startswith(b"RSD PTR ")


def test_xsdt_points_at_tables_inside_blob(tables):
    _, xsdt = tables.tables["XSDT"]
    count = (len(xsdt) - 36) // 8
    pointers = struct.unpack_from(f"<{count}Q", xsdt, 36)
    found = []
    for ptr in pointers:
        offset = ptr - tables.gpa
        assert 0 <= offset < len(tables.blob)
        assert ptr % 8 == 0
        hdr = header(tables.blob[offset:])
        table = tables.blob[offset : offset + hdr["length"]]
        assert tables.tables[hdr["sig"]] == (ptr, table)
        found.append(hdr["sig"])
    assert found == ["FACP", "APIC"]  # the DSDT is reached via the FADT only


def test_tables_index_matches_blob(tables):
    for sig, (gpa, data) in tables.tables.items():
        offset = gpa - tables.gpa
        assert tables.blob[offset : offset + len(data)] == data, sig
        assert gpa % 8 == 0, sig
        if sig != "RSDP":
            assert header(data)["oem"] == b"VMMKIT"


def test_fadt_points_at_dsdt_with_both_fields(tables):
    _, fadt = tables.tables["FACP"]
    dsdt_gpa = tables.tables["DSDT"][0]
    assert struct.unpack_from("<I", fadt, 40)[0] == dsdt_gpa
    assert struct.unpack_from("<Q", fadt, 140)[0] == dsdt_gpa
    dsdt = tables.blob[dsdt_gpa - tables.gpa :]
    assert header(dsdt)["sig"] == "DSDT"
    assert header(dsdt)["revision"] >= 2  # 64-bit AML integers


def test_blob_fits_bios_area_for_64_vcpus_and_64_devices():
    result = build_acpi_tables(64, make_devices(64))
    assert 0xE0000 <= result.gpa
    assert result.gpa + len(result.blob) <= 0x100000


def test_too_many_devices_for_bios_area_is_refused():
    with pytest.raises(AcpiError, match="BIOS area"):
        build_acpi_tables(1, make_devices(3000))


def test_tables_elsewhere_in_memory():
    layout = AcpiLayout(tables_gpa=0x7FF0000)
    result = build_acpi_tables(2, make_devices(2), layout)
    assert result.gpa == result.rsdp_gpa == 0x7FF0000
    _, xsdt = result.tables["XSDT"]
    assert struct.unpack_from("<Q", xsdt, 36)[0] == result.tables["FACP"][0]


# --- FADT. ---


CUSTOM_LAYOUT = AcpiLayout(
    sleep_control_port=0x510,
    sleep_status_port=0x511,
    reset_port=0xCF9,
    reset_value=0x06,
    s5_sleep_type=7,
    ged_gsi=11,
)


@pytest.mark.parametrize("layout", [AcpiLayout(), CUSTOM_LAYOUT], ids=["default", "custom"])
def test_fadt_flags_and_registers_match_layout(layout):
    _, fadt = build_acpi_tables(1, [], layout).tables["FACP"]
    hdr = header(fadt)
    assert (hdr["sig"], hdr["revision"], hdr["length"]) == ("FACP", 6, 276)
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 20), "HW_REDUCED_ACPI"
    assert flags & (1 << 10), "RESET_REG_SUP"
    assert flags & (1 << 4) and flags & (1 << 5), "no fixed power/sleep buttons"
    # SystemIO (1), 8 bits, offset 0, byte access (1).
    assert decode_gas(fadt, 116) == (1, 8, 0, 1, layout.reset_port)
    assert fadt[128] == layout.reset_value
    assert decode_gas(fadt, 244) == (1, 8, 0, 1, layout.sleep_control_port)
    assert decode_gas(fadt, 256) == (1, 8, 0, 1, layout.sleep_status_port)


def test_fadt_boot_arch_keeps_rtc_and_drops_vga(tables):
    _, fadt = tables.tables["FACP"]
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert boot_arch & (1 << 2), "VGA not present"
    assert not boot_arch & (1 << 5), "CMOS RTC must stay visible to Linux"
    assert not boot_arch & (1 << 3), "MSI must stay allowed"


def test_fadt_has_no_legacy_fixed_hardware(tables):
    _, fadt = tables.tables["FACP"]
    assert struct.unpack_from("<HI", fadt, 46) == (0, 0), "no SCI, no SMI_CMD"
    assert fadt[56:88] == bytes(32), "all legacy PM/GPE block addresses empty"
    assert fadt[148:244] == bytes(96), "all X_ PM/GPE blocks empty"


# --- MADT. ---


@pytest.mark.parametrize("vcpus", [1, 2, 4, 64])
def test_madt_one_local_apic_per_vcpu(vcpus):
    layout = AcpiLayout()
    _, madt = build_acpi_tables(vcpus, make_devices(2)).tables["APIC"]
    lapic_addr, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_addr == layout.lapic_gpa
    assert flags & 1, "PCAT_COMPAT"
    entries = madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", e) for t, e in entries if t == 0]
    assert [(uid, apic_id) for _, _, uid, apic_id, _ in lapics] == [(i, i) for i in range(vcpus)]
    assert all(lflags & 1 for *_, lflags in lapics), "every CPU enabled"

    (ioapic,) = [struct.unpack("<BBBBII", e) for t, e in entries if t == 1]
    assert ioapic[2:] == (vcpus, 0, layout.ioapic_gpa, 0)

    (override,) = [struct.unpack("<BBBBIH", e) for t, e in entries if t == 2]
    _, _, bus, source, gsi, inti_flags = override
    assert (bus, source, gsi) == (0, 0, 2)
    assert inti_flags & 0b11 in (0, 1), "polarity conforming or active high"
    assert (inti_flags >> 2) & 0b11 in (0, 1), "trigger conforming or edge"

    (nmi,) = [struct.unpack("<BBBHB", e) for t, e in entries if t == 4]
    assert nmi[2] == 0xFF and nmi[4] == 1, "all processors, LINT1"


@pytest.mark.parametrize("vcpus", [0, 255, -1])
def test_unsupported_vcpu_counts_are_refused(vcpus):
    with pytest.raises(AcpiError):
        build_acpi_tables(vcpus, [])


# --- DSDT contents. ---


def test_dsdt_names_every_virtio_device():
    _, dsdt = build_acpi_tables(1, make_devices(64)).tables["DSDT"]
    assert dsdt.count(aml.string("LNRO0005")) == 64
    names = [virtio_device_name(i) for i in range(64)]
    assert len(set(names)) == 64
    for name in names:
        aml.name_seg(name)  # raises if not a valid ACPI name
        assert aml.device(name)[:2] == b"\x5b\x82"
        assert name.encode() in dsdt


def test_serial_flag_controls_com1():
    pnp0501 = aml.integer(aml.eisaid("PNP0501"))
    _, with_serial = build_acpi_tables(1, [], serial=True).tables["DSDT"]
    _, without = build_acpi_tables(1, [], serial=False).tables["DSDT"]
    assert pnp0501 in with_serial and b"COM1" in with_serial
    assert pnp0501 not in without and b"COM1" not in without


def test_shared_gsi_is_declared_shared():
    devices = [MmioDeviceDesc(MMIO_BASE, 0x1000, 5), MmioDeviceDesc(MMIO_BASE + 0x1000, 0x1000, 5)]
    _, dsdt = build_acpi_tables(1, devices).tables["DSDT"]
    shared = aml.interrupt(5, edge=True, active_high=True, shared=True)
    assert dsdt.count(shared) == 2


@pytest.mark.parametrize(
    "device,message",
    [
        (MmioDeviceDesc(MMIO_BASE, 0x1000, 9), "reserved"),  # the GED's GSI
        (MmioDeviceDesc(MMIO_BASE, 0x1000, 4), "reserved"),  # COM1
        (MmioDeviceDesc(MMIO_BASE, 0x1000, 2), "reserved"),  # timer
        (MmioDeviceDesc(MMIO_BASE, 0x1000, 24), "IOAPIC pins"),
        (MmioDeviceDesc(0xFFFFF000, 0x2000, 5), "4 GiB"),
        (MmioDeviceDesc(MMIO_BASE, 0, 5), "4 GiB"),
        (MmioDeviceDesc(0xFEC00000, 0x1000, 5), "IOAPIC"),
    ],
)
def test_bad_devices_are_refused(device, message):
    with pytest.raises(AcpiError, match=message):
        build_acpi_tables(1, [device])


def test_overlapping_windows_are_refused():
    devices = [MmioDeviceDesc(MMIO_BASE, 0x2000, 5), MmioDeviceDesc(MMIO_BASE + 0x1000, 0x1000, 6)]
    with pytest.raises(AcpiError, match="overlaps"):
        build_acpi_tables(1, devices)


def test_com1_irq_is_free_without_serial():
    build_acpi_tables(1, [MmioDeviceDesc(MMIO_BASE, 0x1000, 4)], serial=False)
    build_acpi_tables(1, [], AcpiLayout(ged_gsi=4), serial=False)


@pytest.mark.parametrize("ged_gsi", [0, 2, 4])
def test_ged_gsi_must_not_clash_with_platform_interrupts(ged_gsi):
    with pytest.raises(AcpiError, match="GED GSI"):
        build_acpi_tables(1, [], AcpiLayout(ged_gsi=ged_gsi), serial=True)


@pytest.mark.parametrize(
    "layout",
    [
        AcpiLayout(tables_gpa=0xE0008),
        AcpiLayout(s5_sleep_type=8),
        AcpiLayout(reset_value=0x100),
        AcpiLayout(sleep_status_port=0x600),
        AcpiLayout(ged_gsi=24),
        AcpiLayout(ioapic_gpa=1 << 32),
    ],
)
def test_bad_layouts_are_refused(layout):
    with pytest.raises(AcpiError):
        build_acpi_tables(1, [], layout)


# --- Sleep register decoding. ---


@pytest.mark.parametrize(
    "value,expected",
    [
        ((5 << 2) | 0x20, 5),  # what Linux writes for the default \_S5
        (0x20, 0),
        (0x3C, 7),
        (5 << 2, None),  # SLP_TYP without SLP_EN: no transition
        (0x80, None),  # WAK_STS written to the wrong register
        (0x00, None),
        (0xA0 | (3 << 2), 3),  # stray high bit ignored
    ],
)
def test_decode_sleep_write(value, expected):
    assert decode_sleep_write(value) == expected


def test_sleep_control_value_round_trips():
    assert SLEEP_ENABLE == 0x20
    for sleep_type in range(8):
        assert decode_sleep_write(sleep_control_value(sleep_type)) == sleep_type


# --- AML encoder. ---


@pytest.mark.parametrize(
    "content_len,encoded",
    [
        (0, bytes([0x01])),
        (62, bytes([0x3F])),  # largest 1-byte: total 63
        (63, bytes([0x41, 0x04])),  # total 65 = 0x41
        (4093, bytes([0x4F, 0xFF])),  # largest 2-byte: total 0xFFF
        (4094, bytes([0x81, 0x00, 0x01])),  # total 0x1001
        (0xFFFFF - 3, bytes([0x8F, 0xFF, 0xFF])),  # largest 3-byte
        (0xFFFFF - 2, bytes([0xC1, 0x00, 0x00, 0x01])),  # total 0x100001
        (0xFFFFFFF - 4, bytes([0xCF, 0xFF, 0xFF, 0xFF])),  # largest 4-byte
    ],
)
def test_pkg_length_boundaries(content_len, encoded):
    assert aml.pkg_length(content_len) == encoded
    assert decode_pkg_length(encoded) == content_len + len(encoded)


def test_pkg_length_too_long():
    with pytest.raises(aml.AmlError):
        aml.pkg_length(0xFFFFFFF - 3)


@pytest.mark.parametrize(
    "value,encoded",
    [
        (0, b"\x00"),  # ZeroOp
        (1, b"\x01"),  # OneOp
        (2, b"\x0a\x02"),  # BytePrefix
        (0xFF, b"\x0a\xff"),
        (0x100, b"\x0b\x00\x01"),  # WordPrefix
        (0xFFFF, b"\x0b\xff\xff"),
        (0x10000, b"\x0c\x00\x00\x01\x00"),  # DWordPrefix
        (0xFFFFFFFF, b"\x0c\xff\xff\xff\xff"),
        (1 << 32, b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"),  # QWordPrefix
        ((1 << 64) - 1, b"\x0e" + b"\xff" * 8),
    ],
)
def test_integer_encodings(value, encoded):
    assert aml.integer(value) == encoded


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_integer_out_of_range(value):
    with pytest.raises(aml.AmlError):
        aml.integer(value)


def test_eisaid():
    assert aml.eisaid("PNP0C0C") == 0x0C0CD041
    assert aml.eisaid("PNP0501") == 0x0105D041
    assert aml.eisaid("PNP0A03") == 0x030AD041
    for bad in ("PNP0C0", "pnp0C0C", "PNP0C0G", "P1P0C0C"):
        with pytest.raises(aml.AmlError):
            aml.eisaid(bad)


def test_names():
    assert aml.name_seg("_S5") == b"_S5_"
    assert aml.name_string("PWRB") == b"PWRB"
    assert aml.name_string("\\_SB") == b"\\_SB_"
    assert aml.name_string("\\_SB.PWRB") == b"\\\x2e_SB_PWRB"
    assert aml.name_string("\\_SB.PCI0.ISA") == b"\\\x2f\x03_SB_PCI0ISA_"
    assert aml.name_string("^PARN") == b"^PARN"
    assert aml.name_string("\\") == b"\\\x00"
    for bad in ("", "TOOLONG", "0ABC", "a", "A-B"):
        with pytest.raises(aml.AmlError):
            aml.name_seg(bad)


def test_strings_packages_and_names():
    assert aml.string("ACPI0013") == b"\x0dACPI0013\x00"
    assert aml.package(5, 0) == b"\x12\x05\x02\x0a\x05\x00"
    assert aml.name("_UID", 0) == b"\x08_UID\x00"
    assert aml.name("_HID", "LNRO0005") == b"\x08_HID\x0dLNRO0005\x00"


def test_control_flow_terms():
    body = aml.if_(aml.lequal(aml.arg(0), 9), aml.notify("\\_SB.PWRB", 0x80))
    expected_if_body = b"\x93\x68\x0a\x09" + b"\x86\\\x2e_SB_PWRB\x0a\x80"
    assert body == b"\xa0" + bytes([len(expected_if_body) + 1]) + expected_if_body
    evt = aml.method("_EVT", 1, body)
    assert evt == b"\x14" + bytes([1 + 4 + 1 + len(body)]) + b"_EVT\x01" + body
    assert aml.method("_XYZ", 2, serialized=True)[-1] == 0x0A
    assert aml.scope("\\_SB") == b"\x10\x06\\_SB_"
    assert aml.device("PWRB") == b"\x5b\x82\x05PWRB"


def test_resource_descriptors():
    assert aml.memory32_fixed(0xD0000000, 0x1000) == (
        b"\x86\x09\x00\x01" + struct.pack("<II", 0xD0000000, 0x1000)
    )
    assert aml.io(0x3F8, 0x3F8, 1, 8) == b"\x47\x01\xf8\x03\xf8\x03\x01\x08"
    assert aml.irq_no_flags(4) == b"\x22\x10\x00"
    # consumer | edge = 0x03; + shared = 0x0B; active low adds 0x04.
    assert aml.interrupt(5) == b"\x89\x06\x00\x03\x01\x05\x00\x00\x00"
    assert aml.interrupt(5, shared=True)[3] == 0x0B
    assert aml.interrupt(5, edge=False, active_high=False)[3] == 0x05
    template = aml.resource_template(aml.irq_no_flags(4))
    assert template == b"\x11\x08\x0a\x05\x22\x10\x00\x79\x00"


# --- Cross-checks with ACPICA (acpica-tools). ---


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: {INSTALL_HINT}")
    return path


def run_tool(argv: list[str], cwd: Path) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}:\n{output}"
    return output


def problems(text: str, pattern: str = r"Error|Warning|\*\*\*\*") -> list[str]:
    """Lines in which ACPICA reports an error, a warning or (iasl) a bad field ("****")."""
    return [line for line in text.splitlines() if re.search(pattern, line)]


def iasl_disassemble(iasl: str, directory: Path, sig: str, table: bytes) -> str:
    binary = directory / f"{sig.lower()}.dat"
    binary.write_bytes(table)
    output = run_tool([iasl, "-d", binary.name], directory)
    listing = binary.with_suffix(".dsl").read_text()
    assert not problems(output), output
    assert not problems(listing), listing
    return listing


ISL_DEVICES = [
    MmioDeviceDesc(0xD0000000, 0x1000, 5),
    MmioDeviceDesc(0xD0001000, 0x1000, 6),
    MmioDeviceDesc(0xD0002000, 0x1000, 23),
    MmioDeviceDesc(0xD0003000, 0x200, 23),
]


@pytest.mark.parametrize("sig", SDT_SIGNATURES)
def test_iasl_disassembles_tables_cleanly(sig, tmp_path):
    iasl = require_tool("iasl")
    result = build_acpi_tables(4, ISL_DEVICES)
    listing = iasl_disassemble(iasl, tmp_path, sig, result.tables[sig][1])
    if sig == "DSDT":
        assert listing.count('"LNRO0005"') == len(ISL_DEVICES)
        for dev in ISL_DEVICES:
            assert f"0x{dev.base:08X}," in listing
            assert f"0x{dev.gsi:08X}," in listing
        assert f"0x{AcpiLayout().ged_gsi:08X}," in listing
        assert "IRQNoFlags ()\n                    {4}" in listing
        assert 'EisaId ("PNP0C0C")' in listing
        assert "Notify (\\_SB.PWRB, 0x80)" in listing
    if sig == "FACP":
        assert "Hardware Reduced (V5) : 1" in listing
        assert "Reset Register Supported (V2) : 1" in listing


def test_iasl_disassembles_large_dsdt(tmp_path):
    """100 devices push \\_SB's PkgLength to the 3-byte form, and GSIs get shared."""
    iasl = require_tool("iasl")
    devices = make_devices(100)
    _, dsdt = build_acpi_tables(64, devices).tables["DSDT"]
    assert len(dsdt) > 4096
    listing = iasl_disassemble(iasl, tmp_path, "DSDT", dsdt)
    assert listing.count('"LNRO0005"') == 100
    assert f"Device ({virtio_device_name(99)})" in listing
    assert "Edge, ActiveHigh, Shared" in listing


def test_iasl_recomputes_same_rsdp(tmp_path):
    """iasl cannot load a bare RSDP binary, so compile one from its fields instead.

    iasl fills in both checksums itself; getting byte-identical output proves
    our field layout and checksums agree with ACPICA's.
    """
    iasl = require_tool("iasl")
    result = build_acpi_tables(2, ISL_DEVICES)
    _, rsdp = result.tables["RSDP"]
    _, _, oem, rev, rsdt, length, xsdt, _, _ = struct.unpack("<8sB6sBIIQB3s", rsdp)
    source = "\n".join(
        [
            '[0008] Signature : "RSD PTR "',
            "[0001] Checksum : 00",
            f'[0006] Oem ID : "{oem.decode()}"',
            f"[0001] Revision : {rev:02X}",
            f"[0004] RSDT Address : {rsdt:08X}",
            f"[0004] Length : {length:08X}",
            f"[0008] XSDT Address : {xsdt:016X}",
            "[0001] Extended Checksum : 00",
            "[0003] Reserved : 000000",
            "",
        ]
    )
    (tmp_path / "rsdp.asl").write_text(source)
    output = run_tool([iasl, "rsdp.asl"], tmp_path)
    assert not problems(output.replace("0 Errors, 0 Warnings", "")), output
    assert (tmp_path / "rsdp.aml").read_bytes() == rsdp


def test_acpiexec_runs_power_button_and_s5(tmp_path):
    """Load FADT + MADT + DSDT into ACPICA's interpreter and exercise the AML."""
    acpiexec = require_tool("acpiexec")
    layout = AcpiLayout(ged_gsi=11, s5_sleep_type=5)
    result = build_acpi_tables(2, ISL_DEVICES, layout)
    files = []
    for sig in ("FACP", "APIC", "DSDT"):
        path = tmp_path / f"{sig.lower()}.dat"
        path.write_bytes(result.tables[sig][1])
        files.append(path.name)
    commands = "; ".join(
        [
            "execute \\_SB.GED0._EVT 5",  # not the GED's GSI: must not notify
            "execute \\_SB.GED0._EVT 11",
            "execute \\_SB.V003._CRS",
            "sleep 5",
        ]
    )
    output = run_tool([acpiexec, "-b", commands, *files], tmp_path)
    # acpiexec marks its own progress messages with "****", so only look
    # for reported errors, warnings and AML exceptions here.
    assert not problems(output, r"Error|Warning|Exception"), output
    notifies = re.findall(r"Notify on \[PWRB\].*Value 0x80", output)
    assert len(notifies) == 1, output
    assert "sleep state S5" in output
