"""Guest-side virtio 1.x driver: split virtqueues and the virtio-MMIO v2 registers.

Unit tests use this to drive a VMM-side device model the way a Linux guest
would (init sequence, ring layout, free-list recycling and event-index rules
of Linux's ``virtio_ring.c``/``virtio_mmio.c``), without KVM: the guest is
this code writing into a :class:`vmmkit.memory.GuestMemory`. Raw tools
(``write_desc``, ``publish``, ``set_avail_idx``, ``add_raw``) build the
hostile input a device must survive. Layouts: virtio 1.1 spec §2.6 and
§4.2.2, little-endian. Feature constants are bit *numbers*, as in the spec:
test ``features & (1 << VIRTIO_F_VERSION_1)``.
"""

from __future__ import annotations

import struct
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

# --- Constants (virtio 1.1 spec) -------------------------------------------------

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

VIRTIO_MMIO_MAGIC_VALUE = 0x000
VIRTIO_MMIO_VERSION = 0x004
VIRTIO_MMIO_DEVICE_ID = 0x008
VIRTIO_MMIO_VENDOR_ID = 0x00C
VIRTIO_MMIO_DEVICE_FEATURES = 0x010
VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014
VIRTIO_MMIO_DRIVER_FEATURES = 0x020
VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024
VIRTIO_MMIO_QUEUE_SEL = 0x030
VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034
VIRTIO_MMIO_QUEUE_NUM = 0x038
VIRTIO_MMIO_QUEUE_READY = 0x044
VIRTIO_MMIO_QUEUE_NOTIFY = 0x050
VIRTIO_MMIO_INTERRUPT_STATUS = 0x060
VIRTIO_MMIO_INTERRUPT_ACK = 0x064
VIRTIO_MMIO_STATUS = 0x070
VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080
VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084
VIRTIO_MMIO_QUEUE_DRIVER_LOW = 0x090
VIRTIO_MMIO_QUEUE_DRIVER_HIGH = 0x094
VIRTIO_MMIO_QUEUE_DEVICE_LOW = 0x0A0
VIRTIO_MMIO_QUEUE_DEVICE_HIGH = 0x0A4
VIRTIO_MMIO_SHM_SEL = 0x0AC
VIRTIO_MMIO_SHM_LEN_LOW = 0x0B0
VIRTIO_MMIO_SHM_LEN_HIGH = 0x0B4
VIRTIO_MMIO_SHM_BASE_LOW = 0x0B8
VIRTIO_MMIO_SHM_BASE_HIGH = 0x0BC
VIRTIO_MMIO_QUEUE_RESET = 0x0C0
VIRTIO_MMIO_CONFIG_GENERATION = 0x0FC
VIRTIO_MMIO_CONFIG = 0x100

VIRTIO_MMIO_MAGIC = 0x74726976  # "virt" read as a little-endian u32
VIRTIO_MMIO_INT_VRING = 1
VIRTIO_MMIO_INT_CONFIG = 2

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

#: Largest split queue (spec §2.6: "The maximum Queue Size value is 32768").
MAX_QUEUE_SIZE = 32768

DESC = struct.Struct("<QIHH")   # struct virtq_desc: addr, len, flags, next
USED_ELEM = struct.Struct("<II")  # struct virtq_used_elem: id, len

Desc = Tuple[int, int, int, int]


class VirtioDriverError(RuntimeError):
    """The device broke the protocol as seen from the driver (or the queue is full)."""


class QueueFullError(VirtioDriverError):
    """Not enough free descriptors for the chain (Linux returns -ENOSPC)."""


def vring_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """Spec §2.6.7.2 / Linux ``vring_need_event``: did ``old..new`` pass ``event_idx``?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old) & 0xFFFF)


# --- Allocation --------------------------------------------------------------------


class GuestAllocator:
    """Bump allocator over the guest range ``[start, end)`` for rings and buffers.

    Freed blocks are pooled by size and reused for same-sized requests, so
    long tests (many thousands of requests) stay within bounded memory.
    """

    def __init__(self, start: int, end: int) -> None:
        """Hand out addresses from ``start`` up to (not including) ``end``."""
        if not 0 <= start <= end:
            raise ValueError(f"bad allocator range {start:#x}..{end:#x}")
        self.start, self.end, self.next = start, end, start
        self._pool: Dict[int, List[int]] = {}

    def alloc(self, size: int, align: int = 16) -> int:
        """Return the GPA of ``size`` fresh bytes aligned to ``align`` (a power of two).

        Raises ``MemoryError`` when the range is exhausted.
        """
        if size < 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocation: size {size}, align {align}")
        pool = self._pool.get(size)
        if pool:
            for i in range(len(pool) - 1, -1, -1):
                if pool[i] % align == 0:
                    return pool.pop(i)
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError(f"guest allocator {self.start:#x}..{self.end:#x} exhausted "
                              f"({size} bytes wanted)")
        self.next = addr + size
        return addr

    def free(self, addr: int, size: int) -> None:
        """Give back a block from :meth:`alloc` for reuse by a same-sized request."""
        self._pool.setdefault(size, []).append(addr)


# --- Split virtqueue -------------------------------------------------------------


#: One add_chain chain: ring slots in chain order, (gpa, len, device_writable)
#: per buffer, and the indirect table's (gpa, size) if any.
_Chain = Tuple[List[int], List[Tuple[int, int, bool]], Optional[Tuple[int, int]]]


class SplitQueueDriver:
    """Driver side of one split virtqueue in guest memory.

    Like Linux it keeps shadow avail/used indices (mod 2**16) and recycles
    descriptors through a LIFO free list, so a device sees Linux's index
    reuse pattern. :meth:`get_used` raises :class:`VirtioDriverError` for
    device bugs: an id never made available, or ``used.idx`` running ahead
    of what is in flight.
    """

    def __init__(self, memory, size: int, alloc: GuestAllocator, *,
                 event_idx: bool = False) -> None:
        """Allocate and zero the descriptor table and rings for ``size`` (a power of two <= 32768).

        Sizes are the spec's 16*N, 6+2*N and 6+8*N bytes, which already hold
        ``used_event``/``avail_event``, so the layout never depends on
        ``event_idx``; that flag makes the driver act as if
        VIRTIO_F_EVENT_IDX were negotiated.
        """
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise ValueError(f"split queue size {size} is not a power of two in 1..32768")
        self.mem, self.size, self.alloc, self.event_idx = memory, size, alloc, event_idx
        self.desc_addr = alloc.alloc(16 * size, 16)
        self.avail_addr = alloc.alloc(6 + 2 * size, 2)
        self.used_addr = alloc.alloc(6 + 8 * size, 4)
        for addr, n in ((self.desc_addr, 16 * size), (self.avail_addr, 6 + 2 * size),
                        (self.used_addr, 6 + 8 * size)):
            memory.write(addr, bytes(n))
        self._free: List[int] = list(range(size - 1, -1, -1))  # pop() hands out 0 first
        self._chains: Dict[int, _Chain] = {}     # in flight, by head
        self._done: Dict[int, _Chain] = {}       # completed, kept for in_buffers()
        self._raw: Dict[int, int] = {}           # head -> times published raw, in flight
        self._avail_idx = 0
        self._last_used = 0
        self._kicked_idx = 0
        self._avail_flags = 0

    # -- publishing --

    def add_chain(self, out_bufs: Sequence[bytes], in_lens: Sequence[int], *,
                  indirect: bool = False) -> int:
        """Make a chain of buffers available; return its head descriptor index.

        Each ``out_bufs`` item is copied into new guest memory as a
        device-readable descriptor, then come zero-filled device-writable
        ones of ``in_lens`` bytes (the spec wants readable first). With
        ``indirect`` they go into an indirect table behind one INDIRECT ring
        descriptor. Raises :class:`QueueFullError` when descriptors run out.
        """
        n = len(out_bufs) + len(in_lens)
        if n == 0:
            raise ValueError("a chain needs at least one buffer")
        need = 1 if indirect else n
        if need > len(self._free):
            raise QueueFullError(f"queue needs {need} free descriptors, has {len(self._free)}")
        slots = [self._free.pop() for _ in range(need)]
        for s in slots:
            # Only now is the old chain's memory surely unreferenced: its slot
            # is being overwritten, and in_buffers() of that head has expired.
            old = self._done.pop(s, None)
            if old is not None:
                self._release(old)
        bufs: List[Tuple[int, int, bool]] = []
        for data in out_bufs:
            addr = self.alloc.alloc(len(data))
            self.mem.write(addr, bytes(data))
            bufs.append((addr, len(data), False))
        for length in in_lens:
            addr = self.alloc.alloc(length)
            self.mem.write(addr, bytes(length))
            bufs.append((addr, length, True))
        table = None
        if indirect:
            table = (self.alloc.alloc(16 * n, 16), 16 * n)
            for i, (addr, length, wr) in enumerate(bufs):
                flags = (VIRTQ_DESC_F_WRITE if wr else 0) | (VIRTQ_DESC_F_NEXT if i < n - 1 else 0)
                self.mem.write_obj(table[0] + 16 * i, DESC, addr, length, flags,
                                   i + 1 if i < n - 1 else 0)
            self._write_desc(slots[0], table[0], table[1], VIRTQ_DESC_F_INDIRECT, 0)
        else:
            for i, (addr, length, wr) in enumerate(bufs):
                last = i == n - 1
                flags = (VIRTQ_DESC_F_WRITE if wr else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
                self._write_desc(slots[i], addr, length, flags, 0 if last else slots[i + 1])
        head = slots[0]
        self._chains[head] = (slots, bufs, table)
        self._put_avail(head)
        return head

    def _release(self, chain: _Chain) -> None:
        for addr, length, _wr in chain[1]:
            self.alloc.free(addr, length)
        if chain[2] is not None:
            self.alloc.free(*chain[2])

    def _put_avail(self, head: int) -> None:
        # Ring entry strictly before idx: the device may read as soon as idx moves.
        self.mem.write_u16(self.avail_addr + 4 + 2 * (self._avail_idx % self.size), head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail_addr + 2, self._avail_idx)

    def write_desc(self, index: int, addr: int, length: int, flags: int, next_: int) -> None:
        """Raw write of descriptor ``index`` (no validation beyond field widths).

        The slot leaves the free list, so :meth:`add_chain` will not overwrite
        it later; it never returns there (hostile tests are short-lived).
        """
        if index in self._free:
            self._free.remove(index)
        self._write_desc(index, addr, length, flags, next_)

    def _write_desc(self, index: int, addr: int, length: int, flags: int, next_: int) -> None:
        self.mem.write_obj(self.desc_addr + 16 * index, DESC, addr, length, flags, next_)

    def publish(self, head: int) -> None:
        """Put ``head`` (any u16, even out of range) in the next avail slot and bump idx.

        The driver then accepts ``head`` once as a used id, without recycling.
        """
        self._raw[head] = self._raw.get(head, 0) + 1
        self._put_avail(head)

    def add_raw(self, descs: Union[Sequence[Desc], Mapping[int, Desc]],
                head: Optional[int] = None) -> int:
        """Hostile tool: write ``(addr, len, flags, next)`` descriptors verbatim, publish ``head``.

        A sequence goes into slots 0, 1, ...; a mapping gives ``{slot: desc}``.
        ``head`` defaults to the lowest slot written. Nothing is validated:
        loops, bad ``next`` values and bogus addresses are the point.
        Returns ``head``.
        """
        items = dict(descs) if isinstance(descs, Mapping) else dict(enumerate(descs))
        for slot, (addr, length, flags, next_) in items.items():
            self.write_desc(slot, addr, length, flags, next_)
        if head is None:
            head = min(items) if items else 0
        self.publish(head)
        return head

    def take_free(self, count: int) -> List[int]:
        """Hostile tool: reserve ``count`` free descriptor slots for :meth:`add_raw`.

        The slots leave the free list for good, so raw descriptors written
        there never clobber a chain that :meth:`add_chain` has in flight.
        Raises :class:`QueueFullError` when fewer are free.
        """
        if count > len(self._free):
            raise QueueFullError(f"{count} free descriptors wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def set_avail_idx(self, value: int) -> None:
        """Raw write of ``avail.idx`` (e.g. an absurd jump); it becomes the driver's shadow too."""
        self._avail_idx = value & 0xFFFF
        self.mem.write_u16(self.avail_addr + 2, self._avail_idx)

    def avail_idx(self) -> int:
        """The driver's avail index (what ``avail.idx`` holds unless overwritten)."""
        return self._avail_idx

    def num_free(self) -> int:
        """How many descriptors are free for :meth:`add_chain`."""
        return len(self._free)

    # -- completion --

    def used_idx(self) -> int:
        """Current ``used.idx`` as the device last wrote it."""
        return self.mem.read_u16(self.used_addr + 2)

    def get_used(self) -> List[Tuple[int, int]]:
        """Return the ``(id, len)`` used entries added since the last call, in order.

        Descriptors of completed chains go back on the free list. With
        ``event_idx`` (and interrupts not suppressed), ``used_event`` is then
        set to the new last-seen index, as Linux's ``virtqueue_get_buf`` does.
        """
        idx = self.used_idx()
        pending = (idx - self._last_used) & 0xFFFF
        in_flight = len(self._chains) + sum(self._raw.values())
        if pending > in_flight:
            raise VirtioDriverError(f"used.idx {idx} is {pending} entries past the driver's "
                                    f"{self._last_used}, but only {in_flight} are in flight")
        out: List[Tuple[int, int]] = []
        for _ in range(pending):
            slot = self.used_addr + 4 + 8 * (self._last_used % self.size)
            vid, vlen = self.mem.read_obj(slot, USED_ELEM)
            chain = self._chains.pop(vid, None)
            if chain is not None:
                # Pushed in reverse so the head comes off the free list first.
                self._free.extend(reversed(chain[0]))
                self._done[vid] = chain
            elif self._raw.get(vid):
                self._raw[vid] -= 1
            else:
                raise VirtioDriverError(f"device returned used id {vid}, which is not in flight")
            self._last_used = (self._last_used + 1) & 0xFFFF
            out.append((vid, vlen))
        if self.event_idx and not self._avail_flags & VIRTQ_AVAIL_F_NO_INTERRUPT:
            self.set_used_event(self._last_used)
        return out

    def buffers(self, head: int) -> List[Tuple[int, int, bool]]:
        """``(gpa, len, device_writable)`` of each buffer of a chain made by :meth:`add_chain`.

        Valid while the chain is in flight and after completion until its
        head descriptor is reused.
        """
        chain = self._chains.get(head) or self._done.get(head)
        if chain is None:
            raise KeyError(f"no chain with head {head}")
        return list(chain[1])

    def buffer_data(self, gpa: int, length: int) -> bytes:
        """Read ``length`` bytes of guest memory at ``gpa`` (e.g. a buffer's contents)."""
        return self.mem.read(gpa, length)

    def in_buffers(self, head: int) -> List[bytes]:
        """Current contents of the device-writable buffers of chain ``head``, in order."""
        return [self.mem.read(a, n) for a, n, wr in self.buffers(head) if wr]

    # -- notification suppression --

    def set_used_event(self, value: int) -> None:
        """Write ``used_event``: ask for an interrupt once ``used.idx`` passes ``value``."""
        self.mem.write_u16(self.avail_addr + 4 + 2 * self.size, value & 0xFFFF)

    def used_event(self) -> int:
        """Read back ``used_event`` (the field after the avail ring)."""
        return self.mem.read_u16(self.avail_addr + 4 + 2 * self.size)

    def avail_event(self) -> int:
        """Read the device's ``avail_event`` (the field after the used ring)."""
        return self.mem.read_u16(self.used_addr + 4 + 8 * self.size)

    def set_no_interrupt(self, on: bool) -> None:
        """Set or clear VIRTQ_AVAIL_F_NO_INTERRUPT in ``avail.flags``."""
        if on:
            self._avail_flags |= VIRTQ_AVAIL_F_NO_INTERRUPT
        else:
            self._avail_flags &= ~VIRTQ_AVAIL_F_NO_INTERRUPT
        self.mem.write_u16(self.avail_addr, self._avail_flags)

    def used_flags(self) -> int:
        """Read ``used.flags`` (VIRTQ_USED_F_NO_NOTIFY is the device's hint)."""
        return self.mem.read_u16(self.used_addr)

    def kick_prepare(self) -> bool:
        """Whether to notify the device about entries added since the last call.

        Linux's ``virtqueue_kick_prepare``: with event_idx, whether the new
        entries passed ``avail_event``; otherwise unless the device set
        VIRTQ_USED_F_NO_NOTIFY.
        """
        old, new = self._kicked_idx, self._avail_idx
        self._kicked_idx = new
        if self.event_idx:
            return vring_need_event(self.avail_event(), new, old)
        return not self.used_flags() & VIRTQ_USED_F_NO_NOTIFY


# --- virtio-MMIO transport -------------------------------------------------------


class MmioDriver:
    """Guest-side virtio-MMIO v2 initialisation over any object with
    ``bus_read(offset, size) -> bytes`` and ``bus_write(offset, data)``
    (offsets relative to the transport window, little-endian 32-bit registers).

    Accesses mirror Linux's ``virtio_mmio.c`` and virtio core, in order and width.
    """

    #: Give up on config reads after this many generation changes: a device
    #: whose generation never settles would hang Linux, and a test should fail.
    CONFIG_RETRIES = 100

    def __init__(self, transport, memory, alloc: GuestAllocator) -> None:
        """Drive ``transport``; rings and buffers live in ``memory`` at ``alloc``'s GPAs."""
        self.transport, self.mem, self.alloc = transport, memory, alloc
        self.features = 0
        self.queues: List[SplitQueueDriver] = []

    def read32(self, off: int) -> int:
        """Read the 32-bit register at ``off``."""
        return int.from_bytes(self.transport.bus_read(off, 4), "little")

    def write32(self, off: int, value: int) -> None:
        """Write the 32-bit register at ``off``."""
        self.transport.bus_write(off, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def magic(self) -> int:
        """MagicValue (0x74726976, "virt")."""
        return self.read32(VIRTIO_MMIO_MAGIC_VALUE)

    def version(self) -> int:
        """Transport Version (2 for virtio 1.x devices)."""
        return self.read32(VIRTIO_MMIO_VERSION)

    def device_id(self) -> int:
        """DeviceID (0 means no device behind this transport)."""
        return self.read32(VIRTIO_MMIO_DEVICE_ID)

    def vendor_id(self) -> int:
        """VendorID."""
        return self.read32(VIRTIO_MMIO_VENDOR_ID)

    def device_features(self) -> int:
        """The 64-bit DeviceFeatures, read as two words via DeviceFeaturesSel."""
        self.write32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
        high = self.read32(VIRTIO_MMIO_DEVICE_FEATURES)
        self.write32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0)
        return (high << 32) | self.read32(VIRTIO_MMIO_DEVICE_FEATURES)

    def write_driver_features(self, features: int) -> None:
        """Write the 64-bit DriverFeatures as two words via DriverFeaturesSel."""
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1)
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES, features >> 32)
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0)
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES, features)

    def status(self) -> int:
        """Read the device Status register."""
        return self.read32(VIRTIO_MMIO_STATUS)

    def set_status(self, value: int) -> None:
        """Write the device Status register (0 resets the device)."""
        self.write32(VIRTIO_MMIO_STATUS, value)

    def add_status(self, bit: int) -> None:
        """OR ``bit`` into Status by read-modify-write, as the virtio core does."""
        self.set_status(self.status() | bit)

    def reset(self) -> None:
        """Write 0 to Status and check it reads back 0, as Linux's ``vm_reset`` expects."""
        self.set_status(0)
        if self.status() != 0:
            raise RuntimeError(f"device status is {self.status():#x} after reset, not 0")

    def init(self, *, accept: Optional[int] = None, queues: int = 1,
             queue_size: Optional[int] = None, event_idx: bool = False,
             indirect: bool = False) -> List[SplitQueueDriver]:
        """Run the Linux-like initialisation and return the queue drivers.

        Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (checked), queues,
        DRIVER_OK. Accepts ``accept`` verbatim if given, else VERSION_1 plus
        EVENT_IDX/INDIRECT_DESC if asked for and offered. Each queue gets
        ``min(queue_size or max, max)`` entries. On failure sets FAILED (like
        ``virtio_dev_probe``) and raises ``RuntimeError``.
        """
        if self.magic() != VIRTIO_MMIO_MAGIC:
            raise RuntimeError(f"bad virtio-mmio magic {self.magic():#x}")
        if self.version() != 2:
            raise RuntimeError(f"virtio-mmio version {self.version()} is not 2")
        if self.device_id() == 0:
            raise RuntimeError("virtio-mmio device id 0: no device")
        self.reset()
        self.add_status(STATUS_ACKNOWLEDGE)
        self.add_status(STATUS_DRIVER)
        try:
            offered = self.device_features()
            if accept is None:
                if not offered >> VIRTIO_F_VERSION_1 & 1:
                    raise RuntimeError("device does not offer VIRTIO_F_VERSION_1")
                wanted = (1 << VIRTIO_F_VERSION_1) | (event_idx << VIRTIO_F_EVENT_IDX) \
                    | (indirect << VIRTIO_F_INDIRECT_DESC)
                accept = offered & wanted
            self.features = accept
            self.write_driver_features(accept)
            self.add_status(STATUS_FEATURES_OK)
            if not self.status() & STATUS_FEATURES_OK:
                raise RuntimeError(f"device refused features {accept:#x}")
            use_event = bool(accept >> VIRTIO_F_EVENT_IDX & 1)
            self.queues = [self._setup_queue(i, queue_size, use_event) for i in range(queues)]
        except (RuntimeError, ValueError, MemoryError):
            self.add_status(STATUS_FAILED)
            raise
        self.add_status(STATUS_DRIVER_OK)
        return self.queues

    def _setup_queue(self, index: int, queue_size: Optional[int],
                     event_idx: bool) -> SplitQueueDriver:
        self.write32(VIRTIO_MMIO_QUEUE_SEL, index)
        if self.read32(VIRTIO_MMIO_QUEUE_READY):
            raise RuntimeError(f"queue {index} is already ready before setup")
        num_max = self.read32(VIRTIO_MMIO_QUEUE_NUM_MAX)
        if num_max == 0:
            raise RuntimeError(f"queue {index} does not exist (QueueNumMax 0)")
        num = min(queue_size or num_max, num_max)
        q = SplitQueueDriver(self.mem, num, self.alloc, event_idx=event_idx)
        self.write32(VIRTIO_MMIO_QUEUE_NUM, num)
        for low, addr in ((VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc_addr),
                          (VIRTIO_MMIO_QUEUE_DRIVER_LOW, q.avail_addr),
                          (VIRTIO_MMIO_QUEUE_DEVICE_LOW, q.used_addr)):
            self.write32(low, addr)
            self.write32(low + 4, addr >> 32)
        self.write32(VIRTIO_MMIO_QUEUE_READY, 1)
        return q

    def notify(self, queue_index: int) -> None:
        """Kick queue ``queue_index`` (write QueueNotify)."""
        self.write32(VIRTIO_MMIO_QUEUE_NOTIFY, queue_index)

    def interrupt_status(self) -> int:
        """Read InterruptStatus (VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG)."""
        return self.read32(VIRTIO_MMIO_INTERRUPT_STATUS)

    def ack_interrupt(self, bits: int) -> None:
        """Write ``bits`` to InterruptACK."""
        self.write32(VIRTIO_MMIO_INTERRUPT_ACK, bits)

    def _config_access_sizes(self, size: int) -> List[int]:
        # Linux's vm_get/vm_set: 1/2/4-byte fields in one access, 8 as two
        # 4-byte accesses, anything else byte by byte.
        if size in (1, 2, 4):
            return [size]
        if size == 8:
            return [4, 4]
        return [1] * size

    def config_read(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes of device config at ``offset``, consistent per ConfigGeneration."""
        for _ in range(self.CONFIG_RETRIES):
            gen = self.read32(VIRTIO_MMIO_CONFIG_GENERATION)
            out, pos = b"", offset
            for n in self._config_access_sizes(size):
                out += self.transport.bus_read(VIRTIO_MMIO_CONFIG + pos, n)
                pos += n
            if self.read32(VIRTIO_MMIO_CONFIG_GENERATION) == gen:
                return out
        raise RuntimeError(f"config generation kept changing over {self.CONFIG_RETRIES} reads")

    def config_write(self, offset: int, data: bytes) -> None:
        """Write ``data`` to device config at ``offset`` with Linux's access widths."""
        pos = 0
        for n in self._config_access_sizes(len(data)):
            self.transport.bus_write(VIRTIO_MMIO_CONFIG + offset + pos, bytes(data[pos:pos + n]))
            pos += n
