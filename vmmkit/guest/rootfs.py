"""ext4 root filesystem images, made without root or a loop device.

``mke2fs -d TREE`` (e2fsprogs) copies a directory tree into a new ext4 image
file. The default guest's ``rootfs.ext4`` is made this way from its
initramfs: the cpio is unpacked into a temporary staging tree, then the tree
becomes the image. Device nodes are not unpacked (that would need root);
they are added to the image afterwards with ``debugfs -w``, which also makes
every inode owned by root whatever user ran the build.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile

from ..errors import VmmkitError
from .cpio import read_cpio

MiB = 1 << 20
DEFAULT_LABEL = "vmmkit-root"
# mke2fs and debugfs live in /usr/sbin, which is not on an ordinary user's PATH on Debian.
SBIN_DIRS = ("/usr/sbin", "/sbin")


class RootfsError(VmmkitError):
    """An ext4 image could not be made (e2fsprogs missing, mke2fs or debugfs failed)."""


def find_tool(name: str) -> str:
    """Full path of an e2fsprogs program, looked up on PATH then in the sbin directories."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN_DIRS])
    found = shutil.which(name, path=search)
    if not found:
        raise RootfsError(f"{name} not found: it is in the Debian package e2fsprogs "
                          f"(apt-get install e2fsprogs)")
    return found


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def content_size(tree_dir: str) -> int:
    """Bytes the tree needs: every file, directory and symlink rounded up to 4 KiB."""
    total = 4096
    for top, dirs, files in os.walk(tree_dir):
        for name in dirs + files:
            total += _round_up(max(os.lstat(os.path.join(top, name)).st_size, 1), 4096)
    return total


def default_size(tree_dir: str) -> int:
    """Image size for *tree_dir*: content * 1.5 + 64 MiB, rounded up to a MiB."""
    return _round_up(content_size(tree_dir) * 3 // 2 + 64 * MiB, MiB)


def _quote(path: str) -> str:
    """A path as one debugfs argument (its parser takes "..." with "" for a quote)."""
    if "\n" in path or "\0" in path:
        raise RootfsError(f"cannot put {path!r} in an ext4 image: newline in the name")
    return '"' + path.replace('"', '""') + '"'


def _not_root_owned(tree_dir: str) -> list[str]:
    """Image paths of the entries below *tree_dir* whose uid or gid is not 0."""
    out = []
    for top, dirs, files in os.walk(tree_dir):
        for name in dirs + files:
            full = os.path.join(top, name)
            st = os.lstat(full)
            if st.st_uid or st.st_gid:
                out.append("/" + os.path.relpath(full, tree_dir))
    return out


def _debugfs_commands(tree_dir: str, devices) -> list[str]:
    cmds = []
    # `-E root_owner=0:0` only sets the owner of the root directory: for every
    # other inode, mke2fs -d copies st_uid/st_gid of the source file (checked
    # with e2fsprogs 1.47). A tree staged by a non-root user is thus fixed up here.
    for path in _not_root_owned(tree_dir):
        cmds += [f"sif {_quote(path)} uid 0", f"sif {_quote(path)} gid 0"]
    for name, kind, major, minor, mode in devices:
        if kind not in ("c", "b"):
            raise RootfsError(f"device node {name}: kind must be 'c' or 'b', not {kind!r}")
        parent, base = os.path.split("/" + name.strip("/"))
        fmt = stat.S_IFCHR if kind == "c" else stat.S_IFBLK
        # debugfs's mknod takes a name in the current directory and makes the
        # node with no permission bits: cd first, set the mode after.
        cmds += [f"cd {_quote(parent)}", f"mknod {_quote(base)} {kind} {major} {minor}",
                 f"sif {_quote(base)} mode 0{fmt | stat.S_IMODE(mode):o}", "cd /"]
    return cmds


def _run(argv: list[str], what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise RootfsError(f"{what} failed (exit {proc.returncode}): {detail}")
    return proc


def make_ext4(tree_dir: str, out_path: str, *, size: int | None = None, label: str = DEFAULT_LABEL,
              devices=()) -> int:
    """Make *out_path* an ext4 image holding the contents of *tree_dir*; return its size in bytes.

    The image is a raw file (a multiple of 512 bytes, ready to be a virtio-blk
    disk) of *size* bytes, rounded up to 4 KiB; by default content * 1.5 +
    64 MiB, rounded up to a MiB. Every inode is owned by root. *devices* are
    extra device nodes, ``(path, "c" or "b", major, minor, mode)``. The image
    replaces *out_path* atomically. No root or loop device is needed.
    """
    if not os.path.isdir(tree_dir):
        raise RootfsError(f"{tree_dir}: not a directory")
    if len(label.encode()) > 16:
        raise RootfsError(f"ext4 label {label!r} is longer than 16 bytes")
    mke2fs = find_tool("mke2fs")
    size = default_size(tree_dir) if size is None else _round_up(size, 4096)
    if size <= 0:
        raise RootfsError(f"bad image size {size}")
    cmds = _debugfs_commands(tree_dir, devices)
    debugfs = find_tool("debugfs") if cmds else None
    tmp = out_path + ".tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)  # mke2fs would reuse a leftover file, with its old length
    try:
        _run([mke2fs, "-t", "ext4", "-d", tree_dir, "-L", label, "-E", "root_owner=0:0", "-F", "-q",
              tmp, f"{size // 1024}k"], f"mke2fs of {tree_dir}")
        if os.path.getsize(tmp) < size:
            os.truncate(tmp, size)
        if cmds:
            script = tmp + ".debugfs"
            with open(script, "w") as f:
                f.write("\n".join(cmds) + "\n")
            try:
                proc = _run([debugfs, "-w", "-f", script, tmp], f"debugfs on {out_path}")
            finally:
                os.unlink(script)
            # debugfs exits 0 whatever its commands do; they report on stderr
            # (after its version banner).
            errors = [line for line in proc.stderr.splitlines()
                      if line.strip() and not line.startswith("debugfs ")]
            if errors:
                raise RootfsError(f"debugfs on {out_path}: {'; '.join(errors)}")
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return size


def unpack_cpio(data: bytes, dest: str, *, exclude=()) -> list[str]:
    """Write the files, directories and symlinks of newc archive *data* below *dest*, with their modes.

    Entries named in *exclude* are left out. Device nodes (and other special
    files) are not written; their names are returned.
    """
    skipped = []
    dir_modes = []
    excluded = {name.strip("/") for name in exclude}
    for name, (mode, body) in read_cpio(data).items():
        rel = os.path.normpath(name.strip("/"))
        if rel in excluded or rel == ".":
            continue
        if rel == ".." or rel.startswith("../"):
            raise RootfsError(f"cpio entry {name!r} is outside the archive's root")
        path = os.path.join(dest, rel)
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFDIR:
            os.makedirs(path, exist_ok=True)
            dir_modes.append((path, stat.S_IMODE(mode)))
            continue
        if kind not in (stat.S_IFREG, stat.S_IFLNK):
            skipped.append(rel)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if kind == stat.S_IFLNK:
            os.symlink(body.decode(), path)
        else:
            with open(path, "wb") as f:
                f.write(body)
            os.chmod(path, stat.S_IMODE(mode))
    # Directory modes last: a read-only directory must still take its files.
    for path, perm in reversed(dir_modes):
        os.chmod(path, perm)
    return skipped


def rootfs_from_cpio(cpio_path: str, out_path: str, *, exclude=(), devices=(), label: str = DEFAULT_LABEL,
                     size: int | None = None, work_parent: str | None = None) -> int:
    """Make ext4 image *out_path* with the contents of the cpio archive *cpio_path*; return its size.

    The archive is unpacked into a temporary staging tree (under
    *work_parent*), less the names in *exclude*. Its device nodes are dropped;
    those the root filesystem needs are given as *devices* (see `make_ext4`).
    """
    with open(cpio_path, "rb") as f:
        data = f.read()
    with tempfile.TemporaryDirectory(prefix=".rootfs-", dir=work_parent) as work:
        tree = os.path.join(work, "root")
        os.mkdir(tree)
        os.chmod(tree, 0o755)  # mke2fs gives the image's / the tree's mode
        unpack_cpio(data, tree, exclude=exclude)
        return make_ext4(tree, out_path, size=size, label=label, devices=devices)
