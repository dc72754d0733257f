"""Host-only tests for vmmkit.guest.deb, the .deb reader (no dpkg needed by the code).

The packages are built here: an ``ar`` container written by hand around
tarballs made with :mod:`tarfile`. A cross-check extracts a package built by
the real ``dpkg-deb --build`` and compares the tree with ``dpkg-deb -x``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest

from vmmkit.errors import VmmkitError
from vmmkit.guest.deb import DebError, ar_members, extract, normalize, open_data_tar


# --- Building packages ---------------------------------------------------------


def ar_header(name: str, size: int, *, gnu: bool = False, size_field: bytes | None = None) -> bytes:
    """A 60-byte ar member header (dpkg style names, or GNU style with a trailing '/')."""
    raw_name = (name + "/" if gnu else name).encode()
    header = (raw_name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
              + (size_field if size_field is not None else str(size).encode()).ljust(10) + b"`\n")
    assert len(header) == 60
    return header


def make_ar(members: list[tuple[str, bytes]], *, gnu: bool = False) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, content in members:
        out += ar_header(name, len(content), gnu=gnu) + content
        if len(content) % 2:
            out += b"\n"  # ar pads members to an even offset
    return bytes(out)


def dir_(name, mode=0o755):
    return ("dir", name, mode)


def file_(name, data, mode=0o644):
    return ("file", name, data, mode)


def sym(name, target):
    return ("sym", name, target)


def hardlink(name, target):
    return ("link", name, target)


def make_tar(entries, compression: str = "") -> bytes:
    """A tarball of *entries* (see dir_/file_/sym/hardlink), compressed with *compression*."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:" + compression, format=tarfile.GNU_FORMAT) as tar:
        for kind, name, *rest in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            data = None
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, rest[0]
            elif kind == "file":
                data, info.mode = rest
                info.size = len(data)
            elif kind == "sym":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, rest[0], 0o777
            elif kind == "link":
                info.type, info.linkname, info.mode = tarfile.LNKTYPE, rest[0], 0o644
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


CONTROL = b"Package: vmmkit-test\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.com>\nDescription: t\n"
TOOL = b"#!/bin/sh\necho tool\n"
README = b"read me\n"
ODD_MEMBER = b"12345"  # 5 bytes: forces an ar pad byte before data.tar

STANDARD_ENTRIES = [
    dir_("./"),
    dir_("./usr/"),
    dir_("./usr/bin/"),
    file_("./usr/bin/tool", TOOL, 0o755),
    sym("./usr/bin/alias", "tool"),
    hardlink("./usr/bin/tool2", "./usr/bin/tool"),
    dir_("./usr/share/"),
    dir_("./usr/share/doc/"),
    dir_("./usr/share/doc/vmmkit-test/"),
    file_("./usr/share/doc/vmmkit-test/README", README, 0o644),
    dir_("./etc/"),
    dir_("./etc/empty.d/"),
]


def make_deb(path, entries=STANDARD_ENTRIES, *, compression="xz", odd_member=True, gnu=False,
             data_name=None) -> str:
    """Write a .deb to *path*: debian-binary, control.tar.xz, an odd-sized member, data.tar.*."""
    ext = {"": "", "xz": ".xz", "gz": ".gz", "bz2": ".bz2"}[compression]
    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", make_tar([file_("./control", CONTROL)], "xz")),
    ]
    if odd_member:
        members.append(("_vmmkit-odd", ODD_MEMBER))
    members.append((data_name or "data.tar" + ext, make_tar(entries, compression)))
    with open(path, "wb") as f:
        f.write(make_ar(members, gnu=gnu))
    return str(path)


def snapshot(root) -> dict[str, tuple]:
    """{relative path: description} of every entry under *root* (type, mode, content, link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                with open(full, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), f.read())
    return out


def hardlink_groups(root) -> set[frozenset[str]]:
    """Sets of regular files under *root* that share an inode (more than one name)."""
    by_ino: dict[int, set[str]] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                by_ino.setdefault(st.st_ino, set()).add(os.path.relpath(full, root))
    return {frozenset(v) for v in by_ino.values() if len(v) > 1}


def tree_outside(root, inside) -> set[str]:
    """Every path under *root* except those under *inside*."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if full == str(inside) or full.startswith(str(inside) + os.sep):
                continue
            found.add(os.path.relpath(full, root))
    return found


# --- ar container ----------------------------------------------------------------


def test_ar_members_reads_odd_sized_members_and_skips_the_pad_byte():
    blob = make_ar([("a", b"x"), ("bb", b"yyy"), ("c", b"zz"), ("d", b"")])
    assert blob[8 + 60 + 1:8 + 60 + 2] == b"\n"  # the pad byte really is there
    assert list(ar_members(blob)) == [("a", b"x"), ("bb", b"yyy"), ("c", b"zz"), ("d", b"")]


def test_ar_members_accepts_gnu_style_names():
    blob = make_ar([("debian-binary", b"2.0\n"), ("data.tar", b"abc")], gnu=True)
    assert [n for n, _ in ar_members(blob)] == ["debian-binary", "data.tar"]


def test_ar_members_of_empty_archive():
    assert list(ar_members(b"!<arch>\n")) == []


def test_deb_error_is_a_vmmkit_error():
    assert issubclass(DebError, VmmkitError)


def test_normalize():
    assert normalize("./usr/bin/x") == "usr/bin/x"
    assert normalize("/usr//bin/./x") == "usr/bin/x"
    assert normalize("./") == ""
    assert normalize(".") == ""
    assert normalize("usr/bin/") == "usr/bin"
    assert normalize("../evil") == "../evil"
    assert normalize("/abs/../../evil") == "../evil"


# --- Extraction --------------------------------------------------------------------


def check_standard_tree(dest):
    tool = os.path.join(dest, "usr/bin/tool")
    with open(tool, "rb") as f:
        assert f.read() == TOOL
    assert stat.S_IMODE(os.lstat(tool).st_mode) == 0o755
    readme = os.path.join(dest, "usr/share/doc/vmmkit-test/README")
    with open(readme, "rb") as f:
        assert f.read() == README
    assert stat.S_IMODE(os.lstat(readme).st_mode) == 0o644
    alias = os.path.join(dest, "usr/bin/alias")
    assert os.path.islink(alias) and os.readlink(alias) == "tool"
    tool2 = os.path.join(dest, "usr/bin/tool2")
    assert not os.path.islink(tool2)
    assert os.stat(tool2).st_ino == os.stat(tool).st_ino, "tool2 must be a hard link of tool"
    assert os.path.isdir(os.path.join(dest, "etc/empty.d"))


@pytest.mark.parametrize("compression", ["xz", "gz", "bz2", ""])
def test_extract_reproduces_dirs_files_modes_and_links(tmp_path, compression):
    path = make_deb(tmp_path / "t.deb", compression=compression)
    dest = tmp_path / "dest"
    names = extract(path, str(dest))
    check_standard_tree(dest)
    assert set(names) == {
        "usr", "usr/bin", "usr/bin/tool", "usr/bin/alias", "usr/bin/tool2", "usr/share", "usr/share/doc",
        "usr/share/doc/vmmkit-test", "usr/share/doc/vmmkit-test/README", "etc", "etc/empty.d",
    }
    assert set(names) == set(snapshot(dest))


def test_extract_with_gnu_ar_names_and_no_odd_member(tmp_path):
    path = make_deb(tmp_path / "t.deb", gnu=True, odd_member=False)
    extract(path, str(tmp_path / "dest"))
    check_standard_tree(tmp_path / "dest")


def test_open_data_tar_finds_data_after_an_odd_sized_member(tmp_path):
    path = make_deb(tmp_path / "t.deb")
    members = dict(ar_members(open(path, "rb").read()))
    assert len(members["_vmmkit-odd"]) % 2 == 1
    with open_data_tar(path) as tar:
        assert "./usr/bin/tool" in tar.getnames()


def test_extract_want_filter(tmp_path):
    path = make_deb(tmp_path / "t.deb")
    dest = tmp_path / "dest"
    seen = []

    def want(name):
        seen.append(name)
        return name.startswith("usr/bin/") and name != "usr/bin/tool2"

    names = extract(path, str(dest), want=want)
    assert sorted(names) == ["usr/bin/alias", "usr/bin/tool"]
    assert sorted(snapshot(dest)) == ["usr", "usr/bin", "usr/bin/alias", "usr/bin/tool"]
    # The filter sees normalized names, never "./..." and never the root entry.
    assert "usr/share/doc/vmmkit-test/README" in seen
    assert all(not n.startswith(("./", "/")) and n for n in seen)


def test_extract_overwrites_existing_files_and_links(tmp_path):
    """Extracting twice into one directory (builders reuse a stage) works and gives the same tree."""
    path = make_deb(tmp_path / "t.deb")
    dest = tmp_path / "dest"
    extract(path, str(dest))
    first = snapshot(dest)
    extract(path, str(dest))
    assert snapshot(dest) == first
    check_standard_tree(dest)


def test_relative_symlinked_directory_inside_dest_is_followed(tmp_path):
    """A usr-merge style 'lib -> usr/lib' link keeps working for members below it."""
    entries = [dir_("./usr/"), dir_("./usr/lib/"), sym("./lib", "usr/lib"), file_("./lib/libx.so.1", b"ELF")]
    path = make_deb(tmp_path / "t.deb", entries)
    dest = tmp_path / "dest"
    extract(path, str(dest))
    with open(dest / "usr/lib/libx.so.1", "rb") as f:
        assert f.read() == b"ELF"


# --- Damaged and hostile packages ---------------------------------------------------


def test_truncated_package_raises_deb_error_naming_the_path(tmp_path):
    good = open(make_deb(tmp_path / "good.deb"), "rb").read()
    for cut in (8 + 30, 8 + 60 + 2, len(good) // 2, len(good) - 1):
        bad = tmp_path / f"cut{cut}.deb"
        bad.write_bytes(good[:cut])
        with pytest.raises(DebError, match=re.escape(str(bad))):
            extract(str(bad), str(tmp_path / "dest"))


def test_not_an_ar_file(tmp_path):
    path = tmp_path / "notes.deb"
    path.write_bytes(b"<html>404 Not Found</html>\n")
    with pytest.raises(DebError, match=re.escape(str(path)) + ".*not a Debian package"):
        extract(str(path), str(tmp_path / "dest"))
    with pytest.raises(DebError, match=re.escape(str(path))):
        open_data_tar(str(path))


def test_header_size_running_past_the_end(tmp_path):
    path = tmp_path / "long.deb"
    path.write_bytes(b"!<arch>\n" + ar_header("debian-binary", 999999) + b"2.0\n")
    with pytest.raises(DebError, match=re.escape(str(path)) + ".*runs past the end"):
        extract(str(path), str(tmp_path / "dest"))


def test_bad_header_magic_and_size_field(tmp_path):
    bad_magic = tmp_path / "magic.deb"
    bad_magic.write_bytes(b"!<arch>\n" + ar_header("debian-binary", 4)[:58] + b"XX" + b"2.0\n")
    bad_size = tmp_path / "size.deb"
    bad_size.write_bytes(b"!<arch>\n" + ar_header("debian-binary", 4, size_field=b"four") + b"2.0\n")
    negative = tmp_path / "negative.deb"
    negative.write_bytes(b"!<arch>\n" + ar_header("debian-binary", 4, size_field=b"-4") + b"2.0\n")
    for path in (bad_magic, bad_size, negative):
        with pytest.raises(DebError, match=re.escape(str(path))):
            extract(str(path), str(tmp_path / "dest"))


def test_no_data_member(tmp_path):
    path = tmp_path / "nodata.deb"
    path.write_bytes(make_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", make_tar([], "xz"))]))
    with pytest.raises(DebError, match=re.escape(str(path)) + ".*no data.tar"):
        extract(str(path), str(tmp_path / "dest"))


def test_corrupt_data_member(tmp_path):
    path = tmp_path / "corrupt.deb"
    path.write_bytes(make_ar([("debian-binary", b"2.0\n"), ("data.tar.xz", b"\xfd7zXZ\0 garbage garbage")]))
    with pytest.raises(DebError, match=re.escape(str(path)) + ".*data.tar.xz"):
        extract(str(path), str(tmp_path / "dest"))


def test_zstd_without_the_zstandard_module(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import now raises ImportError
    path = tmp_path / "ubuntu.deb"
    path.write_bytes(make_ar([("debian-binary", b"2.0\n"), ("data.tar.zst", b"(\xb5/\xfd junk")]))
    with pytest.raises(DebError, match=re.escape(str(path)) + ".*zstandard"):
        extract(str(path), str(tmp_path / "dest"))


@pytest.mark.parametrize("evil", ["../evil", "/abs/../../evil", "./usr/../../evil", "../../../evil"])
def test_member_escaping_dest_is_refused(tmp_path, evil):
    entries = [dir_("./usr/"), file_("./usr/ok", b"ok"), file_(evil, b"pwned")]
    path = make_deb(tmp_path / "evil.deb", entries)
    box = tmp_path / "box" / "inner"
    dest = box / "dest"
    dest.mkdir(parents=True)
    before = tree_outside(tmp_path, dest)
    with contextlib.suppress(DebError):
        extract(path, str(dest))
    assert tree_outside(tmp_path, dest) == before, "extract wrote outside its destination"
    # And it is a refusal, not a silent skip.
    with pytest.raises(DebError, match="escapes"):
        extract(path, str(dest))


def test_file_below_a_symlink_pointing_outside_is_not_written_outside(tmp_path):
    """'link -> /elsewhere' followed by 'link/evil' must not create /elsewhere/evil."""
    outside = tmp_path / "outside"
    outside.mkdir()
    entries = [sym("./link", str(outside)), file_("./link/evil", b"pwned"),
               sym("./rel", "../outside"), file_("./rel/evil2", b"pwned")]
    path = make_deb(tmp_path / "evil.deb", entries)
    dest = tmp_path / "dest"
    with pytest.raises(DebError, match=re.escape(path)):
        extract(path, str(dest))
    assert os.listdir(outside) == []


def test_file_over_a_symlink_does_not_write_through_it(tmp_path):
    """A regular file member replacing a symlink to a host file must not overwrite the host file."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"precious")
    entries = [sym("./x", str(victim)), file_("./x", b"pwned", 0o755)]
    path = make_deb(tmp_path / "evil.deb", entries)
    dest = tmp_path / "dest"
    try:
        extract(path, str(dest))
    except DebError:
        pass
    else:  # accepted: the later member replaces the link
        assert not os.path.islink(dest / "x")
        assert (dest / "x").read_bytes() == b"pwned"
    assert victim.read_bytes() == b"precious"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


def test_hard_link_to_a_file_outside_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"precious")
    dest = tmp_path / "dest"
    rel_target = os.path.relpath(victim, dest)  # ../outside/victim
    entries = [hardlink("./h", rel_target), file_("./h", b"pwned")]
    path = make_deb(tmp_path / "evil.deb", entries)
    with pytest.raises(DebError, match=re.escape(path)):
        extract(path, str(dest))
    assert victim.read_bytes() == b"precious"
    assert victim.stat().st_nlink == 1


# --- Cross-check with dpkg-deb ------------------------------------------------------


def dpkg_deb() -> str:
    exe = shutil.which("dpkg-deb")
    if exe is None:
        pytest.fail("dpkg-deb is not installed: the cross-check needs it (apt-get install dpkg)")
    return exe


@pytest.mark.parametrize("compression", ["xz", "gzip", "none"])
def test_matches_dpkg_deb(tmp_path, compression):
    """A package built by dpkg-deb --build extracts to the same tree as dpkg-deb -x gives."""
    exe = dpkg_deb()
    tree = tmp_path / "tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_bytes(CONTROL)
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/tool").write_bytes(TOOL)
    os.chmod(tree / "usr/bin/tool", 0o755)
    os.symlink("tool", tree / "usr/bin/alias")
    os.link(tree / "usr/bin/tool", tree / "usr/bin/tool2")
    (tree / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (tree / "usr/lib/x86_64-linux-gnu/libodd.so.1").write_bytes(bytes(range(251)) * 3)
    os.symlink("libodd.so.1", tree / "usr/lib/x86_64-linux-gnu/libodd.so")
    os.symlink("/usr/bin/tool", tree / "usr/bin/abs-alias")
    (tree / "etc/empty.d").mkdir(parents=True)
    (tree / "etc/conf").write_bytes(b"key=value\n")
    os.chmod(tree / "etc/conf", 0o600)
    for d in ("usr", "usr/bin", "usr/lib", "usr/lib/x86_64-linux-gnu", "etc", "etc/empty.d", "DEBIAN"):
        os.chmod(tree / d, 0o755)

    out = tmp_path / "built.deb"
    built = subprocess.run([exe, "--root-owner-group", f"-Z{compression}", "--build", str(tree), str(out)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    ref = tmp_path / "ref"
    unpacked = subprocess.run([exe, "-x", str(out), str(ref)], capture_output=True, text=True)
    assert unpacked.returncode == 0, unpacked.stderr

    mine = tmp_path / "mine"
    names = extract(str(out), str(mine))
    expected = snapshot(ref)
    assert "usr/bin/tool" in expected and expected["usr/bin/alias"] == ("link", "tool")  # dpkg did its part
    assert snapshot(mine) == expected
    assert hardlink_groups(mine) == hardlink_groups(ref) == {frozenset({"usr/bin/tool", "usr/bin/tool2"})}
    assert set(names) == set(expected)
