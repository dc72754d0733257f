"""A raw disk image on the host: opening it with clear errors, and the I/O a block device needs."""

from __future__ import annotations

import errno
import mmap
import os
import stat

from vmmkit._native import lib
from vmmkit.errors import VmmkitError

SECTOR = 512


class DiskError(VmmkitError):
    """A disk image cannot be used as configured."""


class Disk:
    """An open raw image: positional vectored I/O, flush, discard and zeroing.

    ``cache = "none"`` opens with O_DIRECT (the host page cache is bypassed);
    a guest buffer O_DIRECT cannot take as it is goes through an aligned
    bounce buffer instead of failing.
    """

    def __init__(self, path: str, *, read_only: bool = False, cache: str = "writeback"):
        self.path = path
        self.read_only = read_only
        self.direct = cache == "none"
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if self.direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError:
            raise DiskError(f"{path}: disk image not found") from None
        except IsADirectoryError:
            raise DiskError(f"{path}: is a directory, not a disk image") from None
        except PermissionError:
            how = "read" if read_only else "read and write (set read_only = true for a read-only disk)"
            raise DiskError(f"{path}: no permission to {how}") from None
        except OSError as exc:
            if exc.errno == errno.EINVAL and self.direct:
                raise DiskError(f"{path}: cache = \"none\" needs O_DIRECT, which this file system does not "
                                "support; use cache = \"writeback\"") from None
            if exc.errno == errno.EROFS:
                raise DiskError(f"{path}: on a read-only file system; set read_only = true") from None
            raise DiskError(f"{path}: cannot open: {exc.strerror}") from None
        try:
            st = os.fstat(self.fd)
            if stat.S_ISBLK(st.st_mode):
                self.size = os.lseek(self.fd, 0, os.SEEK_END)
            elif stat.S_ISREG(st.st_mode):
                self.size = st.st_size
            else:
                raise DiskError(f"{path}: not a regular file or block device")
            if self.size % SECTOR:
                raise DiskError(f"{path}: size {self.size} is not a multiple of {SECTOR} bytes "
                                f"(a raw image is whole sectors; truncate -s to round it up)")
        except BaseException:
            os.close(self.fd)
            raise
        self._bounce = None

    @property
    def sectors(self) -> int:
        """Capacity in 512-byte sectors."""
        return self.size // SECTOR

    def readv(self, views: list, offset: int) -> int:
        """Fill *views* from the image at *offset*; return bytes read (short only at the end of the file)."""
        return self._rw(views, offset, write=False)

    def writev(self, views: list, offset: int) -> int:
        """Write *views* to the image at *offset*; return bytes written."""
        return self._rw(views, offset, write=True)

    def _rw(self, views: list, offset: int, write: bool) -> int:
        total = sum(len(v) for v in views)
        done = 0
        while done < total:
            pending = _skip(views, done)
            try:
                n = (os.pwritev if write else os.preadv)(self.fd, pending, offset + done)
            except OSError as exc:
                if exc.errno == errno.EINVAL and self.direct:
                    return done + self._bounced(pending, offset + done, write)
                raise
            if n == 0:
                break
            done += n
        return done

    def _bounced(self, views: list, offset: int, write: bool) -> int:
        """O_DIRECT refused the buffers' alignment: copy through a page-aligned buffer."""
        total = sum(len(v) for v in views)
        if self._bounce is None or len(self._bounce) < total:
            self._bounce = mmap.mmap(-1, (total + 4095) & ~4095)
        buf = memoryview(self._bounce)[:total]
        if write:
            pos = 0
            for v in views:
                buf[pos:pos + len(v)] = v
                pos += len(v)
            return os.pwritev(self.fd, [buf], offset)
        n = os.preadv(self.fd, [buf], offset)
        pos = 0
        for v in views:
            take = max(0, min(len(v), n - pos))
            v[:take] = buf[pos:pos + take]
            pos += len(v)
        return n

    def flush(self) -> None:
        """Make everything written so far durable."""
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Give the range's storage back to the host (reads then return zeros)."""
        self._fallocate(lib.FALLOC_FL_PUNCH_HOLE | lib.FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make the range read as zeros, freeing its storage if *unmap* allows."""
        if unmap:
            try:
                self.discard(offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        try:
            self._fallocate(lib.FALLOC_FL_ZERO_RANGE | lib.FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        # The file system can do neither: write the zeros.
        chunk = bytes(min(length, 1 << 20)) if not self.direct else None
        if chunk is None:
            zero = mmap.mmap(-1, 1 << 20)
            chunk = memoryview(zero)
        pos = 0
        while pos < length:
            n = min(len(chunk), length - pos)
            self.writev([chunk[:n]], offset + pos)
            pos += n

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        if length == 0:
            return  # fallocate refuses len 0 (EINVAL); an empty range has nothing to do
        rc = lib.vmm_fallocate(self.fd, mode, offset, length)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))

    def close(self) -> None:
        """Close the image (once)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _skip(views: list, count: int) -> list:
    """*views* without their first *count* bytes."""
    if not count:
        return views
    out = []
    for v in views:
        if count >= len(v):
            count -= len(v)
            continue
        out.append(v[count:])
        count = 0
    return out
