"""Tests for the device side of split virtqueues (vmmkit.virtio.queue), no threads, no KVM.

A guest-side SplitQueueDriver writes the rings into an anonymous GuestMemory;
the Virtqueue under test is pointed at the same rings, as the transport would
after the driver's register writes. Everything the driver writes is hostile
input: every malformed chain must end in QueueError and nothing else.
"""

from __future__ import annotations

import random
import struct

import attrs
import pytest

from vmmkit.memory import GuestMemory
from vmmkit.testing import virtio_driver as vd
from vmmkit.testing.virtio_driver import GuestAllocator, SplitQueueDriver
from vmmkit.virtio.queue import DescriptorChain, QueueError, QueueState, Virtqueue

MiB = 1 << 20
RAM = 16 * MiB
PAGE = 4096
# Spelled out from the spec rather than imported from the code under test.
DESC = struct.Struct("<QIHH")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
# Fixed, page-aligned guest buffers for hand-written descriptors, well away
# from the allocator's rings (which start at 0x10000).
BUF = 0x800000


@pytest.fixture
def mem():
    m = GuestMemory.create(RAM)
    yield m
    m.close()


@pytest.fixture
def alloc():
    return GuestAllocator(0x10000, BUF)


def attach(mem, drv: SplitQueueDriver, *, max_size: int = 256, indirect: bool = False,
           event_idx: bool = False) -> Virtqueue:
    """Point a device-side queue at the driver's rings, as the transport does."""
    q = Virtqueue(max_size)
    q.size = drv.size
    q.desc_addr, q.avail_addr, q.used_addr = drv.desc_addr, drv.avail_addr, drv.used_addr
    q.ready = True
    q.indirect, q.event_idx = indirect, event_idx
    q.check(mem)
    return q


@pytest.fixture
def pair(mem, alloc):
    drv = SplitQueueDriver(mem, 8, alloc)
    return drv, attach(mem, drv)


@pytest.fixture
def ipair(mem, alloc):
    """A queue with VIRTIO_F_INDIRECT_DESC negotiated."""
    drv = SplitQueueDriver(mem, 8, alloc)
    return drv, attach(mem, drv, indirect=True)


def split(drv, head):
    bufs = drv.buffers(head)
    return [(a, n) for a, n, wr in bufs if not wr], [(a, n) for a, n, wr in bufs if wr]


def write_table(mem, addr, descs):
    for i, d in enumerate(descs):
        mem.write_obj(addr + 16 * i, DESC, *d)


def dirty_pages(mem):
    """Page numbers set in the VMM-side dirty bitmaps (taking them)."""
    pages = set()
    for base, bitmap in mem.take_dirty_pages().items():
        bits = int.from_bytes(bitmap, "little")
        pages |= {(base >> 12) + i for i in range(len(bitmap) * 8) if bits >> i & 1}
    return pages


# --- happy paths -----------------------------------------------------------------


@pytest.mark.parametrize("indirect", [False, True])
def test_pop_returns_the_driver_buffers(mem, alloc, indirect):
    drv = SplitQueueDriver(mem, 8, alloc)
    q = attach(mem, drv, indirect=indirect)
    heads = [drv.add_chain([b"abc", b"defgh"], [7, 9], indirect=indirect),
             drv.add_chain([b"x"], [], indirect=indirect),
             drv.add_chain([], [3], indirect=indirect)]
    assert q.pending(mem) == 3
    for head in heads:
        chain = q.pop(mem)
        assert isinstance(chain, DescriptorChain)
        assert chain.head == head
        readable, writable = split(drv, head)
        assert chain.readable == readable and chain.writable == writable
        assert chain.readable_len == sum(n for _, n in readable)
        assert chain.writable_len == sum(n for _, n in writable)
    assert q.pop(mem) is None
    assert q.pending(mem) == 0 and q.next_avail == 3


def test_pop_follows_avail_idx_across_the_16_bit_wrap(mem, alloc):
    drv = SplitQueueDriver(mem, 4, alloc)
    q = attach(mem, drv)
    drv.set_avail_idx(0xFFFE)
    q.next_avail = 0xFFFE
    heads = [drv.add_chain([bytes([i])], [1]) for i in range(2)]
    assert drv.avail_idx() == 0
    assert [q.pop(mem).head for _ in range(2)] == heads
    assert q.next_avail == 0 and q.pop(mem) is None


def test_chain_exactly_as_long_as_the_queue_is_accepted(mem, alloc):
    drv = SplitQueueDriver(mem, 4, alloc)
    q = attach(mem, drv)
    drv.add_raw([(BUF, 1, F_NEXT, 1), (BUF + 1, 1, F_NEXT, 2), (BUF + 2, 1, F_NEXT, 3), (BUF + 3, 1, F_WRITE, 0)])
    chain = q.pop(mem)
    assert chain.readable == [(BUF, 1), (BUF + 1, 1), (BUF + 2, 1)] and chain.writable == [(BUF + 3, 1)]


def test_zero_length_descriptors(mem, pair):
    drv, q = pair
    head = drv.add_chain([b"", b"ab"], [0, 4, 0])
    chain = q.pop(mem)
    assert chain.head == head
    assert [n for _, n in chain.readable] == [0, 2] and [n for _, n in chain.writable] == [0, 4, 0]
    assert chain.read(mem) == b"ab" and chain.readable_len == 2
    assert len(chain.writable_views(mem)) == 1  # empty buffers yield no views
    assert chain.write(mem, 0, b"wxyz!") == 4
    assert drv.in_buffers(head) == [b"", b"wxyz", b""]
    # A zero-length buffer is never touched, so its address is never used.
    drv.add_raw({5: (1 << 63, 0, F_NEXT, 6), 6: (BUF, 2, F_WRITE, 0)})
    chain = q.pop(mem)
    assert chain.readable == [(1 << 63, 0)] and chain.read(mem) == b""
    assert chain.write(mem, 0, b"ok") == 2 and mem.read(BUF, 2) == b"ok"


def test_add_used_is_seen_by_the_driver(mem, pair):
    drv, q = pair
    a = drv.add_chain([b"a"], [4])
    b = drv.add_chain([b"b"], [4])
    ca, cb = q.pop(mem), q.pop(mem)
    q.add_used(mem, cb.head, 3)  # out of order is allowed
    assert drv.used_idx() == 1
    assert drv.get_used() == [(b, 3)]
    q.add_used(mem, ca.head, 0)
    assert drv.get_used() == [(a, 0)]
    assert q.next_used == 2 and drv.num_free() == 8


def test_read_write_and_views_span_buffers(mem, pair):
    drv, q = pair
    head = drv.add_chain([b"0123", b"", b"456789", b"ab"], [3, 0, 5, 2])
    chain = q.pop(mem)
    assert chain.read(mem) == b"0123456789ab"
    assert chain.read(mem, 2, 5) == b"23456"
    assert chain.read(mem, 4) == b"456789ab"
    assert chain.read(mem, 11, 10) == b"b"
    assert chain.read(mem, 12) == b"" and chain.read(mem, 100, 3) == b""
    assert chain.read(mem, 3, 0) == b""
    views = chain.readable_views(mem, 3, 4)
    assert [bytes(v) for v in views] == [b"3", b"456"]

    assert chain.write(mem, 2, b"ABCDEFGH") == 8
    assert drv.in_buffers(head) == [b"\0\0A", b"", b"BCDEF", b"GH"]
    assert chain.write(mem, 8, b"xyz") == 2  # only two bytes left
    assert chain.write(mem, 10, b"nope") == 0
    assert drv.in_buffers(head)[3] == b"xy"
    views = chain.writable_views(mem, 1, 6)
    assert [len(v) for v in views] == [2, 4]
    views[0][:] = b"pq"
    views[1][:] = b"rstu"
    chain.mark_written(mem, 1, 6)
    assert drv.in_buffers(head) == [b"\0pq", b"", b"rstuF", b"xy"]


def test_dirty_log_sees_buffer_writes_and_used_ring(mem, pair):
    drv, q = pair
    # Readable at BUF; writable straddles a page boundary at BUF + 0x10800.
    drv.add_raw([(BUF, 64, F_NEXT, 1), (BUF + 0x10800, 0x1000, F_WRITE, 0)])
    chain = q.pop(mem)
    mem.start_dirty_log()
    assert dirty_pages(mem) == set()
    assert chain.write(mem, 0, b"\xaa" * 0x1000) == 0x1000
    q.add_used(mem, chain.head, 0x1000)
    pages = dirty_pages(mem)
    assert {(BUF + 0x10800) >> 12, (BUF + 0x11000) >> 12} <= pages
    assert (drv.used_addr + 2) >> 12 in pages and (drv.used_addr + 4) >> 12 in pages
    assert BUF >> 12 not in pages  # only read, never written

    # Zero-copy writes are logged once marked, for exactly the range written.
    v = chain.writable_views(mem, 0x900, 16)
    v[0][:] = bytes(16)
    assert dirty_pages(mem) == set()
    chain.mark_written(mem, 0x900, 16)
    assert dirty_pages(mem) == {(BUF + 0x11100) >> 12}

    mem.stop_dirty_log()
    chain.write(mem, 0, b"x")
    chain.mark_written(mem, 0, 0x1000)
    assert dirty_pages(mem) == set()


def _used_one(mem, drv, q):
    drv.add_chain([b"r"], [1])
    chain = q.pop(mem)
    q.add_used(mem, chain.head, 1)
    drv.get_used()


def test_needs_interrupt_without_event_idx_honours_no_interrupt(mem, pair):
    drv, q = pair
    assert not q.needs_interrupt(mem)  # nothing used yet
    _used_one(mem, drv, q)
    assert q.needs_interrupt(mem)
    assert not q.needs_interrupt(mem)  # nothing new since
    drv.set_no_interrupt(True)
    _used_one(mem, drv, q)
    assert not q.needs_interrupt(mem)
    drv.set_no_interrupt(False)
    _used_one(mem, drv, q)
    assert q.needs_interrupt(mem)


def test_needs_interrupt_with_event_idx_follows_used_event(mem, alloc):
    drv = SplitQueueDriver(mem, 16, alloc, event_idx=True)
    q = attach(mem, drv, event_idx=True)
    chains = []
    for i in range(6):
        drv.add_chain([bytes([i])], [1])
        chains.append(q.pop(mem))
    # used_event is 0: the first batch passes it.
    for c in chains[:3]:
        q.add_used(mem, c.head, 1)
    assert q.needs_interrupt(mem) is vd.vring_need_event(0, 3, 0) is True
    assert not q.needs_interrupt(mem)
    drv.set_used_event(5)  # wake me once used.idx passes 5
    old = 3
    for c, want in zip(chains[3:], (False, False, True)):
        q.add_used(mem, c.head, 1)
        new = q.next_used
        assert q.needs_interrupt(mem) is want is vd.vring_need_event(5, new, old)
        old = new
    # With EVENT_IDX the device ignores avail.flags (spec 2.7.7.2).
    drv.get_used()
    drv.set_no_interrupt(True)
    drv.set_used_event(6)
    drv.add_chain([b"z"], [1])
    q.add_used(mem, q.pop(mem).head, 1)
    assert q.needs_interrupt(mem)
    assert not q.needs_interrupt(mem)


def test_rearm_writes_avail_event_and_reports_pending(mem, alloc):
    drv = SplitQueueDriver(mem, 8, alloc, event_idx=True)
    q = attach(mem, drv, event_idx=True)
    drv.add_chain([b"a"], [1])
    drv.add_chain([b"b"], [1])
    q.pop(mem), q.pop(mem)
    assert q.rearm(mem) is False
    assert drv.avail_event() == 2
    drv.add_chain([b"c"], [1])  # posted after the device re-armed
    assert drv.kick_prepare()
    assert q.rearm(mem) is True
    assert drv.avail_event() == 2  # nothing more taken
    q.pop(mem)
    assert q.rearm(mem) is False and drv.avail_event() == 3


def test_rearm_without_event_idx_leaves_avail_event_alone(mem, pair):
    drv, q = pair
    drv.add_chain([b"a"], [1])
    assert q.rearm(mem) is True
    q.pop(mem)
    assert q.rearm(mem) is False
    assert drv.avail_event() == 0


def test_inspect_shows_both_sides_indices(mem, alloc):
    drv = SplitQueueDriver(mem, 8, alloc, event_idx=True)
    q = attach(mem, drv, event_idx=True)
    for b in (b"a", b"b", b"c"):
        drv.add_chain([b], [1])
    q.add_used(mem, q.pop(mem).head, 1)
    q.rearm(mem)
    drv.set_used_event(7)
    seen = q.inspect(mem)
    assert seen == {"ready": True, "size": 8, "event_idx": True, "next_avail": 1, "next_used": 1,
                    "signalled_used": 0, "avail_flags": 0, "avail_idx": 3, "used_event": 7, "used_idx": 1,
                    "avail_event": 1}
    q.needs_interrupt(mem)
    assert q.inspect(mem)["signalled_used"] == 1
    # Rings not set up yet: only the device's own indices.
    assert Virtqueue(8).inspect(mem) == {"ready": False, "size": 8, "event_idx": False, "next_avail": 0,
                                         "next_used": 0, "signalled_used": 0}


# --- hostile chains --------------------------------------------------------------


def expect_error(mem, q, match=None):
    with pytest.raises(QueueError, match=match):
        q.pop(mem)


def test_descriptor_loop(mem, pair):
    drv, q = pair
    drv.add_raw([(BUF, 16, F_NEXT, 1), (BUF + 16, 16, F_NEXT, 0)])
    expect_error(mem, q, "longer than the queue")


def test_self_loop(mem, pair):
    drv, q = pair
    drv.add_raw({3: (BUF, 16, F_NEXT | F_WRITE, 3)})
    expect_error(mem, q)


def test_chain_longer_than_the_queue(mem, alloc):
    # Five distinct descriptors in an indirect table of a 4-entry queue.
    drv = SplitQueueDriver(mem, 4, alloc)
    q = attach(mem, drv, indirect=True)
    table = BUF + 0x1000
    write_table(mem, table, [(BUF + i, 1, F_NEXT, i + 1) for i in range(4)] + [(BUF + 4, 1, 0, 0)])
    drv.add_raw([(table, 5 * 16, F_INDIRECT, 0)])
    expect_error(mem, q, "longer than the queue")


@pytest.mark.parametrize("addr,length", [
    (RAM, 16),                 # just past the end of RAM
    (RAM - 8, 16),             # straddles the end
    (0xFEE00000, 4),           # in the MMIO hole, nowhere near RAM
    (1 << 40, 1),
])
def test_buffer_outside_ram(mem, pair, addr, length):
    drv, q = pair
    drv.add_raw([(BUF, 16, F_NEXT, 1), (addr, length, F_WRITE, 0)])
    expect_error(mem, q, "outside guest RAM")


@pytest.mark.parametrize("addr,length", [((1 << 64) - 8, 16), ((1 << 64) - 1, 0xFFFFFFFF)])
def test_buffer_address_overflows_64_bits(mem, pair, addr, length):
    drv, q = pair
    drv.add_raw([(addr, length, 0, 0)])
    expect_error(mem, q, "outside guest RAM")


def test_next_index_beyond_the_queue(mem, pair):
    drv, q = pair
    drv.add_raw([(BUF, 16, F_NEXT, 8)])
    expect_error(mem, q, "next index 8")
    drv.add_raw({2: (BUF, 16, F_NEXT, 0xFFFF)})
    expect_error(mem, q, "next index 65535")


@pytest.mark.parametrize("head", [8, 0xFFFF])
def test_head_beyond_the_queue(mem, pair, head):
    drv, q = pair
    drv.publish(head)
    expect_error(mem, q, f"head {head}")


def test_avail_idx_jumping_past_the_queue_size(mem, pair):
    drv, q = pair
    drv.set_avail_idx(9)
    with pytest.raises(QueueError, match="more than the queue size"):
        q.pending(mem)
    expect_error(mem, q)
    with pytest.raises(QueueError):
        q.rearm(mem)
    # Moving backwards is a huge jump forwards, mod 2**16.
    drv.set_avail_idx(0xFFFF)
    expect_error(mem, q)


def test_avail_idx_a_full_queue_ahead_is_fine(mem, pair):
    drv, q = pair
    drv.set_avail_idx(8)  # eight copies of head 0, a zeroed (empty) descriptor
    chains = [q.pop(mem) for _ in range(8)]
    assert all(c.head == 0 and c.readable == [(0, 0)] for c in chains)
    assert q.pop(mem) is None


def test_readable_after_writable(mem, pair):
    drv, q = pair
    drv.add_raw([(BUF, 16, F_WRITE | F_NEXT, 1), (BUF + 16, 16, 0, 0)])
    expect_error(mem, q, "device-readable buffer after a device-writable")


def test_readable_after_writable_inside_an_indirect_table(mem, ipair):
    drv, q = ipair
    table = BUF + 0x1000
    write_table(mem, table, [(BUF, 16, F_WRITE | F_NEXT, 1), (BUF + 16, 16, 0, 0)])
    drv.add_raw([(table, 32, F_INDIRECT, 0)])
    expect_error(mem, q, "device-readable buffer after")


def test_indirect_not_negotiated(mem, pair):
    drv, q = pair
    table = BUF + 0x1000
    write_table(mem, table, [(BUF, 16, 0, 0)])
    drv.add_raw([(table, 16, F_INDIRECT, 0)])
    expect_error(mem, q, "INDIRECT_DESC was not negotiated")


def test_indirect_with_next(mem, ipair):
    drv, q = ipair
    table = BUF + 0x1000
    write_table(mem, table, [(BUF, 16, 0, 0)])
    drv.add_raw([(table, 16, F_INDIRECT | F_NEXT, 1), (BUF, 16, F_WRITE, 0)])
    expect_error(mem, q, "indirect descriptor with NEXT")


@pytest.mark.parametrize("length", [0, 8, 24, 17])
def test_indirect_table_length_not_a_multiple_of_16(mem, ipair, length):
    drv, q = ipair
    table = BUF + 0x1000
    write_table(mem, table, [(BUF, 16, 0, 0), (BUF, 16, 0, 0)])
    drv.add_raw([(table, length, F_INDIRECT, 0)])
    expect_error(mem, q, f"indirect table length {length}")


def test_nested_indirect(mem, ipair):
    drv, q = ipair
    outer, inner = BUF + 0x1000, BUF + 0x2000
    write_table(mem, inner, [(BUF, 16, 0, 0)])
    write_table(mem, outer, [(inner, 16, F_INDIRECT, 0)])
    drv.add_raw([(outer, 16, F_INDIRECT, 0)])
    expect_error(mem, q, "indirect descriptor inside an indirect table")


@pytest.mark.parametrize("addr,length", [(RAM, 16), (RAM - 16, 32), ((1 << 64) - 16, 32), (1 << 50, 0xFFFFFFF0)])
def test_indirect_table_outside_ram(mem, ipair, addr, length):
    drv, q = ipair
    drv.add_raw([(addr, length, F_INDIRECT, 0)])
    expect_error(mem, q, "indirect table at")


def test_indirect_next_beyond_the_table(mem, ipair):
    drv, q = ipair
    table = BUF + 0x1000
    # Entry 2 exists in memory, but the table is only two entries long.
    write_table(mem, table, [(BUF, 16, F_NEXT, 2), (BUF, 16, 0, 0), (BUF, 16, 0, 0)])
    drv.add_raw([(table, 32, F_INDIRECT, 0)])
    expect_error(mem, q, r"next index 2 is outside its table \(2 entries\)")


def test_loop_inside_an_indirect_table(mem, ipair):
    drv, q = ipair
    table = BUF + 0x1000
    write_table(mem, table, [(BUF, 16, F_NEXT, 1), (BUF + 16, 16, F_NEXT, 0)])
    drv.add_raw([(table, 32, F_INDIRECT, 0)])
    expect_error(mem, q, "longer than the queue")


def test_buffer_outside_ram_inside_an_indirect_table(mem, ipair):
    drv, q = ipair
    table = BUF + 0x1000
    write_table(mem, table, [(BUF, 16, F_NEXT, 1), ((1 << 64) - 4, 8, F_WRITE, 0)])
    drv.add_raw([(table, 32, F_INDIRECT, 0)])
    expect_error(mem, q, "outside guest RAM")


def test_queue_keeps_working_after_a_bad_chain(mem, pair):
    drv, q = pair
    drv.add_raw({7: (RAM, 16, 0, 0)})
    expect_error(mem, q)
    head = drv.add_chain([b"fine"], [2])
    chain = q.pop(mem)
    assert chain.head == head and chain.read(mem) == b"fine"


# --- check() -----------------------------------------------------------------------


def good_queue(mem, alloc, size=8):
    drv = SplitQueueDriver(mem, size, alloc)
    return attach(mem, drv)


@pytest.mark.parametrize("size", [0, 3, 6, 255, 512, 1 << 16])
def test_check_rejects_bad_sizes(mem, alloc, size):
    q = good_queue(mem, alloc)
    q.size = size
    with pytest.raises(QueueError, match="power of two"):
        q.check(mem)


@pytest.mark.parametrize("ring,delta", [("desc_addr", 8), ("desc_addr", 1), ("avail_addr", 1), ("used_addr", 2)])
def test_check_rejects_misaligned_rings(mem, alloc, ring, delta):
    q = good_queue(mem, alloc)
    setattr(q, ring, getattr(q, ring) + delta)
    with pytest.raises(QueueError, match="aligned"):
        q.check(mem)


@pytest.mark.parametrize("ring,addr", [
    ("desc_addr", RAM - 16 * 4),      # table of 8 runs past the end
    ("desc_addr", RAM),
    ("avail_addr", RAM - 8),
    ("used_addr", RAM - 16),
    ("used_addr", (1 << 64) - 4),
    ("desc_addr", 1 << 48),
])
def test_check_rejects_rings_outside_ram(mem, alloc, ring, addr):
    q = good_queue(mem, alloc)
    setattr(q, ring, addr)
    with pytest.raises(QueueError, match="outside guest RAM"):
        q.check(mem)


def test_check_accepts_the_largest_queue_and_rings_at_the_end_of_ram(mem):
    q = Virtqueue(32768)
    q.size = 32768
    q.used_addr = RAM - 6 - 8 * 32768 - 2  # 4-aligned, ends 2 bytes before the end
    q.avail_addr = q.used_addr - (6 + 2 * 32768) - 2
    q.desc_addr = 0
    q.check(mem)
    assert q.pop(mem) is None


@pytest.mark.parametrize("max_size", [0, 3, 65536])
def test_constructor_rejects_bad_max_size(max_size):
    with pytest.raises(ValueError):
        Virtqueue(max_size)


# --- fuzzing -----------------------------------------------------------------------


def test_fuzz_pop_yields_valid_chains_or_queue_error(mem, alloc):
    rng = random.Random(0x5EED)
    size = 8
    drv = SplitQueueDriver(mem, size, alloc)
    q = attach(mem, drv, indirect=True)
    tables = [BUF + 0x1000 * i for i in range(4)]  # candidate indirect tables, in RAM

    def rand_addr():
        kind = rng.randrange(6)
        if kind == 0:
            return rng.randrange(BUF, RAM)                   # inside RAM (data area)
        if kind == 1:
            return RAM - rng.randrange(0, 64)                # at the end of RAM
        if kind == 2:
            return (1 << 64) - rng.randrange(1, 1 << 16)     # wraps
        if kind == 3:
            return rng.choice(tables) + 16 * rng.randrange(0, 3)
        if kind == 4:
            return rng.randrange(0, 1 << 64)
        return rng.randrange(0, 1 << 32)

    def rand_len():
        return rng.choice([0, 1, 16, 32, 48, 64, 4096, rng.randrange(0, 1 << 12), rng.randrange(0, 1 << 32),
                           0xFFFFFFFF])

    def rand_flags():
        return rng.randrange(0, 8) if rng.random() < 0.9 else rng.randrange(0, 1 << 16)

    def rand_next():
        return rng.randrange(0, size) if rng.random() < 0.8 else rng.randrange(0, 1 << 16)

    def rand_desc():
        return rand_addr(), rand_len(), rand_flags(), rand_next()

    outcomes = {"chain": 0, "empty": 0, "error": 0}
    for _ in range(2000):
        for i in range(size):
            mem.write_obj(drv.desc_addr + 16 * i, DESC, *rand_desc())
        for t in tables:
            for i in range(rng.randrange(0, 5)):
                mem.write_obj(t + 16 * i, DESC, *rand_desc())
        for slot in range(size):
            head = rng.randrange(0, size) if rng.random() < 0.9 else rng.randrange(0, 1 << 16)
            mem.write_u16(drv.avail_addr + 4 + 2 * slot, head)
        ahead = rng.randrange(0, size + 1) if rng.random() < 0.9 else rng.randrange(0, 1 << 16)
        mem.write_u16(drv.avail_addr + 2, (q.next_avail + ahead) & 0xFFFF)
        try:
            chain = q.pop(mem)
        except QueueError:
            outcomes["error"] += 1
            continue
        if chain is None:
            outcomes["empty"] += 1
            continue
        outcomes["chain"] += 1
        assert 0 <= chain.head < size
        assert len(chain.readable) + len(chain.writable) <= size
        for addr, length in chain.readable + chain.writable:
            assert length == 0 or mem.is_ram(addr, length), (addr, length)
        # Whatever was accepted can be accessed without any other error.
        chain.read(mem, 0, 256)
        chain.write(mem, 0, bytes(min(chain.writable_len, 64)))
    # The generator reached every outcome, so the assertions above were exercised.
    assert all(outcomes.values()), outcomes


# --- snapshots ---------------------------------------------------------------------


def test_state_restore_round_trip(mem, alloc):
    drv = SplitQueueDriver(mem, 8, alloc, event_idx=True)
    q = attach(mem, drv, indirect=True, event_idx=True)
    for i in range(3):
        drv.add_chain([bytes([i])], [1])
    for _ in range(2):
        c = q.pop(mem)
        q.add_used(mem, c.head, 1)
    q.needs_interrupt(mem)
    state = q.state()
    assert isinstance(state, QueueState)
    assert (state.size, state.next_avail, state.next_used, state.signalled_used) == (8, 2, 2, 2)
    assert state.ready and state.indirect and state.event_idx
    assert (state.desc_addr, state.avail_addr, state.used_addr) == (drv.desc_addr, drv.avail_addr, drv.used_addr)

    q2 = Virtqueue(256)
    q2.restore(state)
    assert q2.state() == state
    q2.check(mem)
    chain = q2.pop(mem)  # carries on where the first queue stopped
    assert chain.read(mem) == b"\x02"
    q2.add_used(mem, chain.head, 1)
    assert [n for _, n in drv.get_used()] == [1, 1, 1]

    with pytest.raises(ValueError, match="version"):
        q2.restore(attrs.evolve(state, version=2))


def test_reset_forgets_everything(mem, pair):
    drv, q = pair
    drv.add_chain([b"a"], [1])
    q.pop(mem)
    q.reset()
    assert q.state() == QueueState(size=256)
