"""CPU state for entering a Linux kernel through the x86-64 boot protocol.

The 64-bit boot protocol (boot.rst, "64-bit Boot Protocol") asks the loader
to start the kernel already in long mode: paging on with an identity mapping
covering the kernel, the zero page and the command line; a GDT whose
selectors 0x10 (__BOOT_CS) and 0x18 (__BOOT_DS) are flat 4 GiB code and data
segments; interrupts off; RSI holding the zero page's address.

This module produces that state as plain data: the bytes of the GDT, TSS and
page tables (:func:`boot_segments`), and the register values
(:func:`initial_regs`, :func:`initial_sregs`) as dicts whose keys are the
``kvm_regs`` / ``kvm_sregs`` / ``kvm_segment`` field names. The KVM layer
copies them into the ioctl structures; nothing here knows about KVM.
"""

from __future__ import annotations

import struct

from vmmkit.boot import layout
from vmmkit.boot.kernel import BootError

# --- Control registers and EFER. ---
CR0_PE = 1 << 0  # protected mode
CR0_ET = 1 << 4  # extension type: hard-wired to 1 on anything since the 486
CR0_NE = 1 << 5  # native x87 error reporting, what Linux uses
CR0_PG = 1 << 31  # paging
CR4_PAE = 1 << 5  # long mode requires PAE paging
EFER_LME = 1 << 8  # long mode enable
EFER_LMA = 1 << 10  # long mode active: set by hardware on PG=1, so we state it too
RFLAGS_RESERVED = 1 << 1  # bit 1 always reads as 1; IF stays 0 (interrupts off)

# --- Page table entry bits. ---
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_PAGE_SIZE = 1 << 7  # in a page directory entry: this is a 2 MiB page
LARGE_PAGE_SIZE = 2 * layout.MiB
ENTRIES_PER_TABLE = 512

# --- GDT selectors, matching the kernel's own boot GDT so that nothing has to
# change when it reloads segment registers from its table. ---
SEL_CODE64 = 0x10  # __BOOT_CS
SEL_DATA = 0x18  # __BOOT_DS
SEL_TSS = 0x20  # a 16-byte system descriptor: occupies 0x20 and 0x28
GDT_SIZE = 0x30
TSS_SIZE = 0x68  # a 64-bit TSS is 104 bytes

# Segment descriptor types (the 4-bit "type" field).
TYPE_DATA_RW_ACCESSED = 0x3
TYPE_CODE_XR_ACCESSED = 0xB
TYPE_LDT = 0x2
TYPE_TSS64_BUSY = 0xB


def _segment(**fields) -> dict:
    """A ``kvm_segment``-shaped dict; ``limit`` is in bytes, as KVM wants it."""
    seg = dict(base=0, limit=0, selector=0, type=0, present=0, dpl=0, db=0, s=0, l=0, g=0, avl=0, unusable=0)
    seg.update(fields)
    return seg


def code64_segment() -> dict:
    """The flat 64-bit ring-0 code segment, selector 0x10 (L=1, D=0 as long mode demands)."""
    return _segment(selector=SEL_CODE64, base=0, limit=0xFFFF_FFFF, type=TYPE_CODE_XR_ACCESSED,
                    present=1, s=1, l=1, db=0, g=1)


def data_segment() -> dict:
    """The flat 4 GiB ring-0 read/write data segment, selector 0x18, for DS/ES/FS/GS/SS."""
    return _segment(selector=SEL_DATA, base=0, limit=0xFFFF_FFFF, type=TYPE_DATA_RW_ACCESSED,
                    present=1, s=1, db=1, g=1)


def tss_segment() -> dict:
    """The task register: a busy 64-bit TSS at BOOT_TSS_ADDR, selector 0x20.

    Long mode has no hardware task switching, but Intel VM entry still
    rejects a guest whose TR is unusable or not a busy TSS, and KVM passes
    our value through; so TR must describe a real TSS. The guest never uses
    it: interrupts are off, and the kernel loads its own TR early.
    """
    return _segment(selector=SEL_TSS, base=layout.BOOT_TSS_ADDR, limit=TSS_SIZE - 1,
                    type=TYPE_TSS64_BUSY, present=1, s=0, g=0)


def ldt_segment() -> dict:
    """The LDT register: none (selector 0, marked unusable, which VM entry accepts)."""
    return _segment(selector=0, type=TYPE_LDT, present=0, unusable=1)


def encode_descriptor(seg: dict) -> bytes:
    """Encode a ``kvm_segment``-shaped dict as its GDT descriptor.

    8 bytes for code/data segments, 16 for system segments (TSS/LDT), whose
    base is 64 bits wide in long mode.
    """
    limit = seg["limit"] >> 12 if seg["g"] else seg["limit"]
    if limit > 0xFFFFF:
        raise ValueError(f"segment limit {seg['limit']:#x} does not fit a descriptor with g={seg['g']}")
    base = seg["base"]
    access = (seg["type"] & 0xF) | (seg["s"] << 4) | ((seg["dpl"] & 3) << 5) | (seg["present"] << 7)
    flags = seg["avl"] | (seg["l"] << 1) | (seg["db"] << 2) | (seg["g"] << 3)
    low = (
        (limit & 0xFFFF)
        | (base & 0xFF_FFFF) << 16
        | access << 40
        | (limit >> 16 & 0xF) << 48
        | flags << 52
        | (base >> 24 & 0xFF) << 56
    )
    desc = struct.pack("<Q", low)
    if not seg["s"]:
        desc += struct.pack("<II", base >> 32 & 0xFFFF_FFFF, 0)
    return desc


def build_gdt() -> bytes:
    """Return the boot GDT: null, unused, 64-bit code, data, TSS (16 bytes)."""
    gdt = bytearray(GDT_SIZE)
    for seg in (code64_segment(), data_segment(), tss_segment()):
        desc = encode_descriptor(seg)
        gdt[seg["selector"]:seg["selector"] + len(desc)] = desc
    return bytes(gdt)


def build_tss() -> bytes:
    """Return a zeroed 64-bit TSS whose I/O-map base points past its end (no I/O bitmap)."""
    tss = bytearray(TSS_SIZE)
    struct.pack_into("<H", tss, 0x66, TSS_SIZE)
    return bytes(tss)


def build_page_tables() -> list[tuple[int, bytes]]:
    """Return the identity map of 0..4 GiB as ``[(gpa, bytes), ...]``.

    One PML4 entry -> one PDPT with four entries -> four page directories of
    512 2-MiB pages each. 4 GiB covers every place the boot protocol needs
    mapped (kernel, zero page, command line, initrd: all in low RAM), and the
    kernel builds its own page tables before touching anything else. The MMIO
    hole is mapped too (as ordinary write-back memory); nothing uses it before
    the kernel has its own tables with the right caching attributes.
    """
    table_flags = PTE_PRESENT | PTE_WRITABLE
    pml4 = bytearray(layout.PAGE_SIZE)
    struct.pack_into("<Q", pml4, 0, layout.PDPT_ADDR | table_flags)
    pdpt = bytearray(layout.PAGE_SIZE)
    for i in range(layout.PD_COUNT):
        struct.pack_into("<Q", pdpt, i * 8, (layout.PD_ADDR + i * layout.PAGE_SIZE) | table_flags)
    pds = bytearray(layout.PD_COUNT * layout.PAGE_SIZE)
    for i in range(layout.PD_COUNT * ENTRIES_PER_TABLE):
        struct.pack_into("<Q", pds, i * 8, (i * LARGE_PAGE_SIZE) | table_flags | PTE_PAGE_SIZE)
    return [(layout.PML4_ADDR, bytes(pml4)), (layout.PDPT_ADDR, bytes(pdpt)), (layout.PD_ADDR, bytes(pds))]


def boot_segments() -> list[tuple[int, bytes]]:
    """Return every ``(gpa, bytes)`` the vCPU state below relies on: GDT, TSS, page tables.

    Write them into guest RAM before the first KVM_RUN. They live below
    0x10000 (see :mod:`vmmkit.boot.layout`) and overlap neither each other
    nor the zero page.
    """
    return [(layout.GDT_ADDR, build_gdt()), (layout.BOOT_TSS_ADDR, build_tss()), *build_page_tables()]


def initial_regs(entry64: int, boot_params_gpa: int = layout.BOOT_PARAMS_ADDR) -> dict:
    """Return the ``kvm_regs`` fields for the boot vCPU, as a dict of every GPR.

    RIP is the kernel's 64-bit entry, RSI the zero page, RFLAGS only its
    always-one bit (interrupts disabled). RSP/RBP point at a small stack
    below the page tables; everything else is zero, as the protocol wants.
    """
    regs = {name: 0 for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
    )}
    regs.update(
        rip=entry64,
        rsi=boot_params_gpa,
        rsp=layout.BOOT_STACK_POINTER,
        rbp=layout.BOOT_STACK_POINTER,
        rflags=RFLAGS_RESERVED,
    )
    return regs


def initial_sregs() -> dict:
    """Return the ``kvm_sregs`` fields for 64-bit entry.

    Keys: ``cs ds es fs gs ss tr ldt`` (``kvm_segment`` dicts), ``gdt`` and
    ``idt`` (``{"base", "limit"}``), ``cr0 cr2 cr3 cr4 cr8 efer``. Not
    included, to be kept from KVM_GET_SREGS: ``apic_base`` and
    ``interrupt_bitmap``. The IDT is empty (limit 0): any exception before the
    kernel installs its own ends in a triple fault, i.e. a clean
    KVM_EXIT_SHUTDOWN rather than a jump into garbage.
    """
    data = data_segment()
    return {
        "cs": code64_segment(),
        "ds": dict(data),
        "es": dict(data),
        "fs": dict(data),
        "gs": dict(data),
        "ss": dict(data),
        "tr": tss_segment(),
        "ldt": ldt_segment(),
        "gdt": {"base": layout.GDT_ADDR, "limit": GDT_SIZE - 1},
        "idt": {"base": 0, "limit": 0},
        "cr0": CR0_PE | CR0_ET | CR0_NE | CR0_PG,
        "cr2": 0,
        "cr3": layout.PML4_ADDR,
        "cr4": CR4_PAE,
        "cr8": 0,
        "efer": EFER_LME | EFER_LMA,
    }


def cmdline_bytes(cmdline: str, max_size: int) -> bytes:
    """Encode ``cmdline`` NUL-terminated for CMDLINE_ADDR.

    ``max_size`` is the longest command line the kernel accepts *excluding*
    the NUL, i.e. ``KernelImage.cmdline_size`` (the setup header's
    ``cmdline_size`` has that meaning). The 64 KiB window at CMDLINE_ADDR
    caps it too. Raises BootError when the line is too long, rather than let
    the kernel silently cut it.
    """
    encoded = cmdline.encode("utf-8")
    if b"\0" in encoded:
        raise BootError("kernel command line contains a NUL character")
    limit = min(max_size, layout.CMDLINE_MAX_SIZE - 1)
    if len(encoded) > limit:
        raise BootError(f"kernel command line is {len(encoded)} bytes; this kernel accepts at most {limit}")
    return encoded + b"\0"
