"""Host-only tests for vmmkit.guest.elfdeps (DT_NEEDED and PT_INTERP without ldd).

The synthetic executables are built here; the host's own /bin/ls and a static
binary (busybox-static, or glibc's static-pie ldconfig) are read as real-world
samples, and compared with readelf where binutils is installed.
"""

from __future__ import annotations

import os
import platform
import random
import re
import shutil
import struct
import subprocess

import pytest

from vmmkit.guest.elfdeps import elf_needs, is_elf

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ = 0, 1, 5, 10
INTERP = b"/lib64/ld-linux-x86-64.so.2"
BASE = 0x400000


def make_exe(needed=(b"libfoo.so.1", b"libbar.so.2"), *, interp=INTERP, dynamic=True, strtab=True,
             split_loads=False, dynamic_first=False) -> bytes:
    """An ELF64 x86-64 executable: header, program headers, interp, .dynstr, then .dynamic last.

    With *split_loads* the file is covered by two PT_LOADs whose vaddr-offset
    differ, and .dynstr lies in the second one, so DT_STRTAB (a vaddr) must be
    mapped through the right segment. With *dynamic_first* PT_DYNAMIC comes
    before the PT_LOADs in the table.
    """
    phnum = 2 + bool(interp) + (1 if split_loads else 0)
    ph_end = 64 + 56 * phnum
    interp_off = ph_end
    interp_bytes = interp + b"\0" if interp else b""
    dynstr_off = interp_off + len(interp_bytes)
    dynstr = b"\0" + b"".join(n + b"\0" for n in needed) + b"unused.so\0"
    name_offs = []
    pos = 1
    for n in needed:
        name_offs.append(pos)
        pos += len(n) + 1
    dynamic_off = (dynstr_off + len(dynstr) + 7) & ~7
    second_vaddr = 0x800000  # vaddr of the second segment when split
    strtab_vaddr = (second_vaddr + (dynstr_off - interp_off)) if split_loads else BASE + dynstr_off
    entries = [(DT_NEEDED, off) for off in name_offs]
    if strtab:
        entries.append((DT_STRTAB, strtab_vaddr))
    entries += [(DT_STRSZ, len(dynstr)), (DT_NULL, 0)]
    dyn = b"".join(struct.pack("<qQ", t, v) for t, v in entries)
    total = dynamic_off + len(dyn)

    phdrs = []
    if split_loads:
        phdrs.append(struct.pack("<IIQQQQQQ", PT_LOAD, 4, 0, BASE, BASE, interp_off, interp_off, 0x1000))
        phdrs.append(struct.pack("<IIQQQQQQ", PT_LOAD, 6, interp_off, second_vaddr, second_vaddr,
                                 total - interp_off, total - interp_off, 0x1000))
    else:
        phdrs.append(struct.pack("<IIQQQQQQ", PT_LOAD, 5, 0, BASE, BASE, total, total, 0x1000))
    dyn_vaddr = (second_vaddr + dynamic_off - interp_off) if split_loads else BASE + dynamic_off
    ph_dyn = struct.pack("<IIQQQQQQ", PT_DYNAMIC if dynamic else 0x6474E551, 6, dynamic_off, dyn_vaddr,
                         dyn_vaddr, len(dyn), len(dyn), 8)
    phdrs = [ph_dyn] + phdrs if dynamic_first else phdrs + [ph_dyn]
    if interp:
        phdrs.insert(0, struct.pack("<IIQQQQQQ", PT_INTERP, 4, interp_off, BASE + interp_off,
                                    BASE + interp_off, len(interp_bytes), len(interp_bytes), 1))
    assert len(phdrs) == phnum

    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, BASE + total, 64, 0, 0, 64, 56, phnum, 64, 0, 0)
    blob = bytearray(header + b"".join(phdrs) + interp_bytes + dynstr)
    blob += b"\0" * (dynamic_off - len(blob))
    blob += dyn
    assert len(blob) == total
    return bytes(blob)


def test_synthetic_executable():
    assert elf_needs(make_exe()) == (["libfoo.so.1", "libbar.so.2"], INTERP.decode())


@pytest.mark.parametrize("split_loads", [False, True])
@pytest.mark.parametrize("dynamic_first", [False, True])
def test_strtab_vaddr_is_mapped_through_pt_load(split_loads, dynamic_first):
    blob = make_exe(split_loads=split_loads, dynamic_first=dynamic_first)
    assert elf_needs(blob) == (["libfoo.so.1", "libbar.so.2"], INTERP.decode())


def test_readelf_agrees_with_the_synthetic_executable(tmp_path):
    """Guard for the fixture: binutils reads the same NEEDED entries and interpreter."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) not installed; the fixture is only checked by elf_needs()")
    path = tmp_path / "exe"
    path.write_bytes(make_exe(split_loads=True))
    out = subprocess.run([readelf, "-W", "-l", "-d", str(path)], capture_output=True, text=True, check=True)
    assert re.findall(r"Shared library: \[([^]]+)\]", out.stdout) == ["libfoo.so.1", "libbar.so.2"]
    assert "[Requesting program interpreter: /lib64/ld-linux-x86-64.so.2]" in out.stdout


def test_no_needed_entries():
    assert elf_needs(make_exe(needed=())) == ([], INTERP.decode())


def test_static_executable():
    assert elf_needs(make_exe(needed=(), interp=None, dynamic=False)) == ([], None)


def test_dynamic_without_strtab_keeps_the_interpreter():
    assert elf_needs(make_exe(strtab=False)) == ([], INTERP.decode())


def test_is_elf():
    assert is_elf(make_exe())
    assert not is_elf(b"\x7fELF")
    assert not is_elf(b"\x7fELF\x01\x01" + b"\0" * 100)  # 32-bit
    assert not is_elf(b"#!/bin/sh\n" + b"\0" * 100)


# --- Real host binaries ---------------------------------------------------------


def readelf_needed(path: str) -> list[str] | None:
    readelf = shutil.which("readelf")
    if readelf is None:
        return None
    out = subprocess.run([readelf, "-W", "-d", path], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^]]+)\]", out)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="expects an x86-64 host's /bin/ls")
def test_host_ls():
    with open("/bin/ls", "rb") as f:
        needed, interp = elf_needs(f.read())
    assert "libc.so.6" in needed
    assert interp is not None and os.path.basename(interp) == "ld-linux-x86-64.so.2"
    reference = readelf_needed("/bin/ls")
    if reference is not None:
        assert needed == reference


STATIC_CANDIDATES = ["/bin/busybox", "/usr/bin/busybox", "/sbin/ldconfig", "/usr/sbin/ldconfig"]


def static_binaries() -> list[str]:
    """Host binaries known to be static (busybox-static; glibc's ldconfig is static-pie)."""
    found = []
    for path in STATIC_CANDIDATES:
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        # Debian's dynamically linked busybox exists too: keep only files without an interpreter string.
        if is_elf(head) and b"ld-linux" not in head[:4096]:
            found.append(os.path.realpath(path))
    return sorted(set(found))


def test_host_static_binary():
    paths = static_binaries()
    if not paths:
        pytest.skip("no static binary on this host (install busybox-static)")
    for path in paths:
        with open(path, "rb") as f:
            assert elf_needs(f.read()) == ([], None), path
        reference = readelf_needed(path)
        if reference is not None:
            assert reference == [], path


# --- Damaged input ----------------------------------------------------------------


def test_garbage_gives_nothing():
    rng = random.Random(42)
    for n in (0, 1, 4, 63, 64, 65, 200, 4096):
        assert elf_needs(bytes(rng.randrange(256) for _ in range(n))) == ([], None)
    for _ in range(500):
        tail = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 600)))
        result = elf_needs(b"\x7fELF\x02\x01\x01\x00" + tail)  # a valid ident, then noise
        assert isinstance(result, tuple) and isinstance(result[0], list)


def test_random_damage_never_raises():
    rng = random.Random(7)
    good = make_exe(split_loads=True)
    for _ in range(3000):
        blob = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            blob[rng.randrange(8, len(blob))] = rng.randrange(256)
        needed, interp = elf_needs(bytes(blob))
        assert isinstance(needed, list) and (interp is None or isinstance(interp, str))


def test_every_truncation_gives_nothing():
    """.dynamic is the last thing in the file, so any cut breaks it: ([], None), no exception."""
    blob = make_exe()
    for cut in range(len(blob)):
        assert elf_needs(blob[:cut]) == ([], None), cut


def test_truncated_host_binary():
    with open("/bin/ls", "rb") as f:
        blob = f.read()
    phoff, = struct.unpack_from("<Q", blob, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", blob, 0x36)
    dyn_off = next(struct.unpack_from("<Q", blob, phoff + i * phentsize + 8)[0] for i in range(phnum)
                   if struct.unpack_from("<I", blob, phoff + i * phentsize)[0] == PT_DYNAMIC)
    for cut in (0, 16, 64, 100, phoff + phentsize * phnum - 1, dyn_off, dyn_off + 20):
        assert elf_needs(blob[:cut]) == ([], None), cut
