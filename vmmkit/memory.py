"""Guest physical memory: host mappings, bounds-checked access, dirty tracking.

Guest RAM is a handful of host ``mmap`` regions, one per KVM memory slot,
laid out by :func:`vmmkit.boot.layout.ram_regions` around the 32-bit MMIO
hole. Everything in vmmkit that touches guest memory goes through
:class:`GuestMemory`, because every guest physical address (GPA) and length
that arrives from the guest (descriptor tables, buffer addresses, ...) is
hostile input (design contract 5):

* a range is only accepted if it lies entirely inside *one* region; it may
  not straddle two regions, touch the MMIO hole, or run past RAM;
* arithmetic is overflow-safe: Python integers do not wrap, so instead of
  relying on wrapping we reject anything that is negative, that is not an
  integer, or whose end passes 2**64 (a 64-bit ``gpa + len`` that would
  wrap in C is refused here rather than silently landing at a low address);
* Python's own ``mmap`` slicing is bounds-checked too, so even a bug in the
  checks above cannot reach host memory outside the mapping.

Dirty tracking (design contract 4): KVM logs the pages *the guest* writes
(``KVM_MEM_LOG_DIRTY_PAGES`` + ``KVM_GET_DIRTY_LOG``) but cannot see the
writes the VMM makes through its own mapping (virtio used rings, block
reads, network receive buffers). While logging is on, every write through
:meth:`GuestMemory.write` and friends sets bits in a VMM-side bitmap per
region, and :meth:`GuestMemory.kvm_dirty_log` ORs KVM's bitmap with it so a
migration sees both. Writes through a :meth:`GuestMemory.view` are *not*
tracked automatically: the writer must call :meth:`GuestMemory.mark_dirty`.

The bitmap layout matches KVM's: bit ``i`` of the little-endian bitmap is
page ``i`` of the region (byte ``i // 8``, bit ``i % 8``), and its length is
rounded up to a whole number of 64-bit words, so the two can be ORed byte
for byte.

The bitmaps are shared with C: device data paths in ``native/`` set bits with
the GIL released, while Python marks and takes them. So nobody does a plain
read-modify-write on them: bits are set with atomic ORs
(``vmm_bitmap_set_range``) and taken with atomic exchanges
(``vmm_bitmap_take``), and a bit set concurrently with a take is either in the
taken copy or still in the bitmap, never lost. The logging flag is shared too
(``GuestMemory.log_flag``, a C ``uint32_t``), so C sees dirty logging start
and stop while it runs.
"""

from __future__ import annotations

import bisect
import errno
import logging
import mmap
import os
import stat
import struct
import threading
from typing import Any, Dict, List, Optional, Tuple, Union

from vmmkit._native import ffi as _ffi, lib as _lib
from vmmkit.boot import layout
from vmmkit.errors import VmmkitError

log = logging.getLogger(__name__)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
#: ``KVM_MEM_LOG_DIRTY_PAGES``: the memory slot flag that turns on KVM's log.
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0

#: Every GPA and every ``gpa + length`` must stay within a 64-bit address.
ADDR_LIMIT = 1 << 64

#: ``MAP_NORESERVE`` is not exported by the ``mmap`` module before 3.13 or so;
#: 0x4000 is its value on x86-64 and arm64 Linux.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)

#: Anonymous guest RAM starts at a host address aligned to this (2 MiB), as
#: its guest addresses are: only then can the host back it with transparent
#: huge pages that KVM maps whole into the guest's nested page tables. A
#: misaligned mapping costs a nested page fault per 4 KiB page touched (tens
#: of thousands in one boot of the default guest, against a few hundred).
HUGE_ALIGN = 2 * layout.MiB

#: Default alignment of the memory hotplug range (virtio-mem block size).
HOTPLUG_ALIGN = 128 * layout.MiB

#: Region kinds.
KIND_RAM = "ram"
KIND_HOTPLUG = "hotplug"

PathLike = Union[str, "os.PathLike[str]"]

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemoryError(VmmkitError):
    """A guest memory access outside guest RAM (bad GPA, length, or range).

    Raised for every access that is not entirely inside one RAM region; the
    message names the GPA and the length. Device models treat it as a guest
    error (e.g. fail the request, or mark the device as needing reset).
    """


class HostMemoryError(VmmkitError):
    """The host cannot provide (or map) the requested guest memory."""


# --- Helpers ---------------------------------------------------------------------


def _fmt_size(n: int) -> str:
    """Human-readable size for error messages: '64 GiB', '512 MiB', '12345 bytes'."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"


def host_meminfo(path: str = "/proc/meminfo") -> Dict[str, int]:
    """Return ``/proc/meminfo`` as a dict of byte counts (``{"MemTotal": ...}``).

    Returns an empty dict when the file cannot be read (non-Linux, sandbox):
    the caller then skips its pre-check and lets ``mmap`` decide.
    """
    info: Dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if not fields:
                    continue
                try:
                    value = int(fields[0])
                except ValueError:
                    continue
                if len(fields) > 1 and fields[1] == "kB":
                    value *= 1024
                info[key.strip()] = value
    except OSError:
        return {}
    return info


def _check_host_memory(size: int) -> None:
    """Refuse guest memory sizes the host can never back.

    Anonymous memory is mapped with MAP_NORESERVE, so overcommit works and a
    guest larger than what is free *right now* still starts (most guests
    never touch all their RAM). What we refuse is a size larger than all of
    RAM plus swap: such a guest is guaranteed to be OOM-killed the moment it
    uses its memory, and failing up front with a clear message beats a
    mysterious SIGKILL later.
    """
    info = host_meminfo()
    if "MemTotal" not in info:
        return
    total = info["MemTotal"] + info.get("SwapTotal", 0)
    available = info.get("MemAvailable", info.get("MemFree", 0)) + info.get("SwapFree", 0)
    if size > total:
        raise HostMemoryError(
            f"cannot allocate {_fmt_size(size)} of guest memory: {os.strerror(errno.ENOMEM)}; "
            f"this host has {_fmt_size(available)} available "
            f"({_fmt_size(total)} of RAM and swap in total)")
    if size > available:
        log.warning("guest memory %s exceeds what the host has available now (%s); "
                    "relying on overcommit", _fmt_size(size), _fmt_size(available))


def _host_memory_error(size: int, what: str, exc: OSError) -> HostMemoryError:
    """Build the HostMemoryError for a failed mmap/ftruncate/open."""
    info = host_meminfo()
    available = info.get("MemAvailable", info.get("MemFree", 0)) + info.get("SwapFree", 0)
    msg = f"cannot allocate {_fmt_size(size)} of guest memory{what}: {exc.strerror or exc}"
    if info:
        msg += f"; this host has {_fmt_size(available)} available"
    return HostMemoryError(msg)


def _buffer_address(buf: Any) -> int:
    """Return the host virtual address of a writable buffer (an mmap)."""
    # from_buffer exports the buffer; releasing the cdata right away ends that
    # export again, so the mmap can still be closed later.
    p = _ffi.from_buffer(buf, require_writable=True)
    try:
        return int(_ffi.cast("uintptr_t", p))
    finally:
        _ffi.release(p)


def _bitmap_len(npages: int) -> int:
    """Bytes in a dirty bitmap for ``npages`` pages, rounded to 64-bit words like KVM's."""
    return ((npages + 63) // 64) * 8


def _set_bits(bitmap: Any, first: int, last: int) -> None:
    """Set bits ``first..last`` (inclusive) in a little-endian bitmap, atomically.

    ``bitmap`` is a bytearray or a cffi pointer from ``ffi.from_buffer`` of
    one (regions keep theirs in ``Region.dirty_ptr``). Raises ``ValueError``
    for bits outside it.
    """
    ptr = bitmap if isinstance(bitmap, _ffi.CData) else _ffi.from_buffer("uint8_t[]", bitmap)
    if _lib.vmm_bitmap_set_range(ptr, len(ptr), first, last) < 0:
        raise ValueError(f"dirty bits {first}..{last} are outside a bitmap of {len(ptr)} bytes")


def _take_bits(ptr: Any, length: int, keep: bool = True) -> Optional[bytes]:
    """Atomically move a bitmap's bits out (cleared behind); return them if ``keep``."""
    if not keep:
        _lib.vmm_bitmap_take(ptr, _ffi.NULL, length)
        return None
    out = bytearray(length)
    _lib.vmm_bitmap_take(ptr, _ffi.from_buffer("uint8_t[]", out), length)
    return bytes(out)


def _check_range(gpa: Any, length: Any) -> int:
    """Validate a (gpa, length) pair from anywhere; return the exclusive end.

    ``bool`` is rejected along with other non-integers: ``True`` as a GPA is
    always a bug, never an address.
    """
    for v in (gpa, length):
        if type(v) is not int and (isinstance(v, bool) or not isinstance(v, int)):
            raise GuestMemoryError(f"guest memory access with non-integer GPA {gpa!r} "
                                   f"or length {length!r}")
    if gpa < 0 or length < 0:
        raise GuestMemoryError(f"guest memory access at GPA {gpa:#x} length {length:#x}: "
                               f"negative address or length")
    end = gpa + length
    if end > ADDR_LIMIT:
        raise GuestMemoryError(f"guest memory access at GPA {gpa:#x} length {length:#x} "
                               f"wraps past the end of the 64-bit address space")
    return end


# --- Regions ---------------------------------------------------------------------


class Region:
    """One contiguous piece of guest RAM: a host mapping plus its KVM slot.

    Attributes:
        gpa: guest physical start address (page aligned).
        size: length in bytes (page aligned).
        mm: the ``mmap.mmap`` backing the region (``None`` once closed);
            the region's bytes are ``mm[mm_offset:mm_offset + size]``.
        mm_offset: where the region starts inside ``mm`` (anonymous
            mappings are made a little larger and used from a 2 MiB
            aligned address, see :data:`HUGE_ALIGN`).
        host_addr: host virtual address of the mapping, for
            ``KVM_SET_USER_MEMORY_REGION`` and vhost-user.
        slot: KVM memory slot number.
        kind: ``"ram"`` (boot RAM) or ``"hotplug"`` (added later, e.g. by
            virtio-mem).
        fd: file descriptor behind a shared (memfd) or file-backed mapping,
            ``None`` for private anonymous memory. Owned by the region.
        fd_offset: offset of the region inside ``fd`` (vhost-user needs it).
        shared: whether the mapping is MAP_SHARED (another process mapping
            ``fd`` sees the guest's memory).
        dirty_bitmap: the VMM-side dirty bitmap, one bit per 4 KiB page.

    Build regions with :meth:`Region.create`; :class:`GuestMemory` does this
    for you.
    """

    def __init__(self, gpa: int, size: int, mm: mmap.mmap, *, slot: int, kind: str = KIND_RAM,
                 fd: Optional[int] = None, fd_offset: int = 0, shared: bool = False, mm_offset: int = 0) -> None:
        """Wrap an existing mapping; ownership of ``mm`` and ``fd`` passes to the region."""
        self.gpa = gpa
        self.size = size
        self.end = gpa + size
        self.mm: Optional[mmap.mmap] = mm
        self.mm_offset = mm_offset
        self.host_addr = _buffer_address(mm) + mm_offset
        self.slot = slot
        self.kind = kind
        self.fd = fd
        self.fd_offset = fd_offset
        self.shared = shared
        self.npages = size >> PAGE_SHIFT
        self.dirty_bitmap = bytearray(_bitmap_len(self.npages))
        # The bitmap's address for C (and for the atomic helpers). Holding the
        # export also pins the bytearray: it can never be resized or moved
        # under a device thread that writes bits through this pointer.
        self.dirty_ptr = _ffi.from_buffer("uint8_t[]", self.dirty_bitmap)
        # One long-lived memoryview: slicing it for view() is cheaper than
        # building a new memoryview of the mmap for every request.
        self._mv: Optional[memoryview] = memoryview(mm)[mm_offset:mm_offset + size]

    @classmethod
    def create(cls, gpa: int, size: int, *, slot: int, kind: str = KIND_RAM, shared: bool = False,
               backing: Optional[PathLike] = None, backing_offset: int = 0) -> "Region":
        """Map ``size`` bytes of host memory for the guest range at ``gpa``.

        * default: anonymous MAP_PRIVATE | MAP_NORESERVE memory (zero-filled,
          overcommitted, never shared);
        * ``shared=True``: a memfd mapped MAP_SHARED; ``region.fd`` can be
          handed to another process (vhost-user backend) that maps the same
          pages;
        * ``backing=path``: a file mapped MAP_SHARED at ``backing_offset``.
          An existing directory (e.g. a hugetlbfs mount) gets a fresh,
          already-unlinked file per region; a file path is created if
          missing and grown (never shrunk) to hold the region.

        Raises :class:`HostMemoryError` when the host refuses.
        """
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise GuestMemoryError(f"guest memory region at GPA {gpa:#x} size {size:#x} "
                                   f"is empty or not 4 KiB aligned")
        if gpa + size > ADDR_LIMIT:
            raise GuestMemoryError(f"guest memory region at GPA {gpa:#x} size {size:#x} "
                                   f"wraps past the end of the 64-bit address space")
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if backing is None and not shared:
            # Room to start at a huge-page boundary; the slack is never touched, so it costs
            # address space only (NORESERVE).
            slack = HUGE_ALIGN if size >= HUGE_ALIGN and gpa % HUGE_ALIGN == 0 else 0
            try:
                mm = mmap.mmap(-1, size + slack, flags=mmap.MAP_PRIVATE | MAP_NORESERVE, prot=prot)
            except OSError as exc:
                raise _host_memory_error(size, "", exc) from exc
            except OverflowError as exc:
                raise HostMemoryError(f"cannot allocate {_fmt_size(size)} of guest memory: "
                                      f"too large for this host's address space") from exc
            offset = -_buffer_address(mm) % HUGE_ALIGN if slack else 0
            if slack:
                try:
                    mm.madvise(mmap.MADV_HUGEPAGE, offset, size)
                except (AttributeError, OSError):
                    pass  # no THP on this host: still correct, only slower
            return cls(gpa, size, mm, slot=slot, kind=kind, mm_offset=offset)

        fd = -1
        path = None if backing is None else os.fspath(backing)
        what = " (memfd)" if path is None else f" in {path}"
        try:
            if path is None:
                fd = os.memfd_create(f"vmmkit-guest-{gpa:x}", os.MFD_CLOEXEC)
                offset = 0
            else:
                if os.path.isdir(path):
                    fd = _unlinked_file_in(path)
                    offset = 0
                else:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                    offset = backing_offset
                st = os.fstat(fd)
                if not (stat.S_ISREG(st.st_mode)):
                    raise HostMemoryError(f"guest memory backing {path} is not a regular file")
            needed = offset + size
            if os.fstat(fd).st_size < needed:
                os.ftruncate(fd, needed)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot, offset=offset)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            raise _host_memory_error(size, what, exc) from exc
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        return cls(gpa, size, mm, slot=slot, kind=kind, fd=fd, fd_offset=offset, shared=True)

    def contains(self, gpa: int, length: int = 1) -> bool:
        """Whether ``[gpa, gpa + length)`` lies entirely inside this region."""
        return self.gpa <= gpa and gpa + length <= self.end

    def close(self) -> None:
        """Unmap the region and close its fd. Idempotent.

        If someone still holds a :meth:`GuestMemory.view` into the region,
        the mapping cannot be unmapped yet; it is then released when the
        last view goes away (the region no longer references it).
        """
        mv, self._mv = self._mv, None
        if mv is not None:
            mv.release()
        mm, self.mm = self.mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                log.debug("guest memory region %#x still has live views; "
                          "unmapping when they are released", self.gpa)
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def __repr__(self) -> str:
        return (f"Region(gpa={self.gpa:#x}, size={self.size:#x}, slot={self.slot}, "
                f"kind={self.kind!r}, shared={self.shared})")


def _unlinked_file_in(directory: str) -> int:
    """Open a new file in ``directory`` that has no name (gone when closed)."""
    flags = os.O_RDWR | os.O_CLOEXEC
    o_tmpfile = getattr(os, "O_TMPFILE", 0)
    if o_tmpfile:
        try:
            return os.open(directory, flags | o_tmpfile, 0o600)
        except OSError as exc:
            # hugetlbfs and some others do not support O_TMPFILE.
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    import tempfile  # only for file-backed memory

    fd, name = tempfile.mkstemp(prefix="vmmkit-guest-", dir=directory)
    os.unlink(name)
    return fd


#: ``fallocate`` modes (linux/falloc.h): free a file range, keep the file's size.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = None


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """``fallocate(PUNCH_HOLE | KEEP_SIZE)``: drop a file range from the page cache and disk."""
    global _libc
    import ctypes  # only for file-backed hotplug memory
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        libc.fallocate.restype = ctypes.c_int
        _libc = libc
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise HostMemoryError(f"cannot punch a hole of {length:#x} bytes at offset {offset:#x} "
                              f"in the guest memory file: {os.strerror(err)}")


# --- Guest memory ----------------------------------------------------------------


class GuestMemory:
    """All of a VM's guest RAM, with bounds-checked, dirty-tracked access.

    Build it with :meth:`GuestMemory.create`. Access methods take GPAs and
    raise :class:`GuestMemoryError` for anything not entirely inside one
    region. Reads and writes are safe to call from several threads at once;
    :meth:`add_region`/:meth:`remove_region` publish a new region table
    atomically, but a region must not be removed while device workers might
    still access it (pause them first, design contract 3).
    """

    def __init__(self, *, shared: bool = False, backing: Optional[PathLike] = None,
                 hotplug_base: int = 0, hotplug_size: int = 0) -> None:
        """Create an empty memory map; use :meth:`create` instead."""
        self.shared = shared or backing is not None
        self.backing = backing
        self.hotplug_base = hotplug_base
        self.hotplug_size = hotplug_size
        # (starts, regions) published as one tuple so a reader never pairs
        # one version's start list with another version's regions.
        self._table: Tuple[Tuple[int, ...], Tuple[Region, ...]] = ((), ())
        # The region the last access hit: guests mostly use the low region,
        # so this turns the lookup into two comparisons.
        self._last: Optional[Region] = None
        self._lock = threading.Lock()        # region table changes
        self._dirty_lock = threading.Lock()  # start_dirty_log vs take_dirty_pages
        self._logging = False
        #: The logging flag as C reads it (``struct vmm_mem.logging`` points here):
        #: 1 while dirty logging is on. Kept equal to ``dirty_logging``.
        self.log_flag = _ffi.new("uint32_t *")
        #: Bumped each time the region table changes, so that C code serving
        #: a queue for a long while (native/virtio_serve.c) knows to come back
        #: for a new view of guest RAM.
        self.table_gen = _ffi.new("uint32_t *")
        self._backing_offset = 0

    # -- construction --

    @classmethod
    def create(cls, mem_size: int, *, shared: bool = False, backing: Optional[PathLike] = None,
               hotplug_size: int = 0, hotplug_align: int = HOTPLUG_ALIGN) -> "GuestMemory":
        """Map ``mem_size`` bytes of guest RAM split around the MMIO hole.

        ``shared`` maps memfds (MAP_SHARED) instead of private anonymous
        memory; ``backing`` maps a file or a file in a directory (see
        :meth:`Region.create`); with either, each region exposes ``fd``.

        ``hotplug_size`` > 0 reserves guest *address space* for memory
        hotplug (virtio-mem): ``hotplug_base`` is the first
        ``hotplug_align``-aligned address at or above both the end of RAM
        and 4 GiB (so the range can never collide with the MMIO hole).
        Nothing is mapped there until :meth:`add_region` is called.
        """
        if hotplug_size < 0 or hotplug_size % PAGE_SIZE:
            raise GuestMemoryError(f"hotplug size {hotplug_size:#x} is negative or not 4 KiB aligned")
        if hotplug_align < PAGE_SIZE or hotplug_align & (hotplug_align - 1):
            raise GuestMemoryError(f"hotplug alignment {hotplug_align:#x} is not a power of two "
                                   f">= 4 KiB")
        regions = layout.ram_regions(mem_size)
        if backing is None:
            # A file-backed guest lives in the page cache (or hugetlbfs,
            # which has its own accounting); RAM+swap is the wrong yardstick.
            _check_host_memory(mem_size)
        ram_end = regions[-1][0] + regions[-1][1]
        hotplug_base = 0
        if hotplug_size:
            start = max(ram_end, layout.MMIO_HOLE_END)
            hotplug_base = (start + hotplug_align - 1) & ~(hotplug_align - 1)
            if hotplug_base + hotplug_size > ADDR_LIMIT:
                raise GuestMemoryError(f"hotplug range {hotplug_base:#x}+{hotplug_size:#x} "
                                       f"passes the end of the 64-bit address space")
        mem = cls(shared=shared, backing=backing, hotplug_base=hotplug_base,
                  hotplug_size=hotplug_size)
        try:
            for gpa, size in regions:
                mem._map_region(gpa, size, KIND_RAM)
        except BaseException:
            mem.close()
            raise
        return mem

    def _map_region(self, gpa: int, size: int, kind: str) -> Region:
        """Create a region with the memory's backing and publish it."""
        with self._lock:
            _starts, regions = self._table
            for r in regions:
                if gpa < r.end and r.gpa < gpa + size:
                    raise GuestMemoryError(
                        f"guest memory region {gpa:#x}..{gpa + size - 1:#x} overlaps "
                        f"{r.kind} region {r.gpa:#x}..{r.end - 1:#x}")
            used = {r.slot for r in regions}
            slot = next(i for i in range(len(used) + 1) if i not in used)
            backing_offset = 0
            file_backed = self.backing is not None and not os.path.isdir(os.fspath(self.backing))
            if file_backed:
                # One file holds all regions back to back, in creation order.
                backing_offset = self._backing_offset
            region = Region.create(gpa, size, slot=slot, kind=kind, shared=self.shared,
                                   backing=self.backing, backing_offset=backing_offset)
            if file_backed:
                self._backing_offset = backing_offset + size
            self._publish(regions + (region,))
            return region

    def _publish(self, regions: Tuple[Region, ...]) -> None:
        """Install a new region table (sorted) and drop the lookup cache."""
        ordered = tuple(sorted(regions, key=lambda r: r.gpa))
        self._table = (tuple(r.gpa for r in ordered), ordered)
        self._last = None
        self.table_gen[0] = (self.table_gen[0] + 1) & 0xFFFFFFFF

    # -- hotplug --

    def add_region(self, gpa: int, size: int, kind: str = KIND_HOTPLUG) -> Region:
        """Map new guest memory at ``gpa`` (e.g. a virtio-mem block) and return it.

        A ``"hotplug"`` region must lie inside the reserved hotplug range.
        The region is only known to the VMM: register it with KVM through
        :meth:`register_region`. Uses the same backing as the boot RAM and
        a free KVM slot.
        """
        _check_range(gpa, size)
        if kind == KIND_HOTPLUG:
            hp_end = self.hotplug_base + self.hotplug_size
            if not self.hotplug_size or not (self.hotplug_base <= gpa and gpa + size <= hp_end):
                raise GuestMemoryError(
                    f"hotplug region {gpa:#x} size {size:#x} is outside the hotplug range "
                    f"{self.hotplug_base:#x}..{max(hp_end - 1, self.hotplug_base):#x}"
                    + ("" if self.hotplug_size else " (no hotplug range reserved)"))
        elif kind != KIND_RAM:
            raise GuestMemoryError(f"unknown guest memory region kind {kind!r}")
        region = self._map_region(gpa, size, kind)
        if self._logging:
            log.debug("region %#x added while dirty logging is on", gpa)
        return region

    def remove_region(self, gpa: int) -> Region:
        """Remove and unmap the hotplug region that starts at ``gpa``; return it.

        Boot RAM cannot be removed. Unregister the slot from KVM first
        (:meth:`unregister_region`), and make sure no worker is using the
        memory (pause them): accesses to the removed range fail from now on.
        """
        with self._lock:
            _starts, regions = self._table
            for r in regions:
                if r.gpa == gpa:
                    break
            else:
                raise GuestMemoryError(f"no guest memory region starts at GPA {gpa:#x}")
            if r.kind == KIND_RAM:
                raise GuestMemoryError(f"guest memory region at GPA {gpa:#x} is boot RAM "
                                       f"and cannot be removed")
            self._publish(tuple(x for x in regions if x is not r))
        r.close()
        return r

    def reserve_hotplug(self, size: int, align: int = HOTPLUG_ALIGN) -> int:
        """Reserve ``size`` more bytes of guest address space for hotplug; return their base.

        For a device (virtio-mem) created after the memory: the new range
        starts at the first ``align``-aligned address above boot RAM, 4 GiB
        and any range reserved before, so several devices each get their
        own. The hotplug range (:attr:`hotplug_base`, :attr:`hotplug_size`)
        grows to cover it. Nothing is mapped: call :meth:`add_region`.
        """
        if type(size) is not int or size <= 0 or size % PAGE_SIZE:
            raise GuestMemoryError(f"hotplug size {size!r} is not a positive multiple of 4 KiB")
        if type(align) is not int or align < PAGE_SIZE or align & (align - 1):
            raise GuestMemoryError(f"hotplug alignment {align!r} is not a power of two >= 4 KiB")
        with self._lock:
            if self.hotplug_size:
                start = self.hotplug_base + self.hotplug_size
            else:
                ram_end = max((r.end for r in self._table[1] if r.kind == KIND_RAM), default=0)
                start = max(ram_end, layout.MMIO_HOLE_END)
            base = (start + align - 1) & ~(align - 1)
            if base + size > ADDR_LIMIT:
                raise GuestMemoryError(f"hotplug range {base:#x}+{size:#x} passes the end of the "
                                       f"64-bit address space")
            if not self.hotplug_size:
                self.hotplug_base = base
            self.hotplug_size = base + size - self.hotplug_base
        return base

    def discard(self, gpa: int, length: int) -> None:
        """Give the host memory behind ``[gpa, gpa + length)`` back; it reads as zeros after.

        For unplugged hotplug memory (virtio-mem): anonymous memory is
        dropped with ``MADV_DONTNEED``; memfd- or file-backed memory also
        gets a hole punched in its file, or the page cache would keep it
        (and the old data). While dirty logging is on the range is marked
        dirty, since its contents changed to zeros behind the guest's back.
        The range must be page aligned and inside one region.
        """
        if type(gpa) is int and type(length) is int and (gpa % PAGE_SIZE or length % PAGE_SIZE):
            raise GuestMemoryError(f"discard of GPA {gpa:#x} length {length:#x}: not 4 KiB aligned")
        r, off = self.translate(gpa, length)
        if not length:
            return
        if r.fd is not None:
            _punch_hole(r.fd, r.fd_offset + off, length)
        try:
            r.mm.madvise(mmap.MADV_DONTNEED, r.mm_offset + off, length)  # type: ignore[union-attr]
        except OSError as exc:
            raise HostMemoryError(f"cannot release guest memory at GPA {gpa:#x} length {length:#x}: "
                                  f"{exc.strerror or exc}") from exc
        if self._logging:
            self._mark(r, off, length)

    # -- lookup --

    @property
    def regions(self) -> List[Region]:
        """All mapped regions (RAM and plugged hotplug memory), in GPA order."""
        return list(self._table[1])

    @property
    def size(self) -> int:
        """Bytes of boot RAM (the ``mem_size`` given to :meth:`create`)."""
        return sum(r.size for r in self._table[1] if r.kind == KIND_RAM)

    @property
    def dirty_logging(self) -> bool:
        """Whether dirty logging is on."""
        return self._logging

    def translate(self, gpa: int, length: int) -> Tuple[Region, int]:
        """Return ``(region, offset)`` for a range lying entirely in one region.

        Raises :class:`GuestMemoryError` (naming the GPA and length) when
        the range is invalid, runs past 2**64, touches unmapped space, or
        straddles two regions. A zero-length range must still start inside
        a region, so a bogus GPA is never accepted just because it is empty.
        """
        r = self._last
        # Fast path: plain ints inside the last region hit. The type check
        # keeps bools/floats/negative numbers on the slow, validating path.
        # A closed (removed) region has mm None and is never served from here.
        if r is not None and type(gpa) is int and type(length) is int and length >= 0 \
                and r.gpa <= gpa and gpa + length <= r.end and gpa < r.end and r.mm is not None:
            return r, gpa - r.gpa
        end = _check_range(gpa, length)
        starts, regions = self._table
        i = bisect.bisect_right(starts, gpa) - 1
        if i >= 0:
            r = regions[i]
            if gpa < r.end and end <= r.end:
                self._last = r
                return r, gpa - r.gpa
            if gpa < r.end:
                raise GuestMemoryError(f"guest memory access at GPA {gpa:#x} length {length:#x} "
                                       f"runs past the end of RAM region "
                                       f"{r.gpa:#x}..{r.end - 1:#x}")
        raise GuestMemoryError(f"guest memory access at GPA {gpa:#x} length {length:#x} "
                               f"is not in guest RAM")

    def is_ram(self, gpa: int, length: int = 1) -> bool:
        """Whether ``[gpa, gpa + length)`` lies entirely inside one mapped region."""
        try:
            self.translate(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def find_region(self, gpa: int) -> Optional[Region]:
        """The region containing ``gpa``, or ``None``."""
        try:
            return self.translate(gpa, 0)[0]
        except GuestMemoryError:
            return None

    # -- access --

    def read(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` bytes of guest memory at ``gpa``."""
        r, off = self.translate(gpa, length)
        return r.mm[r.mm_offset + off:r.mm_offset + off + length]  # type: ignore[index]

    def write(self, gpa: int, data: Any) -> None:
        """Copy ``data`` (any bytes-like object) into guest memory at ``gpa``.

        Marks the touched pages dirty while logging is on.
        """
        if not isinstance(data, (bytes, bytearray)):
            data = memoryview(data).cast("B")
        n = len(data)
        r, off = self.translate(gpa, n)
        r._mv[off:off + n] = data  # type: ignore[index]
        if self._logging and n:
            self._mark(r, off, n)

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy, writable memoryview of guest memory at ``gpa``.

        Writes through the view are NOT dirty-tracked: whoever writes
        through it must call :meth:`mark_dirty` for the range it wrote.
        Do not keep views across a pause/hot-unplug: they pin the mapping.
        """
        r, off = self.translate(gpa, length)
        return r._mv[off:off + length]  # type: ignore[index]

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Record that the VMM wrote ``[gpa, gpa + length)`` behind our back.

        Required after writing through a :meth:`view` (or any other path
        that bypasses :meth:`write`); a no-op while logging is off. The
        range is bounds-checked like any access.
        """
        r, off = self.translate(gpa, length)
        if self._logging and length:
            self._mark(r, off, length)

    def _mark(self, r: Region, off: int, length: int) -> None:
        """Set the dirty bits for region-relative ``[off, off + length)``.

        Atomic ORs, no lock: C device threads set bits in the same bitmaps.
        """
        _lib.vmm_bitmap_set_range(r.dirty_ptr, len(r.dirty_bitmap), off >> PAGE_SHIFT,
                                  (off + length - 1) >> PAGE_SHIFT)

    def read_u8(self, gpa: int) -> int:
        """Read an 8-bit value."""
        r, off = self.translate(gpa, 1)
        return r._mv[off]  # type: ignore[index]

    def read_u16(self, gpa: int) -> int:
        """Read a little-endian 16-bit value."""
        r, off = self.translate(gpa, 2)
        return _U16.unpack_from(r._mv, off)[0]  # type: ignore[arg-type]

    def read_u32(self, gpa: int) -> int:
        """Read a little-endian 32-bit value."""
        r, off = self.translate(gpa, 4)
        return _U32.unpack_from(r._mv, off)[0]  # type: ignore[arg-type]

    def read_u64(self, gpa: int) -> int:
        """Read a little-endian 64-bit value."""
        r, off = self.translate(gpa, 8)
        return _U64.unpack_from(r._mv, off)[0]  # type: ignore[arg-type]

    def _write_struct(self, gpa: int, st: struct.Struct, values: Tuple[Any, ...]) -> None:
        """Pack ``values`` with ``st`` straight into guest memory, tracking dirt."""
        r, off = self.translate(gpa, st.size)
        st.pack_into(r._mv, off, *values)  # type: ignore[arg-type]
        if self._logging and st.size:
            self._mark(r, off, st.size)

    def write_u8(self, gpa: int, value: int) -> None:
        """Write an 8-bit value."""
        self._write_struct(gpa, _U8, (value,))

    def write_u16(self, gpa: int, value: int) -> None:
        """Write a little-endian 16-bit value."""
        self._write_struct(gpa, _U16, (value,))

    def write_u32(self, gpa: int, value: int) -> None:
        """Write a little-endian 32-bit value."""
        self._write_struct(gpa, _U32, (value,))

    def write_u64(self, gpa: int, value: int) -> None:
        """Write a little-endian 64-bit value."""
        self._write_struct(gpa, _U64, (value,))

    def read_obj(self, gpa: int, st: struct.Struct) -> Tuple[Any, ...]:
        """Unpack ``st`` (a ``struct.Struct``) from guest memory at ``gpa``."""
        r, off = self.translate(gpa, st.size)
        return st.unpack_from(r._mv, off)  # type: ignore[arg-type]

    def write_obj(self, gpa: int, st: struct.Struct, *values: Any) -> None:
        """Pack ``values`` with ``st`` into guest memory at ``gpa``."""
        self._write_struct(gpa, st, values)

    # -- dirty logging --

    def start_dirty_log(self, vm: Any = None) -> None:
        """Turn on VMM-side dirty logging, starting from clean bitmaps.

        With ``vm``, also re-register every slot with
        ``KVM_MEM_LOG_DIRTY_PAGES`` so KVM starts its own log.
        """
        with self._dirty_lock:
            for r in self._table[1]:
                _take_bits(r.dirty_ptr, len(r.dirty_bitmap), keep=False)
            self._logging = True
            self.log_flag[0] = 1
        if vm is not None:
            self.register(vm)

    def stop_dirty_log(self, vm: Any = None) -> None:
        """Turn off dirty logging. Bits already set stay until taken.

        With ``vm``, also re-register every slot without the log flag.
        """
        self._logging = False
        self.log_flag[0] = 0
        if vm is not None:
            self.register(vm)

    def take_dirty_pages(self) -> Dict[int, bytes]:
        """Return and clear the VMM-side bitmaps: ``{region_gpa: bitmap}``.

        Each byte is exchanged atomically, so bits that writers (Python or
        C) set meanwhile are in this result or in the next one.
        """
        out: Dict[int, bytes] = {}
        with self._dirty_lock:
            for r in self._table[1]:
                out[r.gpa] = _take_bits(r.dirty_ptr, len(r.dirty_bitmap))  # type: ignore[assignment]
        return out

    def kvm_dirty_log(self, vm: Any) -> Dict[int, bytes]:
        """Fetch KVM's dirty log for every slot and OR in the VMM's bits.

        Calls ``vm.get_dirty_log(slot, npages) -> bytes`` per region (which,
        like ``KVM_GET_DIRTY_LOG``, also resets KVM's log) and takes the VMM
        bitmap, so each call returns what changed since the previous one.
        Returns ``{region_gpa: bitmap}``, each as long as the region's
        bitmap (KVM's 64-bit-word rounding).
        """
        kvm = {r.gpa: vm.get_dirty_log(r.slot, r.npages) for r in self._table[1]}
        vmm = self.take_dirty_pages()
        out: Dict[int, bytes] = {}
        for r in self._table[1]:
            n = len(r.dirty_bitmap)
            a = int.from_bytes(bytes(kvm.get(r.gpa, b""))[:n], "little")
            b = int.from_bytes(vmm.get(r.gpa, b""), "little")
            out[r.gpa] = (a | b).to_bytes(n, "little")
        return out

    # -- KVM registration --

    def _slot_flags(self) -> int:
        return KVM_MEM_LOG_DIRTY_PAGES if self._logging else 0

    def register(self, vm: Any) -> None:
        """Register every region with KVM via ``vm.set_user_memory_region``.

        Calls ``vm.set_user_memory_region(slot, flags, gpa, size, host_addr)``
        with ``KVM_MEM_LOG_DIRTY_PAGES`` in ``flags`` while logging is on.
        """
        for r in self._table[1]:
            self.register_region(vm, r)

    def register_region(self, vm: Any, region: Region) -> None:
        """Register (or update the flags of) one region's KVM slot."""
        vm.set_user_memory_region(region.slot, self._slot_flags(), region.gpa, region.size,
                                  region.host_addr)

    def unregister_region(self, vm: Any, region: Region) -> None:
        """Delete a region's KVM slot (a zero-size ``set_user_memory_region``)."""
        vm.set_user_memory_region(region.slot, 0, region.gpa, 0, region.host_addr)

    # -- teardown --

    def close(self) -> None:
        """Unmap all regions. The memory cannot be used afterwards."""
        with self._lock:
            regions = self._table[1]
            self._table = ((), ())
            self._last = None
        for r in regions:
            r.close()

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GuestMemory(regions={self.regions!r})"
