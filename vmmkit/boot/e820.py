"""The e820 memory map the guest kernel reads from the zero page.

With a direct kernel boot there is no BIOS to answer INT 15h/E820h, so the
map goes straight into ``boot_params.e820_table``. It mirrors
:func:`vmmkit.boot.layout.ram_regions`, minus the legacy PC hole between the
EBDA and 1 MiB, which real PCs never report as RAM (Linux would otherwise
hand out the pages where the ACPI tables live).
"""

from __future__ import annotations

import attrs

from vmmkit.boot import layout

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5

#: boot_params.e820_table holds this many entries (E820_MAX_ENTRIES_ZEROPAGE).
E820_MAX_ENTRIES = 128
#: Each entry is ``struct boot_e820_entry { u64 addr; u64 size; u32 type; }``, packed.
E820_ENTRY_SIZE = 20


@attrs.frozen
class E820Entry:
    """One e820 range: ``size`` bytes from ``addr`` of the given ``type`` (E820_RAM, ...)."""

    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        """The first address after the range."""
        return self.addr + self.size


def build_e820(mem_size: int) -> list[E820Entry]:
    """Return the e820 map for a VM with ``mem_size`` bytes of RAM, sorted by address.

    * RAM 0 .. 0x9fc00 (conventional memory);
    * reserved 0x9fc00 .. 1 MiB (EBDA, VGA window, ROMs; the ACPI tables);
    * RAM 1 MiB .. min(mem_size, 3 GiB);
    * RAM 4 GiB .. 4 GiB + (mem_size - 3 GiB), when mem_size exceeds 3 GiB.

    Together the entries cover exactly ``mem_size`` bytes, all of which the
    VMM backs with memory; nothing is reported inside the MMIO hole, which
    Linux treats as free for MMIO.
    """
    layout.check_mem_size(mem_size)
    entries = []
    for gpa, size in layout.ram_regions(mem_size):
        end = gpa + size
        if gpa < layout.EBDA_START < end:
            # mem_size > 1 MiB is guaranteed, so the low region spans the hole.
            entries.append(E820Entry(gpa, layout.EBDA_START - gpa, E820_RAM))
            entries.append(E820Entry(layout.EBDA_START, layout.HIGH_MEMORY - layout.EBDA_START, E820_RESERVED))
            entries.append(E820Entry(layout.HIGH_MEMORY, end - layout.HIGH_MEMORY, E820_RAM))
        else:
            entries.append(E820Entry(gpa, size, E820_RAM))
    return entries
