"""A writer for the ``newc`` cpio format, the one the Linux kernel unpacks as an initramfs.

Each entry is a 110-byte ASCII header (magic ``070701`` and thirteen 8-digit hex
fields), the NUL-terminated name padded to 4 bytes, then the data padded to 4
bytes. The archive ends with an entry named ``TRAILER!!!``.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


class CpioWriter:
    """Write a newc archive to a binary file object.

    Names are stored without a leading slash, as the kernel expects. Every
    entry gets a fresh inode number; uid/gid are 0 and mtime is fixed, so the
    same inputs give the same bytes (reproducible guest builds).
    """

    def __init__(self, out: BinaryIO, *, mtime: int = 0):
        self._out = out
        self._ino = 1
        self._mtime = mtime
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        name = name.lstrip("/")
        if not name:
            raise ValueError("cpio entry needs a name")
        if name in self._names:
            raise ValueError(f"duplicate cpio entry {name!r}")
        self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, nlink, self._mtime, len(data),
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        )
        self._ino += 1
        header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out.write(header)
        self._out.write(encoded)
        self._out.write(b"\0" * _pad4(len(header) + len(encoded)))
        self._out.write(data)
        self._out.write(b"\0" * _pad4(len(data)))

    def __contains__(self, name: str) -> bool:
        return name.lstrip("/") in self._names

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        """Add a directory; parents are not added implicitly."""
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def add_dirs(self, name: str, mode: int = 0o755) -> None:
        """Add a directory and any missing parents (like ``mkdir -p``)."""
        if not name.strip("/"):
            return
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in self:
                self.add_dir(sub, mode)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file with the given contents and permission bits."""
        self._entry(name, stat.S_IFREG | (mode & 0o7777), data)

    def add_symlink(self, name: str, target: str) -> None:
        """Add a symbolic link pointing at *target*."""
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node (e.g. ``dev/console`` 5:1)."""
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def add_path(self, name: str, path: str) -> None:
        """Add the host file or symlink at *path* under *name*, keeping its mode."""
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            self.add_symlink(name, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            self.add_dirs(name, stat.S_IMODE(st.st_mode))
        else:
            with open(path, "rb") as f:
                self.add_file(name, f.read(), stat.S_IMODE(st.st_mode))

    def finish(self) -> None:
        """Write the trailer; the writer must not be used afterwards."""
        self._entry(TRAILER, 0, nlink=1)


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a newc archive into ``{name: (mode, data)}``: for tests and `guest show`."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        if data[pos:pos + 6] != NEWC_MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize + _pad4(110 + namesize)
        if name == TRAILER:
            return out
        out[name] = (mode, data[data_start:data_start + filesize])
        pos = data_start + filesize + _pad4(filesize)
