"""Tests for the guest-side virtio driver in vmmkit.testing.virtio_driver (host only, no KVM).

No device model exists yet, so these check the driver against the virtio 1.1
spec by reading guest memory directly, and play the device by hand-writing
used rings and by a small fake MMIO register file.
"""

from __future__ import annotations

import struct
from typing import Dict, List, Tuple

import pytest

from vmmkit.memory import GuestMemory
from vmmkit.testing import virtio_driver as vd
from vmmkit.testing.virtio_driver import (
    GuestAllocator, MmioDriver, QueueFullError, SplitQueueDriver, VirtioDriverError)

MiB = 1 << 20
# Spelled out from the spec rather than imported, so a typo in the module shows.
DESC = struct.Struct("<QIHH")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


@pytest.fixture
def mem():
    m = GuestMemory.create(4 * MiB)
    yield m
    m.close()


@pytest.fixture
def alloc():
    return GuestAllocator(0x10000, 4 * MiB)


def desc(mem, q, i) -> Tuple[int, int, int, int]:
    return DESC.unpack(mem.read(q.desc_addr + 16 * i, 16))


def avail(mem, q) -> Tuple[int, int, List[int]]:
    flags, idx = struct.unpack("<HH", mem.read(q.avail_addr, 4))
    ring = list(struct.unpack(f"<{q.size}H", mem.read(q.avail_addr + 4, 2 * q.size)))
    return flags, idx, ring


def complete(mem, q, entries, used_idx: List[int]) -> None:
    """Play the device: append (id, len) entries to the used ring, then bump used.idx."""
    for vid, vlen in entries:
        mem.write(q.used_addr + 4 + 8 * (used_idx[0] % q.size), struct.pack("<II", vid, vlen))
        used_idx[0] = (used_idx[0] + 1) & 0xFFFF
    mem.write_u16(q.used_addr + 2, used_idx[0])


# --- allocator -------------------------------------------------------------------


def test_allocator_aligns_exhausts_and_reuses():
    a = GuestAllocator(0x1001, 0x1100)
    assert a.alloc(3, 16) == 0x1010
    assert a.alloc(1, 2) == 0x1014
    assert a.alloc(4, 4) == 0x1018
    with pytest.raises(MemoryError):
        a.alloc(0x100)
    a.free(0x1010, 3)
    assert a.alloc(3, 8) == 0x1010  # pooled block, alignment still honoured
    with pytest.raises(ValueError):
        a.alloc(1, 3)


# --- layout ----------------------------------------------------------------------


def test_ring_layout_sizes_and_alignment(mem, alloc):
    q = SplitQueueDriver(mem, 8, alloc)
    assert q.desc_addr % 16 == 0 and q.avail_addr % 2 == 0 and q.used_addr % 4 == 0
    # Spec §2.6: 16*N, 6+2*N, 6+8*N bytes, non-overlapping.
    assert q.avail_addr >= q.desc_addr + 16 * 8
    assert q.used_addr >= q.avail_addr + 6 + 2 * 8
    assert alloc.next >= q.used_addr + 6 + 8 * 8
    assert avail(mem, q) == (0, 0, [0] * 8)
    for bad in (0, 3, 65536):
        with pytest.raises(ValueError):
            SplitQueueDriver(mem, bad, alloc)


def test_add_chain_descriptor_layout(mem, alloc):
    q = SplitQueueDriver(mem, 8, alloc)
    head = q.add_chain([b"hdr!", b"payload"], [16, 1])
    assert head == 0
    chain = [desc(mem, q, i) for i in range(4)]
    assert [d[1] for d in chain] == [4, 7, 16, 1]
    assert [d[2] for d in chain] == [F_NEXT, F_NEXT, F_NEXT | F_WRITE, F_WRITE]
    assert [d[3] for d in chain[:3]] == [1, 2, 3]
    assert mem.read(chain[0][0], 4) == b"hdr!" and mem.read(chain[1][0], 7) == b"payload"
    assert mem.read(chain[2][0], 16) == bytes(16)
    assert q.buffers(head) == [(d[0], d[1], bool(d[2] & F_WRITE)) for d in chain]
    assert avail(mem, q) == (0, 1, [0] + [0] * 7)
    head2 = q.add_chain([b"x"], [])
    assert head2 == 4 and desc(mem, q, 4)[2] == 0
    flags, idx, ring = avail(mem, q)
    assert idx == 2 and ring[:2] == [0, 4]
    # The device writes into an in-buffer; the driver sees it.
    mem.write(chain[2][0], b"A" * 16)
    assert q.in_buffers(head) == [b"A" * 16, b"\0"]


def test_indirect_chain_layout(mem, alloc):
    q = SplitQueueDriver(mem, 4, alloc)
    head = q.add_chain([b"out"], [8, 2], indirect=True)
    addr, length, flags, _next = desc(mem, q, head)
    assert flags == F_INDIRECT and length == 3 * 16 and addr % 16 == 0
    table = [DESC.unpack(mem.read(addr + 16 * i, 16)) for i in range(3)]
    assert [t[1] for t in table] == [3, 8, 2]
    assert [t[2] for t in table] == [F_NEXT, F_NEXT | F_WRITE, F_WRITE]
    assert [t[3] for t in table[:2]] == [1, 2]
    assert mem.read(table[0][0], 3) == b"out"
    assert q.num_free() == 3  # one ring descriptor only
    assert avail(mem, q)[1:] == (1, [head, 0, 0, 0])


def test_free_list_recycling_and_queue_full(mem, alloc):
    q = SplitQueueDriver(mem, 4, alloc)
    a = q.add_chain([b"a"], [1])
    b = q.add_chain([b"b"], [1])
    assert (a, b) == (0, 2) and q.num_free() == 0
    with pytest.raises(QueueFullError):
        q.add_chain([b"c"], [])
    used = [0]
    complete(mem, q, [(b, 1)], used)
    assert q.get_used() == [(b, 1)]
    assert q.num_free() == 2
    # Completed chain's buffers stay readable until its head is reused.
    assert q.in_buffers(b) == [b"\0"]
    # LIFO like Linux: the freed chain's head comes back first, in chain order.
    c = q.add_chain([b"c"], [1])
    assert c == 2 and desc(mem, q, 2)[3] == 3
    complete(mem, q, [(a, 0), (c, 1)], used)
    assert q.get_used() == [(a, 0), (c, 1)]
    assert q.get_used() == []
    assert q.num_free() == 4


def test_get_used_rejects_device_bugs(mem, alloc):
    q = SplitQueueDriver(mem, 4, alloc)
    q.add_chain([b"a"], [])
    used = [0]
    complete(mem, q, [(3, 0)], used)
    with pytest.raises(VirtioDriverError, match="not in flight"):
        q.get_used()
    q2 = SplitQueueDriver(mem, 4, alloc)
    q2.add_chain([b"a"], [])
    mem.write_u16(q2.used_addr + 2, 5)
    with pytest.raises(VirtioDriverError, match="in flight"):
        q2.get_used()


def test_index_wraparound_many_cycles(mem, alloc):
    q = SplitQueueDriver(mem, 4, alloc)
    used = [0]
    start = alloc.next
    cycles = 65536 + 300
    for i in range(cycles):
        h1 = q.add_chain([b"p"], [1])
        h2 = q.add_chain([b"q"], [])
        complete(mem, q, [(h2, 0), (h1, 1)], used)
        assert q.get_used() == [(h2, 0), (h1, 1)]
    assert q.avail_idx() == (2 * cycles) & 0xFFFF
    assert avail(mem, q)[1] == (2 * cycles) & 0xFFFF
    assert q.used_idx() == (2 * cycles) & 0xFFFF
    assert q.num_free() == 4
    assert alloc.next - start < 4096  # buffer memory is reused, not leaked


def test_raw_tools(mem, alloc):
    q = SplitQueueDriver(mem, 4, alloc)
    loop = [(0x2000, 16, F_NEXT, 1), (0x2010, 16, F_NEXT, 0)]
    head = q.add_raw(loop)
    assert head == 0 and desc(mem, q, 0) == loop[0] and desc(mem, q, 1) == loop[1]
    assert avail(mem, q)[1:] == (1, [0, 0, 0, 0])
    # Raw slots are taken out of the free list, so add_chain keeps off them.
    assert q.add_chain([b"x"], []) == 2
    q.add_raw({3: (1 << 63, 0xFFFFFFFF, F_INDIRECT, 0xFFFF)})
    assert desc(mem, q, 3) == (1 << 63, 0xFFFFFFFF, F_INDIRECT, 0xFFFF)
    q.publish(9999)
    assert avail(mem, q)[1:] == (4, [0, 2, 3, 9999])
    q.set_avail_idx(0xFFF0)
    assert avail(mem, q)[1] == 0xFFF0 and q.avail_idx() == 0xFFF0
    # Raw heads are accepted once as used ids, without error.
    complete(mem, q, [(9999, 0), (0, 0)], [0])
    assert q.get_used() == [(9999, 0), (0, 0)]


def test_event_idx_fields(mem, alloc):
    q = SplitQueueDriver(mem, 8, alloc, event_idx=True)
    q.set_used_event(0x1234)
    assert mem.read_u16(q.avail_addr + 4 + 2 * 8) == 0x1234 == q.used_event()
    mem.write_u16(q.used_addr + 4 + 8 * 8, 0xBEEF)
    assert q.avail_event() == 0xBEEF
    q.set_no_interrupt(True)
    assert mem.read_u16(q.avail_addr) == vd.VIRTQ_AVAIL_F_NO_INTERRUPT
    q.set_no_interrupt(False)
    assert mem.read_u16(q.avail_addr) == 0
    mem.write_u16(q.used_addr, vd.VIRTQ_USED_F_NO_NOTIFY)
    assert q.used_flags() == 1
    # get_used moves used_event along, as Linux does.
    h = q.add_chain([b"a"], [])
    complete(mem, q, [(h, 0)], [0])
    q.get_used()
    assert q.used_event() == 1
    # kick_prepare: kick only when the new entries pass avail_event (idx 1 -> 2 passes 1).
    mem.write_u16(q.used_addr + 4 + 8 * 8, 1)
    assert not q.kick_prepare()  # entries 0..0 published; event 1 not yet reached
    q.add_chain([b"b"], [])
    assert q.kick_prepare()
    q.add_chain([b"c"], [])
    assert not q.kick_prepare()
    mem.write_u16(q.used_addr + 4 + 8 * 8, 3)
    q.add_chain([b"d"], [])
    assert q.kick_prepare()
    # Without event_idx the device's NO_NOTIFY flag decides.
    q2 = SplitQueueDriver(mem, 4, alloc)
    q2.add_chain([b"e"], [])
    assert q2.kick_prepare()
    mem.write_u16(q2.used_addr, vd.VIRTQ_USED_F_NO_NOTIFY)
    q2.add_chain([b"f"], [])
    assert not q2.kick_prepare()


def test_vring_need_event():
    assert vd.vring_need_event(0, 1, 0)
    assert not vd.vring_need_event(1, 1, 0)
    assert vd.vring_need_event(0xFFFF, 1, 0xFFFE)  # across the wrap
    assert not vd.vring_need_event(5, 3, 0)


# --- MMIO transport --------------------------------------------------------------


QUEUE_REGS = {0x038, 0x044, 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4}


class FakeMmio:
    """A minimal virtio-MMIO v2 register file that records every write."""

    def __init__(self, features: int, num_max: int = 16, refuse: bool = False) -> None:
        self.regs: Dict[int, int] = {0x000: 0x74726976, 0x004: 2, 0x008: 2, 0x00C: 0x554D4551}
        self.features, self.num_max, self.refuse = features, num_max, refuse
        self.writes: List[Tuple[int, int]] = []
        self.queues: Dict[int, Dict[int, int]] = {}
        self.config = bytearray(range(32))
        self.generation = 0
        self.driver_features = 0

    def bus_read(self, offset: int, size: int) -> bytes:
        if offset >= 0x100:
            return bytes(self.config[offset - 0x100:offset - 0x100 + size])
        assert size == 4 and offset % 4 == 0
        sel = self.regs.get(0x030, 0)
        if offset == 0x010:
            value = (self.features >> (32 * self.regs.get(0x014, 0))) & 0xFFFFFFFF
        elif offset == 0x034:
            value = self.num_max if sel < 2 else 0
        elif offset == 0x044:
            value = self.queues.get(sel, {}).get(0x044, 0)
        elif offset == 0x0FC:
            value = self.generation
        else:
            value = self.regs.get(offset, 0)
        return value.to_bytes(4, "little")

    def bus_write(self, offset: int, data: bytes) -> None:
        if offset >= 0x100:
            self.config[offset - 0x100:offset - 0x100 + len(data)] = data
            return
        value = int.from_bytes(data, "little")
        self.writes.append((offset, value))
        if offset == 0x020:
            half = self.regs.get(0x024, 0)
            mask = 0xFFFFFFFF << (32 * half)
            self.driver_features = (self.driver_features & ~mask) | (value << (32 * half))
        elif offset in QUEUE_REGS:
            self.queues.setdefault(self.regs.get(0x030, 0), {})[offset] = value
        if offset == 0x070 and value & 8 and self.refuse:
            value &= ~8
        self.regs[offset] = value

    def statuses(self) -> List[int]:
        return [v for off, v in self.writes if off == 0x070]


FEATURES = (1 << vd.VIRTIO_F_VERSION_1) | (1 << vd.VIRTIO_F_EVENT_IDX) | (1 << 5)


def test_mmio_init_sequence(mem, alloc):
    dev = FakeMmio(FEATURES)
    drv = MmioDriver(dev, mem, alloc)
    assert (drv.magic(), drv.version(), drv.device_id()) == (0x74726976, 2, 2)
    assert drv.device_features() == FEATURES
    qs = drv.init(queues=2, queue_size=8, event_idx=True)
    assert dev.statuses() == [0, 1, 3, 11, 15]
    assert dev.driver_features == (1 << 32) | (1 << 29)
    assert len(qs) == 2 and all(q.size == 8 and q.event_idx for q in qs)
    for i, q in enumerate(qs):
        regs = dev.queues[i]
        assert regs[0x038] == 8 and regs[0x044] == 1
        assert regs[0x080] | regs[0x084] << 32 == q.desc_addr
        assert regs[0x090] | regs[0x094] << 32 == q.avail_addr
        assert regs[0x0A0] | regs[0x0A4] << 32 == q.used_addr
    # Queue registers are written in Linux's order, QueueReady last.
    q0 = [off for off, _ in dev.writes if off in QUEUE_REGS][:8]
    assert q0 == [0x038, 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4, 0x044]
    drv.notify(1)
    assert dev.writes[-1] == (vd.VIRTIO_MMIO_QUEUE_NOTIFY, 1)
    dev.regs[0x060] = 3
    assert drv.interrupt_status() == 3
    drv.ack_interrupt(1)
    assert dev.writes[-1] == (vd.VIRTIO_MMIO_INTERRUPT_ACK, 1)


def test_mmio_init_accept_and_queue_size_cap(mem, alloc):
    dev = FakeMmio(FEATURES, num_max=4)
    qs = MmioDriver(dev, mem, alloc).init(accept=1 << 5, queue_size=256)
    assert dev.driver_features == 1 << 5 and qs[0].size == 4 and not qs[0].event_idx


def test_mmio_features_refused(mem, alloc):
    dev = FakeMmio(FEATURES, refuse=True)
    with pytest.raises(RuntimeError, match="refused"):
        MmioDriver(dev, mem, alloc).init()
    assert dev.statuses() == [0, 1, 3, 11, 3 | vd.STATUS_FAILED]


def test_mmio_missing_queue_and_version_1(mem, alloc):
    dev = FakeMmio(FEATURES)
    with pytest.raises(RuntimeError, match="does not exist"):
        MmioDriver(dev, mem, alloc).init(queues=3)
    assert dev.statuses()[-1] & vd.STATUS_FAILED
    with pytest.raises(RuntimeError, match="VERSION_1"):
        MmioDriver(FakeMmio(1 << 5), mem, alloc).init()


def test_config_access_and_generation_retry(mem, alloc):
    dev = FakeMmio(FEATURES)
    drv = MmioDriver(dev, mem, alloc)
    assert drv.config_read(4, 8) == bytes(range(4, 12))
    drv.config_write(0, b"\xaa\xbb")
    assert drv.config_read(0, 2) == b"\xaa\xbb"
    # Generation changes during the first read: the driver must read again.
    reads = []
    orig = dev.bus_read

    def racing_read(offset, size):
        if offset == 0x0FC:
            reads.append(offset)
            if len(reads) == 2:
                dev.generation += 1
        return orig(offset, size)

    dev.bus_read = racing_read
    assert drv.config_read(8, 4) == bytes(range(8, 12))
    assert len(reads) == 4

    def unstable_read(offset, size):
        if offset == 0x0FC:
            dev.generation += 1
        return orig(offset, size)

    dev.bus_read = unstable_read
    with pytest.raises(RuntimeError, match="generation"):
        drv.config_read(0, 4)
