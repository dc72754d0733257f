"""Host-only tests for vmmkit.guest.rootfs: ext4 images made with mke2fs -d, read back with debugfs."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess

import pytest

from vmmkit.errors import VmmkitError
from vmmkit.guest import build, rootfs
from vmmkit.guest.cpio import CpioWriter

pytestmark = pytest.mark.skipif(
    not (shutil.which("mke2fs", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
         and shutil.which("debugfs", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")),
    reason="needs e2fsprogs (mke2fs, debugfs)")


def debugfs(image, request: str) -> str:
    proc = subprocess.run([rootfs.find_tool("debugfs"), "-R", request, str(image)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    return proc.stdout.decode(errors="replace")


def inode(image, path: str) -> dict:
    """Type, mode, uid, gid and size of *path* in the image, from `debugfs stat`."""
    out = debugfs(image, f"stat {path}")
    m = re.search(r"Type: (.+?)\s+Mode:\s+(\d+)", out)
    assert m, f"no inode for {path}: {out!r}"
    owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", out)
    size = re.search(r"Size: (\d+)", out)
    return {"type": m.group(1), "mode": int(m.group(2), 8), "uid": int(owner.group(1)),
            "gid": int(owner.group(2)), "size": int(size.group(1)), "text": out}


def fsck(image):
    proc = subprocess.run([rootfs.find_tool("e2fsck"), "-fn", str(image)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    (root / "etc").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "etc" / "hostname").write_bytes(b"vmmkit\n")
    (root / "bin" / "hello").write_bytes(b"#!/bin/sh\necho hello\n")
    os.chmod(root / "bin" / "hello", 0o755)
    (root / "etc" / "secret").write_bytes(b"s")
    os.chmod(root / "etc" / "secret", 0o600)
    os.symlink("/bin/hello", root / "bin" / "hi")
    (root / "empty").mkdir()
    os.chmod(root / "empty", 0o711)
    return root


def test_image_holds_files_modes_and_symlinks(tree, tmp_path):
    image = tmp_path / "root.ext4"
    size = rootfs.make_ext4(str(tree), str(image))
    assert os.path.getsize(image) == size
    assert size % 512 == 0 and size % (1 << 20) == 0
    assert size >= 64 << 20
    fsck(image)
    assert debugfs(image, "cat /etc/hostname") == "vmmkit\n"
    assert debugfs(image, "cat /bin/hello") == "#!/bin/sh\necho hello\n"
    hello = inode(image, "/bin/hello")
    assert hello["type"] == "regular" and hello["mode"] == 0o755
    assert inode(image, "/etc/secret")["mode"] == 0o600
    assert inode(image, "/etc/hostname")["mode"] == 0o644
    link = inode(image, "/bin/hi")
    assert link["type"] == "symlink"
    assert 'Fast link dest: "/bin/hello"' in link["text"]
    empty = inode(image, "/empty")
    assert empty["type"] == "directory" and empty["mode"] == 0o711
    listing = debugfs(image, "ls -l /")
    for name in ("etc", "bin", "empty", "lost+found"):
        assert re.search(rf"\s{re.escape(name)}\s*$", listing, re.M), listing
    label = subprocess.run([rootfs.find_tool("dumpe2fs"), "-h", str(image)], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True).stdout
    assert re.search(r"Filesystem volume name:\s+vmmkit-root$", label, re.M)


def test_everything_is_owned_by_root(tree, tmp_path):
    if os.geteuid() == 0:
        # As root, give the tree to someone else: the image must not keep it.
        for top, dirs, files in os.walk(tree):
            for name in dirs + files:
                os.lchown(os.path.join(top, name), 4321, 4322)
    image = tmp_path / "root.ext4"
    rootfs.make_ext4(str(tree), str(image))
    fsck(image)
    for path in ("/", "/etc", "/etc/hostname", "/bin/hello", "/bin/hi", "/empty"):
        node = inode(image, path)
        assert (node["uid"], node["gid"]) == (0, 0), path


def test_device_nodes_and_explicit_size(tree, tmp_path):
    (tree / "dev").mkdir()
    image = tmp_path / "root.ext4"
    size = rootfs.make_ext4(str(tree), str(image), size=(80 << 20) + 1, label="other",
                            devices=[("dev/console", "c", 5, 1, 0o600), ("/dev/null", "c", 1, 3, 0o666)])
    assert size == (80 << 20) + 4096 and os.path.getsize(image) == size
    fsck(image)
    console = inode(image, "/dev/console")
    assert console["type"] == "character special" and console["mode"] == 0o600
    assert "Device major/minor number: 05:01" in console["text"]
    null = inode(image, "/dev/null")
    assert null["mode"] == 0o666 and "Device major/minor number: 01:03" in null["text"]


def test_default_size_grows_with_content(tree, tmp_path):
    small = rootfs.default_size(str(tree))
    (tree / "big").write_bytes(b"\1" * (10 << 20))
    big = rootfs.default_size(str(tree))
    assert small % (1 << 20) == 0 and big % (1 << 20) == 0
    assert big - small >= 15 << 20
    image = tmp_path / "root.ext4"
    rootfs.make_ext4(str(tree), str(image))
    assert inode(image, "/big")["size"] == 10 << 20


def test_too_small_image_is_a_clear_error(tree, tmp_path):
    (tree / "big").write_bytes(os.urandom(4 << 20))
    image = tmp_path / "root.ext4"
    with pytest.raises(rootfs.RootfsError, match="mke2fs"):
        rootfs.make_ext4(str(tree), str(image), size=2 << 20)
    assert not image.exists() and not (tmp_path / "root.ext4.tmp").exists()


def test_missing_mke2fs_names_the_package(tree, tmp_path, monkeypatch):
    empty = tmp_path / "nothing"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(rootfs, "SBIN_DIRS", ())
    with pytest.raises(VmmkitError, match=r"mke2fs.*e2fsprogs") as err:
        rootfs.make_ext4(str(tree), str(tmp_path / "root.ext4"))
    assert isinstance(err.value, rootfs.RootfsError)
    assert not (tmp_path / "root.ext4").exists()


def test_rootfs_from_cpio_skips_excluded_and_adds_devices(tmp_path):
    buf = io.BytesIO()
    w = CpioWriter(buf)
    for d in ("bin", "dev", "etc/vmmkit", "sbin"):
        w.add_dirs(d)
    w.add_chardev("dev/console", 5, 1)
    w.add_file("bin/busybox", b"\x7fELF-ish", 0o755)
    w.add_symlink("sbin/init", "/bin/busybox")
    w.add_file("etc/vmmkit/initramfs", b"marker\n")
    w.add_file("etc/vmmkit/modules", b"a.ko\n")
    w.add_file("init", b"#!/bin/sh\n", 0o755)
    w.finish()
    cpio = tmp_path / "initramfs.cpio"
    cpio.write_bytes(buf.getvalue())
    image = tmp_path / "rootfs.ext4"
    rootfs.rootfs_from_cpio(str(cpio), str(image), exclude=["etc/vmmkit/initramfs"],
                            devices=[("dev/console", "c", 5, 1, 0o600)], work_parent=str(tmp_path))
    fsck(image)
    assert debugfs(image, "cat /etc/vmmkit/modules") == "a.ko\n"
    assert "initramfs" not in debugfs(image, "ls /etc/vmmkit")
    assert inode(image, "/init")["mode"] == 0o755
    assert inode(image, "/bin/busybox")["mode"] == 0o755
    assert 'Fast link dest: "/bin/busybox"' in inode(image, "/sbin/init")["text"]
    assert "Device major/minor number: 05:01" in inode(image, "/dev/console")["text"]
    root = inode(image, "/")
    assert root["mode"] == 0o755 and root["uid"] == 0
    assert [p for p in os.listdir(tmp_path) if p.startswith(".rootfs-")] == []


def test_unpack_cpio_refuses_paths_outside_the_tree(tmp_path):
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.add_file("../escape", b"x")
    w.finish()
    with pytest.raises(rootfs.RootfsError, match="outside"):
        rootfs.unpack_cpio(buf.getvalue(), str(tmp_path / "t"))
    assert not (tmp_path / "escape").exists()


def test_init_script_is_valid_sh_and_handles_root(tmp_path):
    script = tmp_path / "init"
    script.write_bytes(build.init_script())
    text = script.read_text()
    assert not re.search(r"@[A-Z_]+@", text), "unsubstituted placeholder"
    for sh in ("/bin/sh", shutil.which("busybox") and f"{shutil.which('busybox')} sh"):
        if sh:
            proc = subprocess.run(sh.split() + ["-n", str(script)], stderr=subprocess.PIPE, text=True)
            assert proc.returncode == 0, (sh, proc.stderr)
    assert f"[ -e /{build.INITRAMFS_MARKER} ]" in text
    assert "root=*)" in text and "switch_root /newroot /init" in text
    assert "did not appear" in text and "poweroff -f" in text
    assert 'mount -t ext4 -o "$rootmode"' in text
    # The handover comes after the modules are loaded and before the command runs.
    assert text.index("insmod") < text.index("switch_root") < text.index(f"{build.EXEC_PARAM}=*)")
