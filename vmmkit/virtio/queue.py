"""Split virtqueues, device side (virtio 1.x, 2.7), with every guest value checked.

The guest owns the rings, so everything read from them is hostile input
(design contract 5): indices are checked against the queue size, chains
against loops and length, buffers against guest RAM, and descriptor order
(device-readable before device-writable). A violation raises
:class:`QueueError`; the transport then marks the device NEEDS_RESET.
Nothing read from the guest is ever used to index host memory without
going through :class:`~vmmkit.memory.GuestMemory`'s bounds checks.

Writes the device makes (used ring, buffers) go through GuestMemory, so
they are dirty-tracked (contract 4); writes through zero-copy views are
marked with :meth:`DescriptorChain.mark_written`.
"""

from __future__ import annotations

import struct
from typing import List, Optional, Tuple

import attrs

from .constants import AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
DESC_SIZE = _DESC.size

#: Largest queue any vmmkit device offers (the split ring's limit is 32768).
MAX_QUEUE_SIZE = 32768


def _mb() -> None:
    from .._native import lib
    lib.vmm_mb()


class QueueError(Exception):
    """The driver broke the virtqueue protocol; the device must go to NEEDS_RESET."""


Buffer = Tuple[int, int]  # (gpa, length)


@attrs.define
class DescriptorChain:
    """One request as the driver posted it: device-readable then device-writable buffers."""

    head: int
    readable: List[Buffer]
    writable: List[Buffer]

    @property
    def readable_len(self) -> int:
        """Total bytes the device may read."""
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        """Total bytes the device may write."""
        return sum(n for _, n in self.writable)

    def read(self, memory, offset: int = 0, length: Optional[int] = None) -> bytes:
        """Bytes of the readable buffers from *offset*, at most *length* (default all)."""
        return b"".join(bytes(v) for v in self.readable_views(memory, offset, length))

    def readable_views(self, memory, offset: int = 0, length: Optional[int] = None) -> List[memoryview]:
        """Zero-copy views of the readable bytes in ``[offset, offset + length)``."""
        return _views(memory, self.readable, offset, length)

    def writable_views(self, memory, offset: int = 0, length: Optional[int] = None) -> List[memoryview]:
        """Zero-copy views of the writable bytes; call :meth:`mark_written` after writing through them."""
        return _views(memory, self.writable, offset, length)

    def write(self, memory, offset: int, data) -> int:
        """Copy *data* into the writable buffers at *offset*; return how many bytes fit."""
        data = memoryview(data).cast("B")
        done = 0
        for view in _views(memory, self.writable, offset, len(data)):
            view[:] = data[done:done + len(view)]
            done += len(view)
        self.mark_written(memory, offset, done)
        return done

    def mark_written(self, memory, offset: int, length: int) -> None:
        """Record in the dirty log that ``[offset, offset + length)`` of the writable bytes changed."""
        if not memory.dirty_logging or length <= 0:
            return
        for gpa, n in _segments(self.writable, offset, length):
            memory.mark_dirty(gpa, n)


def _segments(buffers: List[Buffer], offset: int, length: Optional[int]):
    """(gpa, n) pieces covering ``[offset, offset + length)`` of the concatenated buffers."""
    remaining = float("inf") if length is None else length
    for gpa, n in buffers:
        if remaining <= 0:
            return
        if offset >= n:
            offset -= n
            continue
        take = int(min(n - offset, remaining))
        yield gpa + offset, take
        remaining -= take
        offset = 0


def _views(memory, buffers: List[Buffer], offset: int, length: Optional[int]) -> List[memoryview]:
    return [memory.view(gpa, n) for gpa, n in _segments(buffers, offset, length) if n]


@attrs.frozen
class QueueState:
    """A virtqueue's full runtime state, for snapshots (contract 1)."""

    version: int = 1
    size: int = 0
    ready: bool = False
    desc_addr: int = 0
    avail_addr: int = 0
    used_addr: int = 0
    next_avail: int = 0
    next_used: int = 0
    signalled_used: int = 0
    event_idx: bool = False
    indirect: bool = False


class Virtqueue:
    """The device side of one split virtqueue.

    The transport fills in ``size``, the three ring addresses and ``ready``
    from the driver's register writes, and ``event_idx`` / ``indirect`` from
    the negotiated features; :meth:`check` validates them before use.
    A queue is used by one device thread at a time.
    """

    def __init__(self, max_size: int):
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset."""
        self.size = self.max_size
        self.ready = False
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.next_avail = self.next_used = self.signalled_used = 0
        self.event_idx = self.indirect = False

    # ----- set-up -----
    def check(self, memory) -> None:
        """Raise QueueError unless the driver's size and ring addresses are usable."""
        size = self.size
        if not 0 < size <= self.max_size or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of two in 1..{self.max_size}")
        for what, addr, align, length in (("descriptor table", self.desc_addr, 16, DESC_SIZE * size),
                                          ("available ring", self.avail_addr, 2, 6 + 2 * size),
                                          ("used ring", self.used_addr, 4, 6 + 8 * size)):
            if addr % align:
                raise QueueError(f"{what} at {addr:#x} is not {align}-byte aligned")
            if not memory.is_ram(addr, length):
                raise QueueError(f"{what} at {addr:#x}+{length:#x} is outside guest RAM")

    # ----- the driver's side of the rings -----
    def avail_idx(self, memory) -> int:
        """The driver's avail.idx."""
        return memory.read_u16(self.avail_addr + 2)

    def pending(self, memory) -> int:
        """How many chains the driver has posted that the device has not taken."""
        pending = (self.avail_idx(memory) - self.next_avail) & 0xFFFF
        if pending > self.size:
            raise QueueError(f"avail.idx moved {pending} entries ahead of the device, more than the queue size {self.size}")
        return pending

    def pop(self, memory) -> Optional[DescriptorChain]:
        """Take the next posted chain, or None when there is none."""
        if not self.pending(memory):
            return None
        slot = self.next_avail % self.size
        head = memory.read_u16(self.avail_addr + 4 + 2 * slot)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return self._walk(memory, head)

    def _walk(self, memory, head: int) -> DescriptorChain:
        size = self.size
        if head >= size:
            raise QueueError(f"chain head {head} is outside the queue (size {size})")
        readable: List[Buffer] = []
        writable: List[Buffer] = []
        table, table_len, index = self.desc_addr, size, head
        indirect = False
        seen = 0
        while True:
            seen += 1
            # The spec caps a chain at the queue size; with no cycle possible
            # beyond that, the count also ends descriptor loops.
            if seen > size:
                raise QueueError(f"chain from head {head} is longer than the queue size {size} (a loop?)")
            addr, length, flags, nxt = memory.read_obj(table + DESC_SIZE * index, _DESC)
            if flags & DESC_F_INDIRECT:
                if indirect:
                    raise QueueError(f"chain from head {head}: indirect descriptor inside an indirect table")
                if not self.indirect:
                    raise QueueError(f"chain from head {head}: indirect descriptor but VIRTIO_F_INDIRECT_DESC was not negotiated")
                if flags & DESC_F_NEXT:
                    raise QueueError(f"chain from head {head}: indirect descriptor with NEXT set")
                if length == 0 or length % DESC_SIZE:
                    raise QueueError(f"chain from head {head}: indirect table length {length} is not a positive multiple of 16")
                if not memory.is_ram(addr, length):
                    raise QueueError(f"chain from head {head}: indirect table at {addr:#x}+{length:#x} is outside guest RAM")
                table, table_len, index, indirect = addr, length // DESC_SIZE, 0, True
                seen -= 1  # the indirect descriptor carries no buffer
                continue
            if length and not memory.is_ram(addr, length):
                raise QueueError(f"chain from head {head}: buffer {addr:#x}+{length:#x} is outside guest RAM")
            if flags & DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise QueueError(f"chain from head {head}: device-readable buffer after a device-writable one")
            else:
                readable.append((addr, length))
            if not flags & DESC_F_NEXT:
                return DescriptorChain(head, readable, writable)
            if nxt >= table_len:
                raise QueueError(f"chain from head {head}: next index {nxt} is outside its table ({table_len} entries)")
            index = nxt

    # ----- the device's answers -----
    def add_used(self, memory, head: int, written: int) -> None:
        """Return chain *head* to the driver, saying *written* bytes were written into it."""
        slot = self.next_used % self.size
        memory.write_obj(self.used_addr + 4 + 8 * slot, _USED_ELEM, head, written)
        self.next_used = (self.next_used + 1) & 0xFFFF
        memory.write_u16(self.used_addr + 2, self.next_used)

    def used_event(self, memory) -> int:
        """The used index the driver asked to be interrupted past (EVENT_IDX's used_event word)."""
        return memory.read_u16(self.avail_addr + 4 + 2 * self.size)

    def needs_interrupt(self, memory) -> bool:
        """Whether the driver wants an interrupt for the used entries added since the last call."""
        new, old = self.next_used, self.signalled_used
        self.signalled_used = new
        if new == old:
            return False
        if self.event_idx:
            _mb()  # the used.idx store must be visible before used_event is read
            return ((new - self.used_event(memory) - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not memory.read_u16(self.avail_addr) & AVAIL_F_NO_INTERRUPT

    def rearm(self, memory) -> bool:
        """Ask the driver to notify when it posts past what was taken; True if more is already there.

        With EVENT_IDX this writes avail_event; the caller keeps draining
        while it returns True, which closes the race with a driver that
        posted after the last pop but read the old avail_event.
        """
        if self.event_idx:
            memory.write_u16(self.used_addr + 4 + 8 * self.size, self.next_avail)
            _mb()
        return self.pending(memory) > 0

    # ----- snapshots -----
    def inspect(self, memory) -> dict:
        """The queue as each side sees it, for finding out why a device and its driver stopped talking.

        The device's indices, and (once the rings are in guest RAM) the
        driver's: avail.idx and flags, used.idx, and the two event-index
        words (``used_event`` the driver wrote, ``avail_event`` the device wrote).
        """
        out = {"ready": self.ready, "size": self.size, "event_idx": self.event_idx,
               "next_avail": self.next_avail, "next_used": self.next_used, "signalled_used": self.signalled_used}
        if self.ready and memory.is_ram(self.avail_addr, 6 + 2 * self.size) \
                and memory.is_ram(self.used_addr, 6 + 8 * self.size):
            out.update(avail_flags=memory.read_u16(self.avail_addr), avail_idx=self.avail_idx(memory),
                       used_event=self.used_event(memory),
                       used_idx=memory.read_u16(self.used_addr + 2),
                       avail_event=memory.read_u16(self.used_addr + 4 + 8 * self.size))
        return out

    def state(self) -> QueueState:
        """This queue's runtime state."""
        return QueueState(size=self.size, ready=self.ready, desc_addr=self.desc_addr, avail_addr=self.avail_addr,
                          used_addr=self.used_addr, next_avail=self.next_avail, next_used=self.next_used,
                          signalled_used=self.signalled_used, event_idx=self.event_idx, indirect=self.indirect)

    def restore(self, state: QueueState) -> None:
        """Take a saved state (checked again by :meth:`check` before use)."""
        if state.version != 1:
            raise ValueError(f"virtqueue state version {state.version} is not supported (expected 1)")
        for field in attrs.fields(QueueState):
            if field.name != "version":
                setattr(self, field.name, getattr(state, field.name))
