"""Host-only tests for the x86-64 direct kernel boot code (no KVM needed).

Kernels here are synthetic: a bzImage is a hand-built setup header plus a
payload, an ELF vmlinux is a hand-built ELF64 header plus program headers.
"""

from __future__ import annotations

import struct

import pytest

from vmmkit.boot import bootparams, e820, kernel, layout, x86
from vmmkit.boot.kernel import BootError, KernelImage, load_kernel
from vmmkit.errors import VmmkitError

MiB = 1 << 20
GiB = 1 << 30
PATH = "/images/vmlinuz-test"


# --- Synthetic kernels ---------------------------------------------------------


def make_bzimage(*, setup_sects=4, version=0x020F, xloadflags=0x1, loadflags=0x1, payload=None,
                 syssize=None, relocatable=1, kernel_alignment=0x200000, pref_address=0x1000000,
                 init_size=0x800000, cmdline_size=2047, initrd_addr_max=0x7FFFFFFF, jump_len=0x6A) -> bytes:
    """Build a minimal bzImage: boot sector + setup sectors with a real-looking header, then a payload."""
    if payload is None:
        payload = bytes(range(256)) * 64  # 16 KiB, recognisable
    sects = setup_sects or 4
    buf = bytearray((sects + 1) * 512)
    buf[0x1EF] = 0xFF  # the sentinel a real bzImage carries; must not reach boot_params
    buf[0x1F1] = setup_sects
    struct.pack_into("<I", buf, 0x1F4, len(payload) // 16 if syssize is None else syssize)
    struct.pack_into("<H", buf, 0x1FE, 0xAA55)
    buf[0x200] = 0xEB
    buf[0x201] = jump_len
    buf[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", buf, 0x206, version)
    buf[0x211] = loadflags
    struct.pack_into("<I", buf, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", buf, 0x22C, initrd_addr_max)
    struct.pack_into("<I", buf, 0x230, kernel_alignment)
    buf[0x234] = relocatable
    struct.pack_into("<H", buf, 0x236, xloadflags)
    struct.pack_into("<I", buf, 0x238, cmdline_size)
    struct.pack_into("<Q", buf, 0x258, pref_address)
    struct.pack_into("<I", buf, 0x260, init_size)
    return bytes(buf) + payload


def make_elf(segments, entry, *, ei_class=2, machine=62, e_type=2, extra_phdrs=()) -> bytes:
    """Build an ELF64 with one PT_LOAD per ``(vaddr, paddr, data, memsz)`` in ``segments``.

    ``extra_phdrs`` are raw ``(p_type, offset, vaddr, paddr, filesz, memsz)`` tuples
    appended verbatim (for PT_NOTE and for corrupt headers).
    """
    phdrs = [(1, None, vaddr, paddr, len(data), memsz) for vaddr, paddr, data, memsz in segments]
    phdrs += list(extra_phdrs)
    phoff = 64
    data_off = phoff + 56 * len(phdrs)
    body = bytearray()
    table = bytearray()
    for i, (p_type, offset, vaddr, paddr, filesz, memsz) in enumerate(phdrs):
        if offset is None:
            offset = data_off + len(body)
            body += segments[i][2]
        table += struct.pack("<IIQQQQQQ", p_type, 5, offset, vaddr, paddr, filesz, memsz, 0x200000)
    ident = b"\x7fELF" + bytes([ei_class, 1, 1]) + bytes(9)
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", e_type, machine, 1, entry, phoff, 0, 0, 64, 56,
                               len(phdrs), 64, 0, 0)
    assert len(ehdr) == 64
    return ehdr + bytes(table) + bytes(body)


VMLINUX_SEGS = [
    (0xFFFFFFFF81000000, 0x1000000, b"\x90" * 0x300, 0x300),
    # a .data/.bss-like segment: memsz larger than filesz
    (0xFFFFFFFF81200000, 0x1200000, b"\xAB" * 0x100, 0x2000),
]


# --- bzImage ------------------------------------------------------------------


def test_bzimage_loads_protected_mode_code_at_1mib():
    payload = bytes(range(256)) * 64
    data = make_bzimage(setup_sects=4, payload=payload)
    img = load_kernel(data, path=PATH)
    assert img.kind == "bzimage"
    assert img.segments == ((0x100000, payload),)
    assert img.entry64 == 0x100000 + 0x200
    assert img.setup_header == data[0x1F1:0x202 + 0x6A]
    assert img.protocol == 0x020F
    assert img.initrd_addr_max == 0x7FFFFFFF
    assert img.cmdline_size == 2047
    assert img.kernel_alignment == 0x200000
    assert img.relocatable is True
    assert img.load_addr == 0x100000


def test_bzimage_setup_sects_zero_means_four():
    payload = b"\x11" * 4096
    data = make_bzimage(setup_sects=0, payload=payload)
    img = load_kernel(data)
    # (4 + 1) * 512: the payload starts right after the fifth sector
    assert img.segments == ((0x100000, payload),)
    assert data[5 * 512:] == payload


def test_bzimage_loads_trailing_bytes_past_syssize():
    # Signed distribution kernels carry a signature after syssize*16 bytes.
    payload = b"\x22" * 4096
    data = make_bzimage(payload=payload, syssize=4096 // 16) + b"SIGNATURE"
    img = load_kernel(data)
    assert img.segments[0][1] == payload + b"SIGNATURE"


def test_bzimage_footprint_covers_decompression_buffer():
    # Relocatable: buffer at max(align_up(1 MiB, 2 MiB), pref_address) = 16 MiB.
    img = load_kernel(make_bzimage(init_size=0x2000000, pref_address=0x1000000, kernel_alignment=0x200000))
    assert img.end == 0x1000000 + 0x2000000
    assert img.init_size == img.end - 0x100000
    # Alignment larger than pref_address wins.
    img = load_kernel(make_bzimage(init_size=0x100000, pref_address=0x1000000, kernel_alignment=0x4000000))
    assert img.end == 0x4000000 + 0x100000
    # Non-relocatable kernels decompress at LOAD_PHYSICAL_ADDR (= pref_address).
    img = load_kernel(make_bzimage(relocatable=0, init_size=0x300000, pref_address=0x1000000))
    assert img.relocatable is False
    assert img.end == 0x1300000
    # A huge compressed image ends above the buffer: the footprint covers it too.
    big = b"\0" * (0x400000)
    img = load_kernel(make_bzimage(payload=big, init_size=0x1000, pref_address=0x200000, kernel_alignment=0x200000))
    assert img.end == 0x100000 + len(big)


@pytest.mark.parametrize(
    "data, needle",
    [
        (make_bzimage(version=0x0205), "too old"),
        (make_bzimage(version=0x0208), "cannot advertise a 64-bit entry"),
        (make_bzimage(xloadflags=0x2), "XLF_KERNEL_64"),
        (make_bzimage(loadflags=0), "zImage"),
        (make_bzimage()[:-100], "truncated"),
        (make_bzimage()[:0x220], "truncated"),
        (make_bzimage()[:5 * 512], "truncated"),
        (make_bzimage(jump_len=0x20), "corrupt setup header"),
        (bytes(range(256)) * 40, "is not a Linux kernel (bzImage or ELF vmlinux)"),
        (b"", "is not a Linux kernel"),
        (b"MZ" + bytes(0x300), "is not a Linux kernel"),
    ],
    ids=["protocol-2.05", "protocol-2.08", "no-64bit", "zimage", "truncated-payload", "truncated-header",
         "no-payload", "short-header", "random", "empty", "pe-only"],
)
def test_bad_kernels_raise_boot_error_naming_the_file(data, needle):
    with pytest.raises(BootError) as exc:
        load_kernel(data, path=PATH)
    assert PATH in str(exc.value)
    assert needle in str(exc.value)
    assert isinstance(exc.value, VmmkitError)


def test_bad_boot_flag_is_not_a_kernel():
    data = bytearray(make_bzimage())
    data[0x1FE:0x200] = b"\0\0"
    with pytest.raises(BootError, match="not a Linux kernel"):
        load_kernel(bytes(data), path=PATH)


def test_error_without_path_still_reads_well():
    with pytest.raises(BootError, match="^the kernel image is not a Linux kernel"):
        load_kernel(b"\0" * 1024)


def test_load_kernel_file_reports_missing_file(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(BootError, match="cannot read kernel .*nope"):
        kernel.load_kernel_file(missing)
    present = tmp_path / "bz"
    present.write_bytes(make_bzimage())
    assert kernel.load_kernel_file(present).kind == "bzimage"


# --- ELF vmlinux --------------------------------------------------------------


def test_elf_virtual_entry_maps_to_physical():
    img = load_kernel(make_elf(VMLINUX_SEGS, entry=0xFFFFFFFF81000040), path=PATH)
    assert img.kind == "elf"
    assert img.entry64 == 0x1000040
    assert img.setup_header is None
    assert img.relocatable is False
    # The second segment carries its zero-filled tail up to p_memsz.
    assert img.segments == (
        (0x1000000, b"\x90" * 0x300),
        (0x1200000, b"\xAB" * 0x100 + bytes(0x2000 - 0x100)),
    )
    assert img.load_addr == 0x1000000
    assert img.end == 0x1202000
    assert img.init_size == 0x202000


def test_elf_entry_in_second_segment_and_physical_entry():
    assert load_kernel(make_elf(VMLINUX_SEGS, entry=0xFFFFFFFF81200010)).entry64 == 0x1200010
    # x86 vmlinux really sets e_entry to the physical startup_64.
    assert load_kernel(make_elf(VMLINUX_SEGS, entry=0x1000000)).entry64 == 0x1000000


def test_elf_ignores_non_load_segments():
    note = (4, 64, 0xFFFFFFFF81000100, 0x1000100, 0x10, 0x10)  # PT_NOTE
    img = load_kernel(make_elf(VMLINUX_SEGS, entry=0x1000000, extra_phdrs=[note]))
    assert len(img.segments) == 2


def test_elf_synthesized_header_facts():
    img = load_kernel(make_elf(VMLINUX_SEGS, entry=0x1000000))
    assert img.protocol >= 0x020E
    assert img.kernel_alignment == 0x1000000
    assert img.initrd_addr_max == 0x7FFFFFFF
    assert img.cmdline_size == 2047


@pytest.mark.parametrize(
    "build, needle",
    [
        (lambda: make_elf(VMLINUX_SEGS, 0x1000000, extra_phdrs=[(1, 10**7, 0, 0x2000000, 0x10, 0x10)]),
         "runs past the end of the file"),
        (lambda: make_elf(VMLINUX_SEGS, 0x1000000, extra_phdrs=[(1, 64, 0, 0x2000000, 1 << 40, 1 << 40)]),
         "runs past the end of the file"),
        (lambda: make_elf(VMLINUX_SEGS, 0x1000000)[:64 + 56], "program headers run past"),
        (lambda: make_elf(VMLINUX_SEGS, 0x1000000)[:40], "truncated"),
        (lambda: make_elf(VMLINUX_SEGS, 0x1000000, ei_class=1), "32-bit"),
        (lambda: make_elf(VMLINUX_SEGS, 0x1000000, machine=183), "not an x86-64 kernel"),
        (lambda: make_elf(VMLINUX_SEGS, 0x1000000, e_type=3), "not an executable ELF"),
        (lambda: make_elf(VMLINUX_SEGS, 0x5000000), "entry point 0x5000000 outside"),
        (lambda: make_elf([(0x7000, 0x7000, b"x" * 16, 16)], 0x7000), "outside"),
        (lambda: make_elf([(0xC0000000, 0xBFFFF000, b"x" * 16, 0x2000)], 0xC0000000), "outside"),
        (lambda: make_elf([(0x1000000, 0x1000000, b"x" * 32, 16)], 0x1000000), "p_filesz"),
        (lambda: make_elf([(0x1000000, 0x1000000, b"x" * 32, 0x2000),
                           (0x1001000, 0x1001000, b"y" * 32, 32)], 0x1000000), "overlap"),
        (lambda: make_elf([], 0x1000000, extra_phdrs=[(4, 64, 0, 0, 0, 0)]), "no loadable segments"),
    ],
    ids=["offset-oob", "size-oob", "phdrs-oob", "short-ehdr", "elf32", "aarch64", "et-dyn", "bad-entry",
         "below-1mib", "into-hole", "filesz-gt-memsz", "overlap", "no-load"],
)
def test_bad_elf_raises(build, needle):
    with pytest.raises(BootError) as exc:
        load_kernel(build(), path=PATH)
    assert needle in str(exc.value)
    assert PATH in str(exc.value)


def test_check_kernel_fits():
    img = load_kernel(make_bzimage(init_size=0x4000000))  # ends at 16 MiB + 64 MiB
    kernel.check_kernel_fits(img, 128 * MiB)
    with pytest.raises(BootError, match="give it more memory"):
        kernel.check_kernel_fits(img, 64 * MiB, path=PATH)


# --- Memory layout and e820 ---------------------------------------------------


def test_ram_regions_split_around_hole():
    assert layout.ram_regions(512 * MiB) == [(0, 512 * MiB)]
    assert layout.ram_regions(3 * GiB) == [(0, 3 * GiB)]
    assert layout.ram_regions(8 * GiB) == [(0, 3 * GiB), (4 * GiB, 5 * GiB)]
    with pytest.raises(BootError):
        layout.ram_regions(512 * MiB + 5)
    with pytest.raises(BootError):
        layout.ram_regions(0)


def test_fixed_structures_do_not_overlap():
    spans = [
        (layout.GDT_ADDR, x86.GDT_SIZE),
        (layout.BOOT_TSS_ADDR, x86.TSS_SIZE),
        (layout.BOOT_PARAMS_ADDR, 4096),
        (layout.BOOT_STACK_POINTER - 0x800, 0x800),
        (layout.PML4_ADDR, 4096),
        (layout.PDPT_ADDR, 4096),
        (layout.PD_ADDR, layout.PD_COUNT * 4096),
        (layout.CMDLINE_ADDR, layout.CMDLINE_MAX_SIZE),
        (layout.EBDA_START, layout.HIGH_MEMORY - layout.EBDA_START),
    ]
    spans.sort()
    for (a, asz), (b, _) in zip(spans, spans[1:]):
        assert a + asz <= b, f"{a:#x}+{asz:#x} overlaps {b:#x}"
    assert layout.EBDA_START <= layout.ACPI_TABLES_ADDR < layout.ACPI_TABLES_END <= layout.HIGH_MEMORY
    devices = [layout.virtio_mmio_addr(0), layout.virtio_mmio_addr(layout.VIRTIO_MMIO_MAX_DEVICES - 1),
               layout.IOAPIC_ADDR, layout.LAPIC_ADDR, layout.KVM_TSS_ADDR, layout.KVM_IDENTITY_MAP_ADDR]
    assert all(layout.MMIO_HOLE_START <= d < layout.MMIO_HOLE_END for d in devices)
    assert layout.virtio_mmio_addr(3) == 0xD000_3000


@pytest.mark.parametrize("mem", [512 * MiB, 3 * GiB, 3 * GiB + 512 * MiB, 8 * GiB])
def test_e820(mem):
    table = e820.build_e820(mem)
    ram = [e for e in table if e.type == e820.E820_RAM]
    reserved = [e for e in table if e.type != e820.E820_RAM]
    # Every byte of guest memory is described; only the legacy hole is not RAM.
    assert sum(e.size for e in table) == mem
    assert sum(e.size for e in ram) == mem - (layout.HIGH_MEMORY - layout.EBDA_START)
    assert reserved == [e820.E820Entry(0x9FC00, 0x100000 - 0x9FC00, e820.E820_RESERVED)]
    # Sorted, no overlap, nothing in the MMIO hole, all within backed RAM.
    assert [e.addr for e in table] == sorted(e.addr for e in table)
    for a, b in zip(table, table[1:]):
        assert a.end <= b.addr
    for e in table:
        assert e.end <= layout.MMIO_HOLE_START or e.addr >= layout.MMIO_HOLE_END
        assert any(g <= e.addr and e.end <= g + s for g, s in layout.ram_regions(mem))
    assert ram[0] == e820.E820Entry(0, 0x9FC00, e820.E820_RAM)
    assert ram[1].addr == 0x100000
    if mem > 3 * GiB:
        assert ram[-1] == e820.E820Entry(4 * GiB, mem - 3 * GiB, e820.E820_RAM)
        assert ram[1].end == 3 * GiB
    else:
        assert ram[-1].end == mem


# --- Zero page ----------------------------------------------------------------


def _bp(img, **kw):
    args = dict(cmdline_gpa=layout.CMDLINE_ADDR, cmdline_size=20, initrd_gpa=0x1F000000,
                initrd_size=0x123456, e820=e820.build_e820(512 * MiB), rsdp_gpa=0xE0000)
    args.update(kw)
    return bootparams.build_boot_params(img, **args)


def test_boot_params_fields_for_bzimage():
    data = make_bzimage()
    img = load_kernel(data)
    bp = _bp(img)
    assert len(bp) == 4096
    u8 = lambda off: bp[off]  # noqa: E731
    u16 = lambda off: struct.unpack_from("<H", bp, off)[0]  # noqa: E731
    u32 = lambda off: struct.unpack_from("<I", bp, off)[0]  # noqa: E731
    u64 = lambda off: struct.unpack_from("<Q", bp, off)[0]  # noqa: E731

    # Setup header copied (then patched), sentinel left zero.
    assert u8(0x1EF) == 0
    assert bp[0x1F1] == data[0x1F1]
    assert bp[0x202:0x206] == b"HdrS"
    assert u16(0x206) == 0x020F
    assert bp[0x22C:0x26C] == data[0x22C:0x26C]  # initrd_addr_max .. kernel_info_offset untouched
    assert u16(0x1FE) == 0xAA55
    assert u16(0x1FA) == 0xFFFF  # vid_mode
    assert u8(0x210) == 0xFF  # type_of_loader
    assert u8(0x211) & 0x01 and u8(0x211) & 0x80  # LOADED_HIGH | CAN_USE_HEAP
    assert u16(0x224) == 0xDE00  # heap_end_ptr
    assert u32(0x218) == 0x1F000000  # ramdisk_image
    assert u32(0x21C) == 0x123456  # ramdisk_size
    assert u32(0x228) == layout.CMDLINE_ADDR  # cmd_line_ptr
    assert u32(0x0C0) == u32(0x0C4) == u32(0x0C8) == 0  # ext_* high halves
    assert u64(0x070) == 0xE0000  # acpi_rsdp_addr
    table = e820.build_e820(512 * MiB)
    assert u8(0x1E8) == len(table)
    for i, entry in enumerate(table):
        assert struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) == (entry.addr, entry.size, entry.type)
    assert bp[0x2D0 + 20 * len(table):0x2D0 + 20 * 128] == bytes(20 * (128 - len(table)))


def test_boot_params_high_addresses_use_ext_fields():
    img = load_kernel(make_bzimage())
    bp = _bp(img, cmdline_gpa=0x1_2345_6000, initrd_gpa=0x2_0000_1000, initrd_size=0x1_0000_0010)
    assert struct.unpack_from("<I", bp, 0x228)[0] == 0x2345_6000
    assert struct.unpack_from("<I", bp, 0x0C8)[0] == 0x1
    assert struct.unpack_from("<I", bp, 0x218)[0] == 0x0000_1000
    assert struct.unpack_from("<I", bp, 0x0C0)[0] == 0x2
    assert struct.unpack_from("<I", bp, 0x21C)[0] == 0x10
    assert struct.unpack_from("<I", bp, 0x0C4)[0] == 0x1


def test_boot_params_without_initrd_cmdline_rsdp():
    img = load_kernel(make_bzimage())
    bp = _bp(img, cmdline_size=0, initrd_size=0, rsdp_gpa=None)
    assert struct.unpack_from("<I", bp, 0x228)[0] == 0
    assert struct.unpack_from("<II", bp, 0x218) == (0, 0)
    assert struct.unpack_from("<Q", bp, 0x070)[0] == 0


def test_boot_params_synthesized_for_elf():
    img = load_kernel(make_elf(VMLINUX_SEGS, entry=0x1000000))
    bp = _bp(img)
    assert struct.unpack_from("<H", bp, 0x1FE)[0] == 0xAA55
    assert bp[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", bp, 0x206)[0] == img.protocol
    assert struct.unpack_from("<I", bp, 0x230)[0] == 0x1000000
    assert struct.unpack_from("<I", bp, 0x238)[0] == 2047
    assert bp[0x210] == 0xFF
    assert struct.unpack_from("<I", bp, 0x228)[0] == layout.CMDLINE_ADDR


def test_boot_params_rejects_too_long_cmdline_and_e820():
    img = load_kernel(make_bzimage(cmdline_size=255))
    _bp(img, cmdline_size=256)  # 255 characters + NUL is fine
    with pytest.raises(BootError, match="at most 255"):
        _bp(img, cmdline_size=257)
    many = [e820.E820Entry(i * 0x1000, 0x1000, 1) for i in range(129)]
    with pytest.raises(BootError, match="at most 128"):
        _bp(img, e820=many)


# --- Initrd placement ---------------------------------------------------------


def test_place_initrd_top_of_ram():
    img = load_kernel(make_bzimage(init_size=0x1000000))  # kernel footprint ends at 32 MiB
    size = 10 * MiB + 123
    gpa = bootparams.place_initrd(img, 512 * MiB, size)
    assert gpa % 4096 == 0
    assert gpa + size <= 512 * MiB
    assert 512 * MiB - (gpa + size) < 4096  # as high as possible
    assert gpa >= img.end


def test_place_initrd_respects_initrd_addr_max_and_hole():
    img = load_kernel(make_bzimage())  # initrd_addr_max = 2 GiB - 1
    gpa = bootparams.place_initrd(img, 8 * GiB, 16 * MiB)
    assert gpa == 2 * GiB - 16 * MiB
    img = load_kernel(make_bzimage(initrd_addr_max=0xFFFFFFFF))
    gpa = bootparams.place_initrd(img, 8 * GiB, 16 * MiB)
    assert gpa == 3 * GiB - 16 * MiB  # never into the MMIO hole
    gpa = bootparams.place_initrd(img, 1 * GiB, 16 * MiB)
    assert gpa == 1 * GiB - 16 * MiB


def test_place_initrd_does_not_fit():
    img = load_kernel(make_bzimage(init_size=0x3000000))  # footprint to 64 MiB
    assert bootparams.place_initrd(img, 128 * MiB, 64 * MiB) == 64 * MiB  # exactly fits
    with pytest.raises(BootError, match="initrd '/images/initrd.img'.*does not fit.*more memory"):
        bootparams.place_initrd(img, 128 * MiB, 64 * MiB + 1, path="/images/initrd.img")
    with pytest.raises(BootError, match="does not fit"):
        bootparams.place_initrd(img, 64 * MiB, 1 * MiB)


def test_place_initrd_empty():
    img = load_kernel(make_bzimage())
    assert bootparams.place_initrd(img, 512 * MiB, 0) == 0


def test_place_initrd_above_elf_kernel():
    img = load_kernel(make_elf(VMLINUX_SEGS, entry=0x1000000))
    gpa = bootparams.place_initrd(img, 256 * MiB, 4 * MiB)
    assert gpa == 252 * MiB
    with pytest.raises(BootError):
        bootparams.place_initrd(img, 32 * MiB, 32 * MiB)


# --- CPU state ----------------------------------------------------------------


def _segments_by_gpa():
    return dict(x86.boot_segments())


def _read_u64(mem: dict, gpa: int) -> int:
    for base, data in mem.items():
        if base <= gpa and gpa + 8 <= base + len(data):
            return struct.unpack_from("<Q", data, gpa - base)[0]
    raise AssertionError(f"{gpa:#x} not written by boot_segments")


def test_page_tables_identity_map_4gib():
    mem = _segments_by_gpa()
    sregs = x86.initial_sregs()
    pml4 = sregs["cr3"]
    assert pml4 == layout.PML4_ADDR
    assert len(mem[layout.PML4_ADDR]) == 4096
    # Only PML4[0] is present.
    for i in range(1, 512):
        assert _read_u64(mem, pml4 + 8 * i) == 0

    def translate(va: int) -> int:
        e = _read_u64(mem, pml4 + 8 * (va >> 39 & 511))
        assert e & 1, f"PML4E for {va:#x} not present"
        e = _read_u64(mem, (e & 0x000F_FFFF_FFFF_F000) + 8 * (va >> 30 & 511))
        assert e & 1 and not e & 0x80, "PDPTE must point at a page directory"
        e = _read_u64(mem, (e & 0x000F_FFFF_FFFF_F000) + 8 * (va >> 21 & 511))
        assert e & 0x83 == 0x83, "PDE must be a present, writable 2 MiB page"
        return (e & 0x000F_FFFF_FFE0_0000) | (va & 0x1F_FFFF)

    for va in range(0, 4 * GiB, 2 * MiB):
        assert translate(va) == va
    for va in (0x7000, 0x100200, 0x20000, 0xBFFF_FFFF, 0xFEE0_0000, 4 * GiB - 1):
        assert translate(va) == va
    # Nothing above 4 GiB in the PDPT.
    for i in range(4, 512):
        assert _read_u64(mem, layout.PDPT_ADDR + 8 * i) == 0


def _decode_descriptor(gdt: bytes, selector: int) -> dict:
    low = struct.unpack_from("<Q", gdt, selector & ~7)[0]
    access = low >> 40 & 0xFF
    flags = low >> 52 & 0xF
    raw_limit = (low & 0xFFFF) | (low >> 48 & 0xF) << 16
    base = (low >> 16 & 0xFF_FFFF) | (low >> 56 & 0xFF) << 24
    s = access >> 4 & 1
    if not s:  # 16-byte system descriptor: bits 63..32 of the base follow
        base |= struct.unpack_from("<I", gdt, (selector & ~7) + 8)[0] << 32
    g = flags >> 3 & 1
    return dict(
        base=base,
        limit=(raw_limit << 12 | 0xFFF) if g else raw_limit,
        type=access & 0xF, s=s, dpl=access >> 5 & 3, present=access >> 7 & 1,
        avl=flags & 1, l=flags >> 1 & 1, db=flags >> 2 & 1, g=g,
    )


def test_gdt_descriptors_match_sregs():
    mem = _segments_by_gpa()
    sregs = x86.initial_sregs()
    assert sregs["gdt"]["base"] == layout.GDT_ADDR
    gdt = mem[layout.GDT_ADDR][:sregs["gdt"]["limit"] + 1]
    assert gdt[:16] == bytes(16)  # null descriptor (and an unused slot)
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
        seg = sregs[name]
        assert seg["selector"] + 8 <= len(gdt)
        decoded = _decode_descriptor(gdt, seg["selector"])
        assert {k: seg[k] for k in decoded} == decoded, name
        assert seg["unusable"] == 0
    assert sregs["cs"]["selector"] == 0x10 and sregs["ds"]["selector"] == 0x18
    cs = sregs["cs"]
    assert (cs["l"], cs["db"], cs["s"], cs["present"], cs["type"] & 0x8) == (1, 0, 1, 1, 0x8)
    tr = sregs["tr"]
    assert (tr["type"], tr["s"], tr["present"], tr["base"]) == (0xB, 0, 1, layout.BOOT_TSS_ADDR)
    assert mem[layout.BOOT_TSS_ADDR] == x86.build_tss() and len(x86.build_tss()) == tr["limit"] + 1
    assert sregs["ldt"]["unusable"] == 1


def test_sregs_long_mode_bits():
    s = x86.initial_sregs()
    assert s["cr0"] & 0x8000_0001 == 0x8000_0001  # PG | PE
    assert s["cr0"] & (1 << 30 | 1 << 29) == 0  # caches not disabled (CD, NW)
    assert s["cr4"] & 0x20  # PAE
    assert s["efer"] & 0x500 == 0x500  # LME | LMA
    assert s["cr3"] == layout.PML4_ADDR
    assert s["idt"] == {"base": 0, "limit": 0}


def test_initial_regs():
    regs = x86.initial_regs(0x100200, layout.BOOT_PARAMS_ADDR)
    assert regs["rip"] == 0x100200
    assert regs["rsi"] == 0x7000
    assert regs["rflags"] == 0x2
    assert regs["rsp"] == regs["rbp"] == layout.BOOT_STACK_POINTER
    assert layout.BOOT_PARAMS_ADDR + 4096 <= regs["rsp"] < layout.PML4_ADDR
    assert all(regs[r] == 0 for r in ("rax", "rbx", "rcx", "rdx", "rdi", "r8", "r15"))


def test_boot_segments_are_disjoint_and_below_kernel():
    segs = sorted(x86.boot_segments())
    for (a, da), (b, _) in zip(segs, segs[1:]):
        assert a + len(da) <= b
    for gpa, data in segs:
        assert gpa + len(data) <= layout.CMDLINE_ADDR
        assert not (gpa < layout.BOOT_PARAMS_ADDR + 4096 and layout.BOOT_PARAMS_ADDR < gpa + len(data))


def test_cmdline_bytes():
    assert x86.cmdline_bytes("console=ttyS0", 2047) == b"console=ttyS0\0"
    assert x86.cmdline_bytes("a" * 2047, 2047) == b"a" * 2047 + b"\0"
    with pytest.raises(BootError, match="2048 bytes; this kernel accepts at most 2047"):
        x86.cmdline_bytes("a" * 2048, 2047)
    with pytest.raises(BootError, match="at most 65535"):
        x86.cmdline_bytes("a" * 65536, 1 << 20)
    with pytest.raises(BootError, match="NUL"):
        x86.cmdline_bytes("a\0b", 2047)


def test_kernel_image_is_frozen():
    img = load_kernel(make_bzimage())
    assert isinstance(img, KernelImage)
    with pytest.raises(Exception):
        img.entry64 = 0  # type: ignore[misc]
