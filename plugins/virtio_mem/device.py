"""The virtio-mem device (virtio spec 1.2, section 5.15): guest memory plugged and unplugged in blocks.

The device owns a region of guest physical address space above RAM (the
plugin reserves and maps it, see :mod:`vmmkit_plugins.virtio_mem`). The host
says how much of it the guest should use (``requested_size``); the guest's
driver plugs and unplugs ``block_size`` blocks with requests on one queue
until ``plugged_size`` matches. Unplugged blocks are given back to the host
(:meth:`vmmkit.memory.GuestMemory.discard`), so a later plug reads zeros,
never what the guest had there before.

Every request field comes from the guest and is checked: ranges must be
block aligned, non-empty and inside the usable region (ERROR otherwise),
plug must not exceed the requested size (NACK), and a range must be wholly
in the opposite state of what the request asks (ERROR).
"""

from __future__ import annotations

import logging
import struct
import threading

import attrs

from vmmkit.memory import PAGE_SIZE, GuestMemoryError, HostMemoryError
from vmmkit.virtio import VirtioDevice
from vmmkit.virtio.queue import DescriptorChain

log = logging.getLogger("vmmkit.virtio_mem")

#: The virtio device ID of virtio-mem.
DEVICE_ID_MEM = 24
#: Feature bits.
F_ACPI_PXM = 0
F_UNPLUGGED_INACCESSIBLE = 1

# Request types.
REQ_PLUG = 0
REQ_UNPLUG = 1
REQ_UNPLUG_ALL = 2
REQ_STATE = 3
# Response types.
RESP_ACK = 0
RESP_NACK = 1
RESP_BUSY = 2
RESP_ERROR = 3
# STATE answers.
STATE_PLUGGED = 0
STATE_UNPLUGGED = 1
STATE_MIXED = 2

#: struct virtio_mem_config: block_size, node_id, 6 bytes padding, addr, region_size,
#: usable_region_size, plugged_size, requested_size.
CONFIG = struct.Struct("<QH6xQQQQQ")
#: struct virtio_mem_req: type, 6 bytes padding, then the (addr, nb_blocks) of PLUG/UNPLUG/STATE.
REQ_HEAD = struct.Struct("<H")
REQ_RANGE = struct.Struct("<QH")
REQ_RANGE_OFFSET = 8
REQ_LEN = 24
#: struct virtio_mem_resp: type, 6 bytes padding, the state (STATE only).
RESP = struct.Struct("<H6xH")

#: The memory block size Linux hot-adds and onlines at a time on x86-64; the
#: usable region grows in these steps, so the driver always has whole blocks.
LINUX_MEMORY_BLOCK = 128 << 20
#: How far past ``requested_size`` the usable region reaches: room for the
#: driver to plug around fragmentation (two Linux memory blocks, as QEMU does).
USABLE_EXTENT = 2 * LINUX_MEMORY_BLOCK


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


@attrs.frozen
class VirtioMemState:
    """A virtio-mem device's runtime state: sizes and the plugged bitmap (bit i = block i)."""

    addr: int
    region_size: int
    block_size: int
    requested_size: int
    usable_region_size: int
    plugged: bytes
    version: int = 1


class ResizeError(ValueError):
    """A requested size the device cannot take (negative, unaligned, larger than the region)."""


class VirtioMem(VirtioDevice):
    """A virtio-mem device over ``[addr, addr + region_size)`` of guest physical memory.

    ``addr`` and ``region_size`` are multiples of ``block_size`` (a power of
    two of at least 4 KiB); the memory there must be mapped in the guest
    memory the transport hands over before the driver unplugs anything.
    :meth:`resize` sets the requested size from any thread.
    """

    device_id = DEVICE_ID_MEM
    queue_sizes = (128,)

    def __init__(self, name: str, *, addr: int, region_size: int, block_size: int = 2 << 20,
                 requested_size: int = 0):
        super().__init__(name)
        if block_size < PAGE_SIZE or block_size & (block_size - 1):
            raise ValueError(f"block size {block_size} is not a power of two of at least 4 KiB")
        if region_size <= 0 or region_size % block_size or addr % block_size:
            raise ValueError(f"region {addr:#x}+{region_size:#x} is empty or not a multiple of "
                             f"the block size {block_size:#x}")
        self.addr = addr
        self.region_size = region_size
        self.block_size = block_size
        self.nblocks = region_size // block_size
        # The usable region grows in steps Linux can hot-add (and block-size steps for huge blocks).
        self._usable_step = max(LINUX_MEMORY_BLOCK, block_size)
        # Guards everything below: requests run on the device worker, resize on API threads,
        # config reads on vCPU threads.
        self._lock = threading.Lock()
        self._bits = 0  # plugged bitmap as an int: bit i set = block i plugged
        self.plugged_size = 0
        self.requested_size = 0
        self.usable_region_size = 0
        self._changed = threading.Condition(self._lock)
        self.resize(requested_size)

    # ----- what the driver sees -----
    def device_features(self) -> int:
        """UNPLUGGED_INACCESSIBLE: the driver promises not to touch unplugged blocks."""
        return 1 << F_UNPLUGGED_INACCESSIBLE

    def config_bytes(self) -> bytes:
        """struct virtio_mem_config, read consistently under the lock."""
        with self._lock:
            return CONFIG.pack(self.block_size, 0, self.addr, self.region_size, self.usable_region_size,
                               self.plugged_size, self.requested_size)

    # ----- the host's side -----
    def check_size(self, size) -> int:
        """Return ``size`` if it is a requested size this device accepts, else raise :class:`ResizeError`."""
        if type(size) is not int:
            raise ResizeError(f"the requested size must be a whole number of bytes, found {size!r}")
        if size < 0:
            raise ResizeError(f"the requested size cannot be negative (found {size})")
        if size % self.block_size:
            raise ResizeError(f"the requested size {size} is not a multiple of the block size "
                              f"{_fmt(self.block_size)}")
        if size > self.region_size:
            raise ResizeError(f"the requested size {_fmt(size)} is larger than the hotplug region "
                              f"({_fmt(self.region_size)})")
        return size

    def resize(self, size: int) -> None:
        """Ask the guest to plug or unplug memory until ``size`` bytes are plugged.

        Extends the usable region if the new size needs it (it never shrinks
        under plugged blocks) and raises the config-change interrupt when
        the driver is running. Raises :class:`ResizeError` for a bad size.
        """
        self.check_size(size)
        with self._lock:
            changed = size != self.requested_size
            self.requested_size = size
            self.usable_region_size = max(self.usable_region_size, self._usable_for(size))
            self._changed.notify_all()
        ctx = self.ctx
        if changed and ctx is not None:
            ctx.signal_config()

    def _usable_for(self, requested: int) -> int:
        if requested == 0:
            return min(self.region_size, self._usable_step)
        return min(self.region_size, _align_up(requested + USABLE_EXTENT, self._usable_step))

    def status(self) -> dict:
        """The sizes as JSON (what the control API answers)."""
        with self._lock:
            return {"id": self.name, "addr": self.addr, "region_size": self.region_size,
                    "block_size": self.block_size, "usable_region_size": self.usable_region_size,
                    "requested_size": self.requested_size, "plugged_size": self.plugged_size}

    def wait_plugged(self, size: int, timeout: float) -> bool:
        """Wait until ``plugged_size == size``; return whether it got there."""
        with self._changed:
            return self._changed.wait_for(lambda: self.plugged_size == size, timeout)

    def is_plugged(self, block: int) -> bool:
        """Whether block number ``block`` is plugged."""
        return bool(self._bits >> block & 1)

    # ----- requests -----
    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        """Serve one request; answer with a response, or ask for a reset if none fits."""
        memory = self.ctx.memory
        if chain.writable_len < RESP.size:
            self.fail(f"request with {chain.writable_len} writable bytes, a response needs {RESP.size}")
            return 0
        resp, state = self._serve(chain.read(memory, 0, REQ_LEN), memory)
        return chain.write(memory, 0, RESP.pack(resp, state))

    def _serve(self, req: bytes, memory) -> tuple:
        if len(req) < REQ_HEAD.size:
            return RESP_ERROR, 0
        (kind,) = REQ_HEAD.unpack_from(req)
        if kind == REQ_UNPLUG_ALL:
            return self._unplug_all(memory), 0
        if kind not in (REQ_PLUG, REQ_UNPLUG, REQ_STATE):
            log.debug("%s: unknown request type %d", self.name, kind)
            return RESP_ERROR, 0
        if len(req) < REQ_RANGE_OFFSET + REQ_RANGE.size:
            return RESP_ERROR, 0
        addr, count = REQ_RANGE.unpack_from(req, REQ_RANGE_OFFSET)
        with self._lock:
            first = self._block_range(addr, count)
            if first is None:
                return RESP_ERROR, 0
            mask = ((1 << count) - 1) << first
            if kind == REQ_STATE:
                got = self._bits & mask
                return RESP_ACK, STATE_PLUGGED if got == mask else STATE_UNPLUGGED if not got else STATE_MIXED
            size = count * self.block_size
            if kind == REQ_PLUG:
                if self.plugged_size + size > self.requested_size:
                    return RESP_NACK, 0
                if self._bits & mask:
                    return RESP_ERROR, 0  # some of it is plugged already
                self._bits |= mask
                self.plugged_size += size
                self._changed.notify_all()
                return RESP_ACK, 0
            if self._bits & mask != mask:
                return RESP_ERROR, 0  # some of it is not plugged
            try:
                memory.discard(addr, size)
            except (GuestMemoryError, HostMemoryError) as exc:
                log.warning("%s: unplug of %#x+%#x: %s", self.name, addr, size, exc)
                return RESP_ERROR, 0
            self._bits &= ~mask
            self.plugged_size -= size
            self._changed.notify_all()
            return RESP_ACK, 0

    def _block_range(self, addr: int, count: int):
        """The first block number of a request's range, or None when the range is bad."""
        if count == 0 or addr % self.block_size or addr < self.addr:
            return None
        if addr + count * self.block_size > self.addr + self.usable_region_size:
            return None  # also catches ranges that would wrap a 64-bit address
        return (addr - self.addr) // self.block_size

    def _unplug_all(self, memory) -> int:
        with self._lock:
            for first, count in _runs(self._bits):
                try:
                    memory.discard(self.addr + first * self.block_size, count * self.block_size)
                except (GuestMemoryError, HostMemoryError) as exc:
                    log.warning("%s: unplug all: %s", self.name, exc)
                    return RESP_ERROR
                self._bits &= ~(((1 << count) - 1) << first)
            self._bits = 0
            self.plugged_size = 0
            # Nothing is plugged: the usable region may shrink back to what the request needs.
            self.usable_region_size = self._usable_for(self.requested_size)
            self._changed.notify_all()
        return RESP_ACK

    # ----- snapshots -----
    def state(self) -> VirtioMemState:
        """Sizes and the plugged bitmap (the memory itself is in the memory file)."""
        with self._lock:
            return VirtioMemState(addr=self.addr, region_size=self.region_size, block_size=self.block_size,
                                  requested_size=self.requested_size,
                                  usable_region_size=self.usable_region_size,
                                  plugged=self._bits.to_bytes((self.nblocks + 7) // 8, "little"))

    def restore(self, state: VirtioMemState) -> None:
        """Take a saved state; the geometry must be this device's."""
        if state.version != 1:
            raise ValueError(f"virtio-mem state version {state.version} is not supported (expected 1)")
        mine = (self.addr, self.region_size, self.block_size)
        theirs = (state.addr, state.region_size, state.block_size)
        if mine != theirs:
            raise ValueError(f"{self.name}: the snapshot's region (addr, size, block size) {theirs} "
                             f"differs from this device's {mine}")
        bits = int.from_bytes(state.plugged, "little")
        if len(state.plugged) != (self.nblocks + 7) // 8 or bits >> self.nblocks:
            raise ValueError(f"{self.name}: the snapshot's plugged bitmap does not fit {self.nblocks} blocks")
        self.check_size(state.requested_size)
        plugged = bin(bits).count("1") * self.block_size
        highest = bits.bit_length() * self.block_size  # end of the last plugged block
        if not highest <= state.usable_region_size <= self.region_size:
            raise ValueError(f"{self.name}: the snapshot's usable region size {state.usable_region_size} "
                             f"is inconsistent")
        with self._lock:
            self._bits = bits
            self.plugged_size = plugged
            self.requested_size = state.requested_size
            self.usable_region_size = state.usable_region_size
            self._changed.notify_all()


def _runs(bits: int):
    """(first, count) of each run of set bits, lowest first."""
    pos = 0
    while bits:
        skip = (bits & -bits).bit_length() - 1
        bits >>= skip
        pos += skip
        count = (~bits & (bits + 1)).bit_length() - 1
        yield pos, count
        bits >>= count
        pos += count


def _fmt(size: int) -> str:
    from vmmkit.schema import format_size
    return format_size(size) if size else "0"
