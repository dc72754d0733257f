"""Shared-library needs of ELF programs (DT_NEEDED), read without ldd.

The builders copy Debian programs into an initramfs together with exactly the
libraries they load. ``ldd`` would run the program (and needs the libraries
installed on the host); reading the dynamic section needs neither.
"""

from __future__ import annotations

import struct

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB = 0, 1, 5


def is_elf(blob: bytes) -> bool:
    """True for a 64-bit little-endian ELF file."""
    return blob[:4] == b"\x7fELF" and len(blob) >= 64 and blob[4] == 2 and blob[5] == 1


def elf_needs(blob: bytes) -> tuple[list[str], str | None]:
    """Return ``(needed sonames, interpreter path or None)`` of a 64-bit ELF file.

    Malformed or static files give ``([], None)``: the caller copies them as
    they are and lets the guest's loader complain if they were broken.
    """
    if not is_elf(blob):
        return [], None
    try:
        phoff, = struct.unpack_from("<Q", blob, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", blob, 0x36)
        loads, dynamic, interp = [], None, None
        for i in range(phnum):
            p_type, _flags, offset, vaddr, _paddr, filesz, _memsz, _align = struct.unpack_from(
                "<IIQQQQQQ", blob, phoff + i * phentsize)
            if p_type == PT_LOAD:
                loads.append((vaddr, offset, filesz))
            elif p_type == PT_DYNAMIC:
                dynamic = (offset, filesz)
            elif p_type == PT_INTERP:
                interp = blob[offset:offset + filesz].split(b"\0")[0].decode()
        if dynamic is None:
            return [], interp
        needed_offsets, strtab = [], None
        off, size = dynamic
        for pos in range(off, off + size, 16):
            tag, val = struct.unpack_from("<qQ", blob, pos)
            if tag == DT_NULL:
                break
            if tag == DT_NEEDED:
                needed_offsets.append(val)
            elif tag == DT_STRTAB:
                strtab = val
        if strtab is None:
            return [], interp
        # DT_STRTAB holds a virtual address; map it to a file offset through PT_LOAD.
        for vaddr, offset, filesz in loads:
            if vaddr <= strtab < vaddr + filesz:
                str_off = strtab - vaddr + offset
                break
        else:
            return [], interp
        names = []
        for n in needed_offsets:
            start = str_off + n
            names.append(blob[start:blob.index(b"\0", start)].decode())
        return names, interp
    except (struct.error, ValueError, IndexError, OverflowError, UnicodeDecodeError):
        return [], None
