"""Host-only tests for vmmkit.guest.kmod: .modinfo parsing and module load order.

The modules are fake but valid ELF64 relocatable files (ET_REL, x86-64) with a
section header table holding .text, .modinfo and .shstrtab, laid out in a
lib/modules/<release> tree the way Debian's kernel package ships it.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess

import pytest

from vmmkit.errors import VmmkitError
from vmmkit.guest.kmod import ModuleError, ModuleIndex, canonical, modinfo, read_builtin

RELEASE = "6.1.0-test-amd64"
SHT_PROGBITS, SHT_STRTAB = 1, 3
SHF_ALLOC, SHF_EXECINSTR = 0x2, 0x4


def make_module(modinfo_text: bytes, *, table_first: bool = False, with_modinfo: bool = True) -> bytes:
    """A minimal ELF64 relocatable with .text, .modinfo (unless told not) and .shstrtab.

    The section header table goes after the section data, or right after the
    ELF header with *table_first*.
    """
    names = [b"", b".text"] + ([b".modinfo"] if with_modinfo else []) + [b".shstrtab"]
    shstrtab = b"\0" + b"".join(n + b"\0" for n in names[1:])
    name_off = {n: shstrtab.index(b"\0" + n + b"\0") + 1 for n in names[1:]}
    text = b"\xc3" * 16  # ret
    bodies = [(b".text", SHT_PROGBITS, SHF_ALLOC | SHF_EXECINSTR, text, 16)]
    if with_modinfo:
        bodies.append((b".modinfo", SHT_PROGBITS, SHF_ALLOC, modinfo_text, 8))
    bodies.append((b".shstrtab", SHT_STRTAB, 0, shstrtab, 1))
    shnum = len(bodies) + 1
    table_size = 64 * shnum

    data_start = 64 + (table_size if table_first else 0)
    layout, blob_data, pos = [], bytearray(), data_start
    for name, kind, flags, body, align in bodies:
        pad = (-pos) % align
        blob_data += b"\0" * pad
        pos += pad
        layout.append((name, kind, flags, pos, len(body), align))
        blob_data += body
        pos += len(body)
    if table_first:
        shoff = 64
    else:
        pad = (-pos) % 8
        blob_data += b"\0" * pad
        shoff = pos + pad

    table = bytearray(64)  # section 0: SHN_UNDEF
    for name, kind, flags, offset, size, align in layout:
        table += struct.pack("<IIQQQQIIQQ", name_off[name], kind, flags, 0, offset, size, 0, 0, align, 0)
    shstrndx = shnum - 1

    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    header = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, shnum, shstrndx)
    assert len(header) == 64
    if table_first:
        return header + bytes(table) + bytes(blob_data)
    return header + bytes(blob_data) + bytes(table)


def info_text(name: str, depends: str, *extra: str) -> bytes:
    entries = [f"name={name}", f"depends={depends}", "license=GPL", *extra]
    return b"".join(e.encode() + b"\0" for e in entries)


def write_module(moddir, rel: str, name: str, depends: str) -> None:
    path = os.path.join(moddir, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(make_module(info_text(name, depends)))


PATHS = {
    "a": "kernel/drivers/a.ko",
    "b": "kernel/drivers/b.ko",
    "c": "kernel/x/c.ko",
    "d_with_dash": "kernel/fs/d-with-dash.ko",
    "e": "kernel/fs/e.ko",
}


@pytest.fixture
def moddir(tmp_path):
    """a -> b,c; b -> c; c -> (none); d-with-dash -> c; e -> d_with_dash,a."""
    root = tmp_path / "lib" / "modules" / RELEASE
    write_module(root, PATHS["a"], "a", "b,c")
    write_module(root, PATHS["b"], "b", "c")
    write_module(root, PATHS["c"], "c", "")
    write_module(root, PATHS["d_with_dash"], "d_with_dash", "c")
    write_module(root, PATHS["e"], "e", "d_with_dash,a")
    (root / "modules.order").write_text("kernel/drivers/a.ko\n")  # other files in the tree are ignored
    (root / "kernel" / "README.txt").write_text("not a module")
    return str(root)


# --- modinfo --------------------------------------------------------------------


@pytest.mark.parametrize("table_first", [False, True])
def test_modinfo_reads_all_keys(table_first):
    blob = make_module(info_text("a", "b,c", "alias=pci:v1", "alias=pci:v2", "description=x=y"),
                       table_first=table_first)
    info = modinfo(blob)
    assert info == {
        "name": ["a"], "depends": ["b,c"], "license": ["GPL"],
        "alias": ["pci:v1", "pci:v2"], "description": ["x=y"],
    }


def test_fake_module_is_a_valid_elf_for_readelf():
    """Guard for the fixture itself: binutils sees the .modinfo strings we put there."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) not installed; the fake module is only checked by modinfo()")
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".ko") as f:
        f.write(make_module(info_text("a", "b,c")))
        f.flush()
        out = subprocess.run([readelf, "-W", "-h", "-S", "-p", ".modinfo", f.name],
                             capture_output=True, text=True, check=True)
    assert "REL (Relocatable file)" in out.stdout
    assert "depends=b,c" in out.stdout and "name=a" in out.stdout
    assert "Warning" not in out.stderr, out.stderr


def test_modinfo_rejects_non_elf():
    for blob in (b"", b"\x7fELF", b"#!/bin/sh\n" + b"\0" * 100, b"\x7fELF\x01\x01" + b"\0" * 100,
                 b"\x7fELF\x02\x02" + b"\0" * 100):
        with pytest.raises(ModuleError, match="mod.ko"):
            modinfo(blob, path="mod.ko")


def test_modinfo_truncated_section_table():
    blob = make_module(info_text("a", ""))
    with pytest.raises(ModuleError, match="section table"):
        modinfo(blob[:-1], path="a.ko")
    with pytest.raises(ModuleError, match="a.ko"):
        modinfo(blob[:len(blob) - 64 * 2], path="a.ko")


def test_modinfo_section_running_past_the_end():
    blob = make_module(info_text("a", ""), table_first=True)
    with pytest.raises(ModuleError, match="out of bounds"):
        modinfo(blob[:-3], path="a.ko")


@pytest.mark.parametrize("table_first", [False, True])
def test_modinfo_every_truncation_is_a_module_error(table_first):
    blob = make_module(info_text("a", "b"), table_first=table_first)
    for cut in range(len(blob)):
        try:
            modinfo(blob[:cut], path="a.ko")
        except ModuleError:
            continue
        # A cut that keeps every byte modinfo needs may still parse, but correctly.
        assert modinfo(blob[:cut]) == modinfo(blob)


def test_modinfo_corrupt_bytes_give_module_error_or_a_result():
    """Random byte damage never escapes as IndexError/ValueError/struct.error."""
    rng = random.Random(1234)
    good = make_module(info_text("a", "b,c"))
    for _ in range(3000):
        blob = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        try:
            info = modinfo(bytes(blob), path="a.ko")
        except ModuleError:
            continue
        assert isinstance(info, dict)


def test_modinfo_unterminated_section_name():
    """A .shstrtab whose last name lacks its NUL (at the end of the file) is a ModuleError, not ValueError."""
    blob = bytearray(make_module(b"", with_modinfo=False, table_first=True))
    assert blob.endswith(b".shstrtab\0")
    blob[-1] = ord("X")
    with pytest.raises(ModuleError, match="a.ko"):
        modinfo(bytes(blob), path="a.ko")


def test_modinfo_without_modinfo_section():
    with pytest.raises(ModuleError, match="no .modinfo"):
        modinfo(make_module(b"", with_modinfo=False), path="a.ko")


def test_module_error_is_a_vmmkit_error():
    assert issubclass(ModuleError, VmmkitError)


# --- ModuleIndex -------------------------------------------------------------------


def test_index_finds_modules_by_canonical_name(moddir):
    index = ModuleIndex(moddir)
    assert index.paths == PATHS
    assert index.path("d-with-dash") == index.path("d_with_dash") == "kernel/fs/d-with-dash.ko"
    assert canonical("d-with-dash") == "d_with_dash"


def test_depends(moddir):
    index = ModuleIndex(moddir)
    assert index.depends("a") == ["b", "c"]
    assert index.depends("c") == []
    assert index.depends("d-with-dash") == ["c"]
    assert index.depends("e") == ["d_with_dash", "a"]


def test_load_order_puts_dependencies_first(moddir):
    index = ModuleIndex(moddir)
    assert index.load_order(["a"]) == ["c", "b", "a"]
    assert index.load_order(["c"]) == ["c"]
    assert index.load_order(["e"]) == ["c", "d_with_dash", "b", "a", "e"]


def test_load_order_lists_each_module_once(moddir):
    index = ModuleIndex(moddir)
    assert index.load_order(["a", "b", "c", "a"]) == ["c", "b", "a"]
    assert index.load_order(["c", "a", "b"]) == ["c", "b", "a"]
    order = index.load_order(["d-with-dash", "e", "a", "d_with_dash"])
    assert order == ["c", "d_with_dash", "b", "a", "e"]
    assert index.load_order([]) == []


def test_load_order_skips_builtin_modules(moddir):
    with open(os.path.join(moddir, "modules.builtin"), "w") as f:
        f.write("kernel/x/c.ko\nkernel/other/zz-top.ko\n\n")
    builtin = read_builtin(moddir)
    assert builtin == {"c", "zz_top"}
    index = ModuleIndex(moddir)
    assert index.load_order(["a"], builtin=builtin) == ["b", "a"]
    assert index.load_order(["c", "a"], builtin=builtin) == ["b", "a"]
    # A built-in module has no .ko file; asking for it is still fine.
    os.unlink(os.path.join(moddir, PATHS["c"]))
    index = ModuleIndex(moddir)
    assert index.load_order(["a", "zz-top"], builtin=builtin) == ["b", "a"]


def test_read_builtin_without_the_file(tmp_path):
    assert read_builtin(str(tmp_path)) == set()


def test_dependency_cycle_names_the_chain(tmp_path):
    root = str(tmp_path)
    write_module(root, "kernel/x.ko", "x", "y")
    write_module(root, "kernel/y.ko", "y", "z")
    write_module(root, "kernel/z.ko", "z", "x")
    write_module(root, "kernel/w.ko", "w", "x")
    with pytest.raises(ModuleError, match="cycle: x -> y -> z -> x"):
        ModuleIndex(root).load_order(["x"])
    with pytest.raises(ModuleError, match="cycle: w -> x -> y -> z -> x"):
        ModuleIndex(root).load_order(["w"])


def test_self_dependency_is_a_cycle(tmp_path):
    write_module(str(tmp_path), "kernel/s.ko", "s", "s")
    with pytest.raises(ModuleError, match="s -> s"):
        ModuleIndex(str(tmp_path)).load_order(["s"])


def test_missing_module_is_named(moddir):
    index = ModuleIndex(moddir)
    with pytest.raises(ModuleError, match="'virtio_blk'"):
        index.load_order(["virtio_blk"])
    write_module(moddir, "kernel/f.ko", "f", "a,ghost_dep")
    with pytest.raises(ModuleError, match="ghost_dep"):
        ModuleIndex(moddir).load_order(["f"])


def test_broken_module_file_is_named(moddir):
    with open(os.path.join(moddir, PATHS["b"]), "wb") as f:
        f.write(b"\x7fELF garbage")
    with pytest.raises(ModuleError, match="b.ko"):
        ModuleIndex(moddir).load_order(["a"])


def test_modules_dep_format(moddir):
    """depmod's format: '<path>: <deps>', deps listed so that modprobe loads them right to left."""
    index = ModuleIndex(moddir)
    text = index.modules_dep(index.load_order(["a", "d-with-dash"]))
    assert text.endswith("\n")
    lines = [line.rstrip() for line in text.splitlines()]
    assert lines == [
        "kernel/x/c.ko:",
        "kernel/drivers/b.ko: kernel/x/c.ko",
        "kernel/drivers/a.ko: kernel/drivers/b.ko kernel/x/c.ko",
        "kernel/fs/d-with-dash.ko: kernel/x/c.ko",
    ]
    # Reading it back the way modprobe does gives the load order again.
    deps = {k: v.split() for k, v in (line.split(":", 1) for line in lines)}
    assert list(reversed(deps["kernel/drivers/a.ko"])) == [PATHS[n] for n in index.load_order(["a"])[:-1]]
