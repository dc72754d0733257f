"""The guest physical memory map of a vmmkit x86-64 VM.

Everything that has a fixed guest physical address (GPA) lives here, so the
boot code, the ACPI tables, the device models and the KVM setup agree on one
map. Addresses below 1 MiB follow the PC conventions Linux expects; the
structures vmmkit itself writes (GDT, zero page, page tables, command line)
sit in low RAM that the kernel is free to reuse once it has copied what it
needs from them.

::

    0x0000_0000  RAM (real-mode IVT/BDA area, left zero)
    0x0000_0500  GDT (+ TSS right after it)
    0x0000_7000  zero page (struct boot_params)
    0x0000_8ff0  initial stack pointer (stack grows down into 0x8000..0x8fff)
    0x0000_9000  PML4, 0xa000 PDPT, 0xb000..0xefff four page directories
    0x0002_0000  kernel command line (up to 64 KiB)
    0x0009_fc00  EBDA / VGA / ROM area: reserved in e820, not RAM
    0x000e_0000  ACPI tables (inside the reserved area)
    0x0010_0000  the kernel (HIGH_MEMORY), then free RAM, the initrd near the top
    0xc000_0000  MMIO hole: virtio-mmio at 0xd000_0000, IOAPIC, LAPIC, ...
    0x1_0000_0000  RAM beyond the first 3 GiB continues here
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

PAGE_SIZE = 0x1000

# --- Low memory: structures vmmkit writes before the first instruction. ---

#: Global descriptor table for the 64-bit entry (see :mod:`vmmkit.boot.x86`).
GDT_ADDR = 0x500
#: A zeroed 64-bit TSS that the boot TR points at (KVM needs a usable TR).
BOOT_TSS_ADDR = 0x580
#: The zero page, ``struct boot_params``; RSI points here at entry.
BOOT_PARAMS_ADDR = 0x7000
ZERO_PAGE_ADDR = BOOT_PARAMS_ADDR
#: Initial RSP/RBP. The kernel switches to its own stack within a few
#: instructions, but a sane value keeps an early push from scribbling over
#: the zero page or the page tables: 0x8000..0x8fff is otherwise unused.
BOOT_STACK_POINTER = 0x8FF0
#: Identity page tables: one PML4, one PDPT, four page directories of 2 MiB
#: pages mapping 0..4 GiB.
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
PD_COUNT = 4
PAGE_TABLES_END = PD_ADDR + PD_COUNT * PAGE_SIZE  # 0xF000, exclusive
#: Kernel command line and the most vmmkit will ever give it (incl. NUL).
#: The kernel's own limit (setup header ``cmdline_size``) is usually far
#: smaller, 2 KiB on x86; both are checked.
CMDLINE_ADDR = 0x20000
CMDLINE_MAX_SIZE = 64 * KiB

# --- The legacy PC hole below 1 MiB. ---

#: Start of the Extended BIOS Data Area; from here up to 1 MiB (VGA window,
#: option ROMs, BIOS) is not RAM in the e820 map, as on real PCs. Linux
#: scans 0xe0000..0xfffff for the ACPI RSDP, which is why the tables go there.
EBDA_START = 0x9FC00
ACPI_TABLES_ADDR = 0xE0000
ACPI_TABLES_END = 0x100000
#: Where the kernel's protected-mode code is loaded; also the start of
#: "high" memory in the boot protocol's sense.
HIGH_MEMORY = 0x100000
KERNEL_LOAD_ADDR = HIGH_MEMORY

# --- The 32-bit MMIO hole. ---

MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 0x1_0000_0000
MMIO_HOLE_SIZE = MMIO_HOLE_END - MMIO_HOLE_START
#: RAM above MMIO_HOLE_START is remapped to start here.
HIGH_RAM_START = MMIO_HOLE_END

#: virtio-mmio device windows: device ``i`` lives at VIRTIO_MMIO_BASE + i * size.
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_SIZE = 0x1000
#: How many windows fit before anything else in the hole would be hit; far
#: more than a VM will use, the limit only keeps the window inside the hole.
VIRTIO_MMIO_MAX_DEVICES = 0x1000

IOAPIC_ADDR = 0xFEC0_0000
IOAPIC_SIZE = 0x1000
LAPIC_ADDR = 0xFEE0_0000
LAPIC_SIZE = 0x1000

#: Three pages KVM needs on Intel hosts without "unrestricted guest" to
#: emulate real mode (KVM_SET_TSS_ADDR), and the one page before it for its
#: EPT identity map (KVM_SET_IDENTITY_MAP_ADDR). They must not overlap RAM
#: or a device, so they sit in the hole just below the BIOS ROM alias.
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000
KVM_TSS_ADDR = 0xFFFB_D000


def virtio_mmio_addr(index: int) -> int:
    """Return the GPA of the ``index``-th virtio-mmio device window."""
    if not 0 <= index < VIRTIO_MMIO_MAX_DEVICES:
        raise ValueError(f"virtio-mmio device index {index} out of range")
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE


def check_mem_size(mem_size: int) -> None:
    """Raise a user-facing ``BootError`` unless ``mem_size`` is a usable RAM size.

    KVM memory slots need page-aligned sizes, and the boot layout needs RAM
    beyond HIGH_MEMORY for the kernel to land in.
    """
    # Imported here: kernel.py imports this module, and BootError lives there.
    from vmmkit.boot.kernel import BootError

    if not isinstance(mem_size, int) or mem_size <= HIGH_MEMORY:
        raise BootError(f"guest memory size {mem_size!r} is too small: it must be more than 1 MiB")
    if mem_size % PAGE_SIZE:
        raise BootError(f"guest memory size {mem_size:#x} is not a multiple of 4 KiB")


def low_ram_end(mem_size: int) -> int:
    """Return the end (exclusive) of RAM below the MMIO hole."""
    return min(mem_size, MMIO_HOLE_START)


def ram_regions(mem_size: int) -> list[tuple[int, int]]:
    """Split ``mem_size`` bytes of guest RAM around the MMIO hole.

    Returns ``[(gpa, size), ...]`` in address order: one region from 0 for up
    to 3 GiB, and a second one at 4 GiB holding the rest. These are the
    regions to back with memory and register as KVM memory slots; the total
    size always equals ``mem_size``.
    """
    check_mem_size(mem_size)
    low = low_ram_end(mem_size)
    regions = [(0, low)]
    if mem_size > low:
        regions.append((HIGH_RAM_START, mem_size - low))
    return regions


def gpa_is_ram(gpa: int, mem_size: int) -> bool:
    """Whether ``gpa`` falls inside one of :func:`ram_regions`."""
    return any(start <= gpa < start + size for start, size in ram_regions(mem_size))
