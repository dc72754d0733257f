"""Parse a Linux x86-64 kernel (bzImage or ELF vmlinux) into what to copy where.

Pure functions over bytes: nothing here touches KVM or guest memory. The
result, :class:`KernelImage`, lists the segments to copy into guest RAM, the
64-bit entry point, and the setup-header facts the zero page and the initrd
placement need.

Both formats are entered through the Linux 64-bit boot protocol: the CPU is
already in long mode with identity paging, RSI points at ``struct
boot_params``. For a bzImage that means jumping to ``startup_64`` in the
compressed kernel, 0x200 bytes past its load address; for a vmlinux it means
its ELF entry point, translated to a physical address.
"""

from __future__ import annotations

import os
import struct

import attrs

from vmmkit.boot import layout
from vmmkit.errors import VmmkitError


class BootError(VmmkitError):
    """The kernel, initrd, command line or memory size cannot be booted as given."""


# --- Setup header (Documentation/arch/x86/boot.rst), offsets in the file. ---

HDR_START = 0x1F1  # the setup header is copied into boot_params from here
HDR_LIMIT = 0x290  # boot_params has room for the header up to here
OFF_SETUP_SECTS = 0x1F1
OFF_SYSSIZE = 0x1F4
OFF_BOOT_FLAG = 0x1FE
OFF_JUMP = 0x200  # 2-byte short jump; its second byte sizes the header
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_LOADFLAGS = 0x211
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE = 0x234
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260
#: The last header byte this module reads (init_size ends here).
HDR_NEEDED_END = 0x264

BOOT_FLAG = 0xAA55
HDRS_MAGIC = b"HdrS"
LOADFLAG_LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01
#: The 64-bit entry (startup_64) is this far into the protected-mode code.
STARTUP_64_OFFSET = 0x200

#: Protocol 2.06 brought ``cmdline_size``; older kernels are long gone.
MIN_PROTOCOL = 0x0206
#: ``xloadflags``, the only way a bzImage says it has a 64-bit entry point,
#: exists from protocol 2.12 (Linux 3.8) on.
XLOADFLAGS_PROTOCOL = 0x020C

# --- What we claim for an ELF vmlinux, which carries no setup header. ---

#: The newest protocol whose zero-page fields we fill in (2.15, Linux 5.5+).
ELF_PROTOCOL = 0x020F
#: x86 COMMAND_LINE_SIZE is 2048 including the NUL; cmdline_size excludes it.
ELF_CMDLINE_SIZE = 2047
#: What every 64-bit kernel reports for initrd_addr_max (2 GiB - 1).
ELF_INITRD_ADDR_MAX = 0x7FFF_FFFF
ELF_KERNEL_ALIGNMENT = 0x100_0000

# --- ELF64 constants. ---

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
ELF64_EHDR_SIZE = 64
ELF64_PHDR_SIZE = 56
#: A kernel bigger than this is a corrupt header, not a kernel; the check
#: keeps a bogus p_memsz from making us allocate gigabytes of zeros.
MAX_KERNEL_MEMSZ = 1 << 30


@attrs.frozen
class KernelImage:
    """A parsed kernel: what to copy into guest RAM and how to enter it.

    ``segments`` are ``(gpa, bytes)`` pairs to copy verbatim. For an ELF the
    zero-filled tail of each segment (its .bss, up to ``p_memsz``) is included,
    so loading is correct even into RAM that is not freshly zeroed.

    ``init_size`` is *derived*, not the raw header field: it is how many bytes
    from :attr:`load_addr` the kernel may use before it has reserved its own
    memory (see :func:`_bzimage_footprint`), so the initrd goes at or above
    :attr:`end`. The raw header value still reaches the kernel inside
    ``setup_header``.
    """

    kind: str  # "bzimage" or "elf"
    segments: tuple  # ((gpa, bytes), ...)
    entry64: int
    setup_header: bytes | None
    protocol: int
    initrd_addr_max: int
    cmdline_size: int
    kernel_alignment: int
    relocatable: bool
    init_size: int

    @property
    def load_addr(self) -> int:
        """The lowest GPA the kernel is loaded at."""
        return min(gpa for gpa, _ in self.segments)

    @property
    def end(self) -> int:
        """The first GPA above everything the kernel occupies while booting."""
        loaded_end = max(gpa + len(data) for gpa, data in self.segments)
        return max(loaded_end, self.load_addr + self.init_size)


def _name(path: str | os.PathLike | None) -> str:
    return f"'{os.fspath(path)}'" if path is not None else "the kernel image"


def _u8(data: bytes, off: int) -> int:
    return data[off]


def _u16(data: bytes, off: int) -> int:
    return struct.unpack_from("<H", data, off)[0]


def _u32(data: bytes, off: int) -> int:
    return struct.unpack_from("<I", data, off)[0]


def _u64(data: bytes, off: int) -> int:
    return struct.unpack_from("<Q", data, off)[0]


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _version(protocol: int) -> str:
    return f"{protocol >> 8}.{protocol & 0xFF:02d}"


def load_kernel(data: bytes, *, path: str | os.PathLike | None = None) -> KernelImage:
    """Parse ``data`` as a bzImage or an x86-64 ELF vmlinux.

    ``path`` only names the file in error messages. Raises :class:`BootError`
    for anything that is not a bootable 64-bit Linux kernel: unknown format,
    truncated file, a boot protocol too old for the 64-bit entry, or ELF
    segments that point outside the file or outside low RAM.
    """
    data = bytes(data)
    if data[:4] == ELF_MAGIC:
        return _load_elf(data, path)
    if len(data) >= OFF_HEADER + 4 and data[OFF_HEADER:OFF_HEADER + 4] == HDRS_MAGIC:
        return _load_bzimage(data, path)
    raise BootError(f"{_name(path)} is not a Linux kernel (bzImage or ELF vmlinux)")


def load_kernel_file(path: str | os.PathLike) -> KernelImage:
    """Read ``path`` and parse it with :func:`load_kernel`; I/O errors become BootError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BootError(f"cannot read kernel {_name(path)}: {e.strerror or e}") from e
    return load_kernel(data, path=path)


# --- bzImage ---


def _load_bzimage(data: bytes, path) -> KernelImage:
    name = _name(path)
    if _u16(data, OFF_BOOT_FLAG) != BOOT_FLAG:
        raise BootError(f"{name} is not a Linux kernel (bzImage or ELF vmlinux): bad boot flag")
    protocol = _u16(data, OFF_VERSION)
    if protocol < MIN_PROTOCOL:
        raise BootError(
            f"{name} uses boot protocol {_version(protocol)}, too old: "
            f"vmmkit needs {_version(XLOADFLAGS_PROTOCOL)} or newer (Linux 3.8+) for the 64-bit entry point"
        )
    if protocol < XLOADFLAGS_PROTOCOL:
        # Before 2.12 there is no xloadflags, so nothing tells us the kernel
        # has a 64-bit entry; guessing would jump into 32-bit code in long mode.
        raise BootError(
            f"{name} uses boot protocol {_version(protocol)}, which cannot advertise a 64-bit entry point: "
            f"vmmkit needs {_version(XLOADFLAGS_PROTOCOL)} or newer (Linux 3.8+)"
        )

    # The header runs to 0x202 + the jump's displacement byte (boot.rst).
    hdr_end = OFF_HEADER + _u8(data, OFF_JUMP + 1)
    if hdr_end > len(data):
        raise BootError(f"{name} is truncated: the file ends inside the setup header")
    if hdr_end < HDR_NEEDED_END or hdr_end > HDR_LIMIT:
        raise BootError(
            f"{name} has a corrupt setup header: it claims to end at {hdr_end:#x}, "
            f"but protocol {_version(protocol)} needs {HDR_NEEDED_END:#x}..{HDR_LIMIT:#x}"
        )

    if not _u8(data, OFF_LOADFLAGS) & LOADFLAG_LOADED_HIGH:
        raise BootError(f"{name} is a zImage (loads below 1 MiB); only bzImage kernels are supported")
    if not _u16(data, OFF_XLOADFLAGS) & XLF_KERNEL_64:
        raise BootError(
            f"{name} has no 64-bit entry point (XLF_KERNEL_64 is not set): "
            "it is a 32-bit kernel, and vmmkit boots x86-64 kernels only"
        )

    setup_sects = _u8(data, OFF_SETUP_SECTS) or 4  # 0 means 4, for ancient reasons
    pm_offset = (setup_sects + 1) * 512  # boot sector + setup sectors
    payload_len = len(data) - pm_offset
    if payload_len <= 0:
        raise BootError(f"{name} is truncated: it ends before the protected-mode kernel at {pm_offset:#x}")
    # syssize counts the protected-mode code in 16-byte units; the build pads
    # the file to at least that. A signed kernel may carry a trailer past it,
    # which is why we load the whole rest of the file rather than syssize*16.
    syssize_bytes = _u32(data, OFF_SYSSIZE) * 16
    if payload_len < syssize_bytes:
        raise BootError(
            f"{name} is truncated: the setup header announces {syssize_bytes} bytes of kernel "
            f"after offset {pm_offset:#x}, the file has {payload_len}"
        )

    kernel_alignment = _u32(data, OFF_KERNEL_ALIGNMENT)
    relocatable = bool(_u8(data, OFF_RELOCATABLE))
    pref_address = _u64(data, OFF_PREF_ADDRESS)
    raw_init_size = _u32(data, OFF_INIT_SIZE)

    # Load at 0x100000, not pref_address: it is the one address every bzImage
    # accepts (a non-relocatable kernel *must* be there; a relocatable one
    # moves itself to an aligned buffer anyway), it needs no extra RAM below
    # the kernel, and it is what Firecracker and Cloud Hypervisor do, so it
    # is the path kernels are tested on under KVM.
    load_addr = layout.KERNEL_LOAD_ADDR
    footprint_end = _bzimage_footprint(load_addr, payload_len, kernel_alignment, relocatable,
                                       pref_address, raw_init_size)
    return KernelImage(
        kind="bzimage",
        segments=((load_addr, data[pm_offset:]),),
        entry64=load_addr + STARTUP_64_OFFSET,
        setup_header=data[HDR_START:hdr_end],
        protocol=protocol,
        initrd_addr_max=_u32(data, OFF_INITRD_ADDR_MAX),
        cmdline_size=_u32(data, OFF_CMDLINE_SIZE),
        kernel_alignment=kernel_alignment,
        relocatable=relocatable,
        init_size=footprint_end - load_addr,
    )


def _bzimage_footprint(load_addr: int, payload_len: int, alignment: int, relocatable: bool,
                       pref_address: int, init_size: int) -> int:
    """Return the end of the memory a bzImage uses while decompressing.

    The compressed kernel does not decompress in place: it picks a buffer
    at the load address rounded up to ``kernel_alignment`` (relocatable) but
    never below LOAD_PHYSICAL_ADDR, which the header publishes as
    ``pref_address``; a non-relocatable kernel always uses LOAD_PHYSICAL_ADDR.
    ``init_size`` bytes from that buffer's start are used, and the loaded
    image itself must not be clobbered either, so the initrd goes above both.
    (With KASLR the kernel may move elsewhere, but it then avoids the initrd
    and command line on its own.)
    """
    if relocatable and alignment and alignment & (alignment - 1) == 0:
        base = max(_align_up(load_addr, alignment), pref_address)
    else:
        base = pref_address or load_addr
    return max(load_addr + payload_len, base + init_size)


# --- ELF vmlinux ---


def _load_elf(data: bytes, path) -> KernelImage:
    name = _name(path)
    if len(data) < ELF64_EHDR_SIZE:
        raise BootError(f"{name} is truncated: too short for an ELF header")
    ei_class, ei_data = data[4], data[5]
    if ei_class != ELFCLASS64:
        raise BootError(f"{name} is a 32-bit ELF; vmmkit boots x86-64 kernels only")
    if ei_data != ELFDATA2LSB:
        raise BootError(f"{name} is a big-endian ELF, not an x86-64 kernel")
    (e_type, e_machine, _version_, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum) = struct.unpack_from("<HHIQQQIHHH", data, 16)
    if e_machine != EM_X86_64:
        raise BootError(f"{name} is an ELF for machine {e_machine}, not an x86-64 kernel")
    if e_type != ET_EXEC:
        raise BootError(f"{name} is not an executable ELF (e_type {e_type}); a vmlinux is ET_EXEC")
    if e_phnum == 0 or e_phentsize < ELF64_PHDR_SIZE:
        raise BootError(f"{name} is not a Linux kernel: its ELF has no usable program headers")
    if e_phoff + e_phnum * e_phentsize > len(data):
        raise BootError(f"{name} is truncated: the ELF program headers run past the end of the file")

    segments = []  # (paddr, vaddr, memsz, bytes)
    for i in range(e_phnum):
        (p_type, _pflags, p_offset, p_vaddr, p_paddr, p_filesz,
         p_memsz, _align) = struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        where = f"{name}: ELF segment {i}"
        if p_offset + p_filesz > len(data):
            raise BootError(
                f"{where} ({p_filesz} bytes at file offset {p_offset:#x}) runs past the end of the file "
                f"({len(data)} bytes): the file is truncated or corrupt"
            )
        if p_filesz > p_memsz:
            raise BootError(f"{where} is corrupt: p_filesz {p_filesz:#x} > p_memsz {p_memsz:#x}")
        if p_memsz > MAX_KERNEL_MEMSZ:
            raise BootError(f"{where} is corrupt: p_memsz {p_memsz:#x} is implausibly large")
        # vmmkit's own boot structures live below 1 MiB and the MMIO hole
        # starts at 3 GiB: a kernel segment must fit in between.
        if p_paddr < layout.HIGH_MEMORY or p_paddr + p_memsz > layout.MMIO_HOLE_START:
            raise BootError(
                f"{where} loads at physical {p_paddr:#x}..{p_paddr + p_memsz:#x}, outside "
                f"{layout.HIGH_MEMORY:#x}..{layout.MMIO_HOLE_START:#x} where vmmkit can place a kernel"
            )
        body = data[p_offset:p_offset + p_filesz] + bytes(p_memsz - p_filesz)
        segments.append((p_paddr, p_vaddr, p_memsz, body))
    if not segments:
        raise BootError(f"{name} is not a Linux kernel: its ELF has no loadable segments")

    segments.sort(key=lambda s: s[0])
    for (a_pa, _, a_sz, _), (b_pa, _, _, _) in zip(segments, segments[1:]):
        if a_pa + a_sz > b_pa:
            raise BootError(f"{name} is corrupt: ELF segments overlap at physical {b_pa:#x}")

    entry64 = _elf_entry_to_physical(e_entry, segments, name)
    load_addr = segments[0][0]
    end = max(pa + sz for pa, _, sz, _ in segments)
    return KernelImage(
        kind="elf",
        segments=tuple((pa, body) for pa, _, _, body in segments),
        entry64=entry64,
        setup_header=None,
        protocol=ELF_PROTOCOL,
        initrd_addr_max=ELF_INITRD_ADDR_MAX,
        cmdline_size=ELF_CMDLINE_SIZE,
        kernel_alignment=ELF_KERNEL_ALIGNMENT,
        relocatable=False,  # loaded exactly at p_paddr
        init_size=end - load_addr,
    )


def _elf_entry_to_physical(e_entry: int, segments, name: str) -> int:
    """Translate ``e_entry`` to a GPA via the PT_LOAD segment that contains it.

    ELF says e_entry is virtual, and a vmlinux's segments are linked at
    0xffffffff8...; but x86 vmlinux actually sets e_entry to the *physical*
    startup_64. Try the virtual reading first (it is the ELF meaning), then
    the physical one.
    """
    for paddr, vaddr, memsz, _ in segments:
        if vaddr <= e_entry < vaddr + memsz:
            return paddr + (e_entry - vaddr)
    for paddr, _, memsz, _ in segments:
        if paddr <= e_entry < paddr + memsz:
            return e_entry
    raise BootError(f"{name} has its entry point {e_entry:#x} outside every loadable segment")


def check_kernel_fits(image: KernelImage, mem_size: int, *, path: str | os.PathLike | None = None) -> None:
    """Raise BootError if the kernel's boot footprint does not fit below the MMIO hole.

    Call this when there is no initrd; :func:`vmmkit.boot.bootparams.place_initrd`
    performs the same check implicitly.
    """
    limit = layout.low_ram_end(mem_size)
    if image.end > limit:
        raise BootError(
            f"{_name(path)} needs RAM up to {image.end / layout.MiB:.1f} MiB to boot, "
            f"but the VM has only {limit / layout.MiB:.1f} MiB below the MMIO hole: give it more memory"
        )
