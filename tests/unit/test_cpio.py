"""Host-only tests for vmmkit.guest.cpio, the newc writer the initramfs builder uses.

Besides the module's own reader, archives are parsed field by field here and
unpacked by a real cpio (busybox or GNU) to check the bytes are what the
kernel's initramfs unpacker expects.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess

import pytest

from vmmkit.guest.cpio import CpioWriter, read_cpio

FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
          "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check")


def parse_newc(data: bytes) -> list[dict]:
    """An independent newc parser: every header field, the name, the data and where things start."""
    entries = []
    pos = 0
    while True:
        assert pos % 4 == 0, f"header at unaligned offset {pos}"
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}: {data[pos:pos + 6]!r}"
        raw = data[pos + 6:pos + 110]
        assert len(raw) == 104 and all(c in b"0123456789ABCDEF" for c in raw), raw
        fields = {k: int(raw[8 * i:8 * i + 8], 16) for i, k in enumerate(FIELDS)}
        name_start = pos + 110
        name_raw = data[name_start:name_start + fields["namesize"]]
        assert name_raw.endswith(b"\0") and b"\0" not in name_raw[:-1]
        data_start = name_start + fields["namesize"]
        pad = (4 - data_start % 4) % 4
        assert data[data_start:data_start + pad] == b"\0" * pad, "name padding must be NULs"
        data_start += pad
        body = data[data_start:data_start + fields["filesize"]]
        end = data_start + fields["filesize"]
        pad = (4 - end % 4) % 4
        assert data[end:end + pad] == b"\0" * pad, "data padding must be NULs"
        entry = dict(fields, name=name_raw[:-1].decode(), data=body, header_at=pos, data_at=data_start)
        entries.append(entry)
        pos = end + pad
        if entry["name"] == "TRAILER!!!":
            assert pos == len(data), "bytes after the trailer"
            return entries


def build(populate, **kw) -> bytes:
    buf = io.BytesIO()
    w = CpioWriter(buf, **kw)
    populate(w)
    w.finish()
    return buf.getvalue()


def sample(w: CpioWriter) -> None:
    w.add_dirs("usr/bin")
    w.add_file("usr/bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    w.add_dirs("etc")
    w.add_file("etc/secret", b"s3cr3t", 0o600)
    w.add_file("etc/empty", b"")
    w.add_symlink("bin", "usr/bin")
    w.add_symlink("usr/bin/sh", "/bin/busybox")
    w.add_dirs("dev")
    w.add_chardev("dev/console", 5, 1)
    w.add_chardev("dev/null", 1, 3, 0o666)


def test_roundtrip_through_read_cpio():
    archive = read_cpio(build(sample))
    assert archive == {
        "usr": (stat.S_IFDIR | 0o755, b""),
        "usr/bin": (stat.S_IFDIR | 0o755, b""),
        "usr/bin/tool": (stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
        "etc": (stat.S_IFDIR | 0o755, b""),
        "etc/secret": (stat.S_IFREG | 0o600, b"s3cr3t"),
        "etc/empty": (stat.S_IFREG | 0o644, b""),
        "bin": (stat.S_IFLNK | 0o777, b"usr/bin"),
        "usr/bin/sh": (stat.S_IFLNK | 0o777, b"/bin/busybox"),
        "dev": (stat.S_IFDIR | 0o755, b""),
        "dev/console": (stat.S_IFCHR | 0o600, b""),
        "dev/null": (stat.S_IFCHR | 0o666, b""),
    }


def test_header_fields():
    entries = parse_newc(build(sample, mtime=1234567890))
    by_name = {e["name"]: e for e in entries}
    assert [e["name"] for e in entries][-1] == "TRAILER!!!"
    inos = [e["ino"] for e in entries]
    assert len(set(inos)) == len(inos), "every entry needs its own inode number"
    for e in entries:
        assert (e["uid"], e["gid"], e["check"], e["devmajor"], e["devminor"]) == (0, 0, 0, 0, 0)
        assert e["namesize"] == len(e["name"].encode()) + 1
        assert e["filesize"] == len(e["data"])
    for e in entries[:-1]:
        assert e["mtime"] == 1234567890
    console = by_name["dev/console"]
    assert (console["rdevmajor"], console["rdevminor"], console["filesize"]) == (5, 1, 0)
    null = by_name["dev/null"]
    assert (null["rdevmajor"], null["rdevminor"], null["mode"]) == (1, 3, stat.S_IFCHR | 0o666)
    assert by_name["usr/bin"]["nlink"] == 2
    assert by_name["usr/bin/tool"]["nlink"] == 1
    assert by_name["bin"]["data"] == b"usr/bin" and by_name["bin"]["filesize"] == 7
    assert by_name["usr/bin/tool"]["rdevmajor"] == 0


@pytest.mark.parametrize("name_len", range(1, 9))
@pytest.mark.parametrize("data_len", range(0, 6))
def test_alignment(name_len, data_len):
    """Name and data start on 4-byte boundaries whatever their lengths; the next header too."""
    name = "n" * name_len
    payload = bytes(range(1, data_len + 1))
    blob = build(lambda w: (w.add_file(name, payload), w.add_file("x" * (9 - name_len), b"after")))
    entries = parse_newc(blob)  # checks magic, padding bytes and header offsets
    first, second = entries[0], entries[1]
    assert first["name"] == name and first["data"] == payload
    assert first["data_at"] % 4 == 0 and first["data_at"] == ((110 + name_len + 1 + 3) // 4) * 4
    assert second["header_at"] == first["data_at"] + ((data_len + 3) // 4) * 4
    assert second["data"] == b"after"
    assert len(blob) % 4 == 0
    assert read_cpio(blob)[name] == (stat.S_IFREG | 0o644, payload)


def test_leading_slash_is_dropped():
    archive = read_cpio(build(lambda w: (w.add_dir("/etc"), w.add_file("/etc/hostname", b"vm\n"))))
    assert set(archive) == {"etc", "etc/hostname"}


def test_duplicate_names_are_refused():
    w = CpioWriter(io.BytesIO())
    w.add_file("etc/passwd", b"a")
    with pytest.raises(ValueError, match="etc/passwd"):
        w.add_file("etc/passwd", b"b")
    with pytest.raises(ValueError, match="duplicate"):
        w.add_file("/etc/passwd", b"b")
    with pytest.raises(ValueError, match="duplicate"):
        w.add_symlink("etc/passwd", "x")
    with pytest.raises(ValueError, match="duplicate"):
        w.add_dir("etc/passwd")
    w.add_dir("dev")
    with pytest.raises(ValueError, match="duplicate"):
        w.add_chardev("dev", 5, 1)


def test_empty_name_is_refused():
    w = CpioWriter(io.BytesIO())
    with pytest.raises(ValueError):
        w.add_file("/", b"")


def test_add_dirs_creates_each_parent_once():
    blob = build(lambda w: (w.add_dirs("a/b/c"), w.add_dirs("a/b/d"), w.add_dirs("/a/b/c/"),
                            w.add_dirs("a"), w.add_dirs("/"), w.add_dirs(""), w.add_dirs("x/y", 0o700)))
    entries = parse_newc(blob)
    names = [e["name"] for e in entries[:-1]]
    assert names == ["a", "a/b", "a/b/c", "a/b/d", "x", "x/y"]
    modes = {e["name"]: e["mode"] for e in entries}
    assert modes["x/y"] == modes["x"] == stat.S_IFDIR | 0o700
    assert modes["a/b"] == stat.S_IFDIR | 0o755


def test_add_dirs_after_add_dir_does_not_duplicate():
    w = CpioWriter(io.BytesIO())
    w.add_dir("usr")
    w.add_dirs("usr/lib")
    assert "usr" in w and "usr/lib" in w and "/usr/lib" in w and "usr/bin" not in w


def test_add_path(tmp_path):
    (tmp_path / "prog").write_bytes(b"\x7fELF...")
    os.chmod(tmp_path / "prog", 0o750)
    os.symlink("prog", tmp_path / "link")
    (tmp_path / "d").mkdir()
    os.chmod(tmp_path / "d", 0o711)

    def populate(w):
        w.add_path("bin/prog", str(tmp_path / "prog"))
        w.add_path("bin/link", str(tmp_path / "link"))
        w.add_path("srv/d", str(tmp_path / "d"))
    archive = read_cpio(build(populate))
    assert archive["bin/prog"] == (stat.S_IFREG | 0o750, b"\x7fELF...")
    assert archive["bin/link"] == (stat.S_IFLNK | 0o777, b"prog")
    assert archive["srv/d"] == (stat.S_IFDIR | 0o711, b"")


def test_output_is_deterministic():
    assert build(sample) == build(sample)
    assert build(sample, mtime=5) == build(sample, mtime=5)
    assert build(sample, mtime=5) != build(sample, mtime=6)


def test_empty_archive_is_just_a_trailer():
    blob = build(lambda w: None)
    entries = parse_newc(blob)
    assert [e["name"] for e in entries] == ["TRAILER!!!"]
    assert read_cpio(blob) == {}


def test_read_cpio_rejects_garbage():
    with pytest.raises(ValueError, match="magic"):
        read_cpio(b"070707" + b"0" * 200)


# --- Cross-check with a real cpio --------------------------------------------------


def cpio_extract_command() -> list[str]:
    busybox = shutil.which("busybox")
    if busybox is not None:
        return [busybox, "cpio", "-i", "-d"]
    cpio = shutil.which("cpio")
    if cpio is not None:
        return [cpio, "-idm", "--quiet"]
    pytest.fail("no cpio extractor on this host: install busybox-static (or busybox) or cpio "
                "(apt-get install busybox-static) for the cpio cross-check")


def test_real_cpio_extracts_the_archive(tmp_path):
    """busybox/GNU cpio unpacks our bytes into the tree we described (devices only as root)."""
    command = cpio_extract_command()
    as_root = os.geteuid() == 0

    def populate(w):
        w.add_dirs("usr/bin")
        w.add_file("usr/bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
        w.add_dirs("etc/conf.d")
        w.add_file("etc/conf.d/odd", b"12345", 0o640)
        w.add_file("etc/empty", b"", 0o600)
        for n in range(1, 9):  # every name length modulo 4, and data lengths 0..7
            w.add_file("etc/" + "f" * n, bytes(range(n - 1)), 0o644)
        w.add_symlink("bin", "usr/bin")
        w.add_symlink("usr/bin/sh", "/bin/busybox")
        if as_root:
            w.add_dirs("dev")
            w.add_chardev("dev/console", 5, 1)
            w.add_chardev("dev/null", 1, 3, 0o666)

    blob = build(populate)
    dest = tmp_path / "root"
    dest.mkdir()
    result = subprocess.run(command, input=blob, cwd=dest, capture_output=True, umask=0)
    assert result.returncode == 0, result.stderr.decode(errors="replace")

    def mode(rel):
        return os.lstat(dest / rel).st_mode

    assert (dest / "usr/bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(mode("usr/bin/tool")) == 0o755
    assert (dest / "etc/conf.d/odd").read_bytes() == b"12345"
    assert stat.S_IMODE(mode("etc/conf.d/odd")) == 0o640
    assert (dest / "etc/empty").read_bytes() == b""
    for n in range(1, 9):
        assert (dest / ("etc/" + "f" * n)).read_bytes() == bytes(range(n - 1))
    assert stat.S_ISDIR(mode("usr/bin")) and stat.S_ISDIR(mode("etc/conf.d"))
    assert os.readlink(dest / "bin") == "usr/bin"
    assert os.readlink(dest / "usr/bin/sh") == "/bin/busybox"
    if as_root:
        console = os.lstat(dest / "dev/console")
        assert stat.S_ISCHR(console.st_mode) and stat.S_IMODE(console.st_mode) == 0o600
        assert (os.major(console.st_rdev), os.minor(console.st_rdev)) == (5, 1)
        null = os.lstat(dest / "dev/null")
        assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert not os.path.lexists(dest / "TRAILER!!!")
    expected = {"usr", "usr/bin", "usr/bin/tool", "etc", "etc/conf.d", "etc/conf.d/odd", "etc/empty", "bin",
                "usr/bin/sh"} | {"etc/" + "f" * n for n in range(1, 9)}
    if as_root:
        expected |= {"dev", "dev/console", "dev/null"}
    found = {os.path.relpath(os.path.join(d, n), dest) for d, ds, fs in os.walk(dest) for n in ds + fs}
    assert found == expected
