"""The zero page (``struct boot_params``) and initrd placement.

The zero page is the one structure a 64-bit-entry kernel reads from its
loader: the setup header (copied from the bzImage, or made up for an ELF
vmlinux), where the command line and initrd are, the e820 memory map and
the ACPI RSDP. Offsets follow Documentation/arch/x86/zero-page.rst and
boot.rst; every field not mentioned stays zero, which the kernel reads as
"not provided".
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

from vmmkit.boot import kernel as kernel_mod
from vmmkit.boot import layout
from vmmkit.boot.e820 import E820_ENTRY_SIZE, E820_MAX_ENTRIES, E820Entry
from vmmkit.boot.kernel import BootError, KernelImage

BOOT_PARAMS_SIZE = 4096

# --- boot_params offsets outside the setup header (zero-page.rst). ---
BP_ACPI_RSDP_ADDR = 0x070  # u64
BP_EXT_RAMDISK_IMAGE = 0x0C0  # u32: bits 63..32 of ramdisk_image
BP_EXT_RAMDISK_SIZE = 0x0C4  # u32
BP_EXT_CMD_LINE_PTR = 0x0C8  # u32
BP_E820_ENTRIES = 0x1E8  # u8
BP_SENTINEL = 0x1EF  # u8; must stay 0, see build_boot_params
BP_E820_TABLE = 0x2D0  # 128 x 20 bytes

# --- Setup header fields, at their boot_params offsets (== file offsets). ---
HDR_VID_MODE = 0x1FA  # u16
HDR_BOOT_FLAG = 0x1FE  # u16
HDR_JUMP = 0x200  # u16
HDR_HEADER = 0x202  # "HdrS"
HDR_VERSION = 0x206  # u16
HDR_TYPE_OF_LOADER = 0x210  # u8
HDR_LOADFLAGS = 0x211  # u8
HDR_RAMDISK_IMAGE = 0x218  # u32
HDR_RAMDISK_SIZE = 0x21C  # u32
HDR_HEAP_END_PTR = 0x224  # u16
HDR_CMD_LINE_PTR = 0x228  # u32
HDR_INITRD_ADDR_MAX = 0x22C  # u32
HDR_KERNEL_ALIGNMENT = 0x230  # u32
HDR_CMDLINE_SIZE = 0x238  # u32

VID_MODE_NORMAL = 0xFFFF  # "normal" text mode: no video mode switch asked
TYPE_OF_LOADER_UNDEFINED = 0xFF  # no registered boot loader ID
LOADFLAG_LOADED_HIGH = 0x01
LOADFLAG_CAN_USE_HEAP = 0x80
#: boot.rst's recommended heap end for a modern kernel, as an offset from the
#: real-mode code minus 0x200. Only the 16-bit setup code would use the heap
#: and the 64-bit entry bypasses it; we still give the documented value.
HEAP_END_PTR = 0xE000 - 0x200


def build_boot_params(
    image: KernelImage,
    *,
    cmdline_gpa: int,
    cmdline_size: int,
    initrd_gpa: int = 0,
    initrd_size: int = 0,
    e820: Sequence[E820Entry],
    rsdp_gpa: int | None = None,
) -> bytes:
    """Return the 4096-byte zero page for ``image``, to be written at BOOT_PARAMS_ADDR.

    ``cmdline_size`` is the number of command-line bytes written at
    ``cmdline_gpa``, terminating NUL included (``len(cmdline_bytes(...))``);
    0 means no command line. ``initrd_size`` 0 means no initrd. ``rsdp_gpa``
    is the ACPI RSDP, or None to let the kernel scan 0xe0000..0xfffff.
    """
    if cmdline_size and cmdline_size - 1 > image.cmdline_size:
        raise BootError(
            f"kernel command line is {cmdline_size - 1} bytes; this kernel accepts at most {image.cmdline_size}"
        )
    if cmdline_size > layout.CMDLINE_MAX_SIZE:
        raise BootError(
            f"kernel command line is {cmdline_size - 1} bytes; vmmkit allows at most {layout.CMDLINE_MAX_SIZE - 1}"
        )
    if len(e820) > E820_MAX_ENTRIES:
        raise BootError(f"e820 map has {len(e820)} entries; the zero page holds at most {E820_MAX_ENTRIES}")

    bp = bytearray(BOOT_PARAMS_SIZE)
    if image.setup_header is not None:
        # Copy from 0x1f1, never from 0x1ef: the bzImage has a non-zero
        # "sentinel" byte there, and a kernel that finds it set assumes a
        # broken loader and wipes the fields we fill in below.
        bp[kernel_mod.HDR_START:kernel_mod.HDR_START + len(image.setup_header)] = image.setup_header
    else:
        _synthesize_header(bp, image)

    struct.pack_into("<H", bp, HDR_VID_MODE, VID_MODE_NORMAL)
    bp[HDR_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    # LOADED_HIGH is normally set by the kernel itself; CAN_USE_HEAP tells it
    # heap_end_ptr is valid.
    bp[HDR_LOADFLAGS] |= LOADFLAG_LOADED_HIGH | LOADFLAG_CAN_USE_HEAP
    struct.pack_into("<H", bp, HDR_HEAP_END_PTR, HEAP_END_PTR)

    cmdline_ptr = cmdline_gpa if cmdline_size else 0
    _split64(bp, HDR_CMD_LINE_PTR, BP_EXT_CMD_LINE_PTR, cmdline_ptr)
    if initrd_size:
        _split64(bp, HDR_RAMDISK_IMAGE, BP_EXT_RAMDISK_IMAGE, initrd_gpa)
        _split64(bp, HDR_RAMDISK_SIZE, BP_EXT_RAMDISK_SIZE, initrd_size)

    bp[BP_E820_ENTRIES] = len(e820)
    for i, entry in enumerate(e820):
        struct.pack_into("<QQI", bp, BP_E820_TABLE + i * E820_ENTRY_SIZE, entry.addr, entry.size, entry.type)

    # Read from here since Linux 5.0 (protocol 2.14+); earlier kernels ignore
    # the field and find the RSDP by scanning the BIOS area.
    if rsdp_gpa:
        struct.pack_into("<Q", bp, BP_ACPI_RSDP_ADDR, rsdp_gpa)
    return bytes(bp)


def _split64(bp: bytearray, low_off: int, high_off: int, value: int) -> None:
    """Store a 64-bit value as the header's low 32 bits plus the ``ext_`` high 32 bits."""
    struct.pack_into("<I", bp, low_off, value & 0xFFFF_FFFF)
    struct.pack_into("<I", bp, high_off, value >> 32)


def _synthesize_header(bp: bytearray, image: KernelImage) -> None:
    """Fill in the setup-header fields a vmlinux (which has none) is checked against.

    The kernel proper only looks at a few: the magic and version decide which
    later fields it trusts. The rest describe the image for tools reading the
    zero page.
    """
    struct.pack_into("<H", bp, HDR_BOOT_FLAG, kernel_mod.BOOT_FLAG)
    bp[HDR_HEADER:HDR_HEADER + 4] = kernel_mod.HDRS_MAGIC
    struct.pack_into("<H", bp, HDR_VERSION, image.protocol)
    struct.pack_into("<I", bp, HDR_INITRD_ADDR_MAX, image.initrd_addr_max)
    struct.pack_into("<I", bp, HDR_KERNEL_ALIGNMENT, image.kernel_alignment)
    struct.pack_into("<I", bp, HDR_CMDLINE_SIZE, image.cmdline_size)


def place_initrd(image: KernelImage, mem_size: int, initrd_size: int, *,
                 path: str | os.PathLike | None = None) -> int:
    """Return the GPA to load an ``initrd_size``-byte initrd at.

    The initrd goes as high as possible, page-aligned, so that it ends at or
    below both ``initrd_addr_max + 1`` and the end of RAM below the MMIO hole
    (the kernel wants it in one piece below 4 GiB), and starts at or above
    :attr:`KernelImage.end`, clear of the kernel and the buffer it
    decompresses into. Returns 0 for an empty initrd. Raises BootError
    (naming ``path`` if given) when it does not fit.
    """
    if initrd_size <= 0:
        return 0
    layout.check_mem_size(mem_size)
    limit = min(image.initrd_addr_max + 1, layout.low_ram_end(mem_size))
    lowest = _page_align_up(image.end)
    gpa = (limit - initrd_size) // layout.PAGE_SIZE * layout.PAGE_SIZE
    if gpa < lowest:
        name = f"initrd '{os.fspath(path)}'" if path is not None else "the initrd"
        raise BootError(
            f"{name} ({initrd_size / layout.MiB:.1f} MiB) does not fit in guest memory: it must lie between "
            f"the kernel's end at {lowest / layout.MiB:.1f} MiB and {limit / layout.MiB:.1f} MiB; "
            f"give the VM more memory (it has {mem_size / layout.MiB:.0f} MiB)"
        )
    return gpa


def _page_align_up(value: int) -> int:
    return (value + layout.PAGE_SIZE - 1) // layout.PAGE_SIZE * layout.PAGE_SIZE
