"""Address-decoded buses that route vCPU MMIO and port I/O exits to devices.

A VM has two buses: one for MMIO (64-bit guest physical addresses) and one
for port I/O (16-bit ports). A vCPU thread that gets a ``KVM_EXIT_MMIO`` or
``KVM_EXIT_IO`` calls :meth:`Bus.read` / :meth:`Bus.write`; the bus finds the
device whose range holds the address and calls it with the offset into
that range.

Lookups are lock-free: the range table is an immutable tuple that
:meth:`Bus.insert`/:meth:`Bus.remove` replace wholesale, so vCPU threads never
wait on a hot-plug in progress. Device calls are serialised per device (one
lock per device, shared by all its ranges on all buses) because several
vCPUs can exit on the same device at once and most device models are not
written to be re-entrant. A device that does its own locking sets
``bus_lock = False``.

Unmapped accesses behave like an empty PC bus: reads return all-ones
(0xff bytes), writes are dropped. Linux probes absent hardware this way, so
this is normal and not an error; :attr:`Bus.unhandled` counts them for
diagnostics.

Accesses that straddle the end of a device's range: real hardware would
split them into two bus cycles. vmmkit gives the device the part inside
its range (truncated) and treats the rest as unmapped (reads 0xff, writes
dropped); the rest is *not* forwarded to a neighbouring device. KVM exits
are at most 8 bytes and well-behaved guests use naturally aligned accesses
inside a register window, so this only ever affects misbehaving guests,
and it keeps one access under one device lock. An access that *starts*
before a device's range is unmapped as a whole.
"""

from __future__ import annotations

import bisect
import logging
import threading
from typing import Any, Dict, List, Optional, Tuple

import attrs

from vmmkit.errors import VmmkitError

log = logging.getLogger(__name__)

#: Address limits of the two kinds of bus.
MMIO_LIMIT = 1 << 64
PIO_LIMIT = 1 << 16


class BusError(VmmkitError):
    """A bus configuration error (overlapping or invalid ranges) or a device bug."""


class BusDevice:
    """What a device on a :class:`Bus` implements (subclassing is optional).

    The bus calls these from vCPU threads, with the offset relative to the
    base of the range the device was inserted at. Unless ``bus_lock`` is
    false, the bus holds this device's lock around each call, so a device
    sees one access at a time.

    Exceptions raised here propagate to the vCPU thread that made the
    access: a device bug must be visible, not silently turned into 0xff.
    """

    #: Set to ``False`` when the device does its own locking; the bus then
    #: calls it concurrently from several vCPU threads.
    bus_lock = True

    def bus_read(self, offset: int, size: int) -> bytes:
        """Return exactly ``size`` bytes for a guest read at ``offset``.

        The default reads as all-ones, like an unimplemented register.
        """
        return b"\xff" * size

    def bus_write(self, offset: int, data: bytes) -> None:
        """Handle a guest write of ``data`` at ``offset``. Default: ignore."""


@attrs.frozen
class BusRange:
    """One device mapping on a bus: ``[base, base + size)`` goes to ``device``."""

    base: int
    size: int
    name: str
    device: Any
    #: ``None`` when the device opted out of bus locking.
    lock: Optional[Any] = attrs.field(eq=False, repr=False)

    @property
    def end(self) -> int:
        """The exclusive end address."""
        return self.base + self.size

    def describe(self) -> str:
        """``'name at 0x..-0x..'`` for messages."""
        return f"{self.name} at {self.base:#x}..{self.end - 1:#x}"


# Per-device locks, shared across ranges and buses. Keyed by id() because
# device objects need not be hashable (attrs classes with eq=True are not);
# the BusRange entries keep the device alive, so the id stays unique while
# the refcount is non-zero.
_device_locks: Dict[int, List[Any]] = {}   # id(device) -> [lock, refcount]
_device_locks_guard = threading.Lock()


def _acquire_device_lock(device: Any) -> Any:
    with _device_locks_guard:
        entry = _device_locks.get(id(device))
        if entry is None:
            entry = _device_locks[id(device)] = [threading.RLock(), 0]
        entry[1] += 1
        return entry[0]


def _release_device_lock(device: Any) -> None:
    with _device_locks_guard:
        entry = _device_locks.get(id(device))
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del _device_locks[id(device)]


class Bus:
    """An address space (MMIO or PIO) mapping address ranges to devices.

    ``Bus("mmio")`` covers 64-bit addresses; ``Bus("pio", limit=PIO_LIMIT)``
    the 16-bit port space.
    """

    def __init__(self, name: str = "mmio", *, limit: int = MMIO_LIMIT) -> None:
        """Create an empty bus called ``name`` covering ``[0, limit)``."""
        self.name = name
        self.limit = limit
        # (bases, ranges) replaced as a whole: readers take one snapshot.
        self._table: Tuple[Tuple[int, ...], Tuple[BusRange, ...]] = ((), ())
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()
        #: Number of accesses that hit no device (or the part of an access
        #: past a device's end). Diagnostics only.
        self.unhandled = 0

    def insert(self, device: Any, base: int, size: int, name: str) -> None:
        """Map ``device`` at ``[base, base + size)`` under ``name``.

        Raises :class:`BusError` for an empty range, a range outside the bus
        (including one that wraps around), or an overlap with an existing
        mapping; the message names both devices and their ranges.
        """
        if not isinstance(base, int) or not isinstance(size, int):
            raise BusError(f"{self.name} bus: {name}: base {base!r} and size {size!r} "
                           f"must be integers")
        if size <= 0:
            raise BusError(f"{self.name} bus: cannot map {name} at {base:#x} with size {size:#x}: "
                           f"the size must be positive")
        if base < 0 or base + size > self.limit:
            raise BusError(f"{self.name} bus: cannot map {name} at {base:#x} size {size:#x}: "
                           f"the range is outside the bus (0..{self.limit - 1:#x})")
        new = BusRange(base, size, name, device,
                       _acquire_device_lock(device) if getattr(device, "bus_lock", True) else None)
        try:
            with self._lock:
                bases, ranges = self._table
                i = bisect.bisect_right(bases, base)
                # Only the neighbours can overlap: the table is sorted and
                # free of overlaps already.
                for j in (i - 1, i):
                    if 0 <= j < len(ranges):
                        other = ranges[j]
                        if base < other.end and other.base < new.end:
                            raise BusError(f"{self.name} bus: cannot map {new.describe()}: "
                                           f"it overlaps {other.describe()}")
                ranges = ranges[:i] + (new,) + ranges[i:]
                self._table = (tuple(r.base for r in ranges), ranges)
        except BaseException:
            if new.lock is not None:
                _release_device_lock(device)
            raise

    def remove(self, base: int) -> Any:
        """Unmap the range that starts at ``base``; return its device.

        Raises :class:`BusError` when nothing is mapped at exactly ``base``.
        """
        with self._lock:
            bases, ranges = self._table
            i = bisect.bisect_left(bases, base)
            if i >= len(bases) or bases[i] != base:
                raise BusError(f"{self.name} bus: nothing is mapped at {base:#x}")
            old = ranges[i]
            ranges = ranges[:i] + ranges[i + 1:]
            self._table = (tuple(r.base for r in ranges), ranges)
        if old.lock is not None:
            _release_device_lock(old.device)
        return old.device

    def ranges(self) -> List[BusRange]:
        """All mappings, in address order (for diagnostics)."""
        return list(self._table[1])

    def _lookup(self, addr: int) -> Optional[BusRange]:
        bases, ranges = self._table
        i = bisect.bisect_right(bases, addr) - 1
        if i >= 0:
            r = ranges[i]
            if addr < r.end:
                return r
        return None

    def find(self, addr: int) -> Optional[Tuple[Any, int]]:
        """Return ``(device, offset)`` for the device mapped at ``addr``, or ``None``."""
        r = self._lookup(addr)
        return None if r is None else (r.device, addr - r.base)

    def _count_unhandled(self, addr: int, size: int, what: str) -> None:
        with self._stats_lock:
            self.unhandled += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s bus: unhandled %d-byte %s at %#x", self.name, size, what, addr)

    def read(self, addr: int, size: int) -> bytes:
        """Dispatch a ``size``-byte read at ``addr``; always returns ``size`` bytes.

        Unmapped bytes read as 0xff. Raises :class:`BusError` if the
        device returns the wrong number of bytes.
        """
        if size <= 0:
            raise BusError(f"{self.name} bus: read of {size} bytes at {addr:#x}")
        r = self._lookup(addr)
        if r is None:
            self._count_unhandled(addr, size, "read")
            return b"\xff" * size
        offset = addr - r.base
        n = min(size, r.end - addr)
        if r.lock is None:
            data = r.device.bus_read(offset, n)
        else:
            with r.lock:
                data = r.device.bus_read(offset, n)
        if len(data) != n:
            raise BusError(f"{self.name} bus: {r.describe()} returned {len(data)} bytes "
                           f"for a {n}-byte read at offset {offset:#x}")
        if n < size:
            self._count_unhandled(r.end, size - n, "read")
            return bytes(data) + b"\xff" * (size - n)
        return bytes(data)

    def write(self, addr: int, data: bytes) -> None:
        """Dispatch a write of ``data`` at ``addr``; unmapped bytes are dropped."""
        size = len(data)
        if size <= 0:
            raise BusError(f"{self.name} bus: empty write at {addr:#x}")
        r = self._lookup(addr)
        if r is None:
            self._count_unhandled(addr, size, "write")
            return
        offset = addr - r.base
        n = min(size, r.end - addr)
        if n < size:
            self._count_unhandled(r.end, size - n, "write")
            data = bytes(data[:n])
        if r.lock is None:
            r.device.bus_write(offset, data)
        else:
            with r.lock:
                r.device.bus_write(offset, data)

    def __repr__(self) -> str:
        inner = ", ".join(r.describe() for r in self._table[1])
        return f"Bus({self.name!r}: {inner})"
