"""Host-only tests for vmmkit.memory (no KVM needed).

Guest RAM here is real anonymous/memfd memory mapped with MAP_NORESERVE, so
even the multi-GiB layouts cost only the pages the tests touch. The host
memory pre-check is pointed at a fake /proc/meminfo where a test needs a
size the CI host may not have.
"""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from vmmkit import memory
from vmmkit.boot import layout
from vmmkit.errors import VmmkitError
from vmmkit.memory import GuestMemory, GuestMemoryError, HostMemoryError, KVM_MEM_LOG_DIRTY_PAGES

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
HOLE = layout.MMIO_HOLE_START
HIGH = layout.MMIO_HOLE_END


@pytest.fixture
def big_host(monkeypatch):
    """Pretend the host has 1 TiB of RAM so size checks never get in the way."""
    fake = {"MemTotal": 1 << 40, "MemAvailable": 1 << 40, "SwapTotal": 0, "SwapFree": 0}
    monkeypatch.setattr(memory, "host_meminfo", lambda path="/proc/meminfo": dict(fake))


@pytest.fixture
def mem(big_host):
    """5 GiB guest: low region 0..3G, high region 4G..6G."""
    m = GuestMemory.create(5 * GiB)
    yield m
    m.close()


class FakeVm:
    """Records set_user_memory_region calls and serves canned dirty logs."""

    def __init__(self, logs=None):
        self.calls = []
        self.logs = logs or {}
        self.dirty_calls = []

    def set_user_memory_region(self, slot, flags, gpa, size, host_addr):
        self.calls.append((slot, flags, gpa, size, host_addr))

    def get_dirty_log(self, slot, npages):
        self.dirty_calls.append((slot, npages))
        return self.logs.get(slot, bytes(((npages + 63) // 64) * 8))


# --- Layout -------------------------------------------------------------------


@pytest.mark.parametrize("size, expected", [
    (512 * MiB, [(0, 512 * MiB)]),
    (3 * GiB, [(0, 3 * GiB)]),
    (4 * GiB, [(0, 3 * GiB), (HIGH, 1 * GiB)]),
    (5 * GiB, [(0, 3 * GiB), (HIGH, 2 * GiB)]),
])
def test_regions_split_around_hole(big_host, size, expected):
    with GuestMemory.create(size) as m:
        assert [(r.gpa, r.size) for r in m.regions] == expected
        assert m.size == size
        assert [r.slot for r in m.regions] == list(range(len(expected)))
        assert all(r.kind == "ram" for r in m.regions)
        for r in m.regions:
            assert isinstance(r.mm, mmap.mmap) and len(r.mm) >= r.mm_offset + r.size
            # Huge-page aligned like the guest addresses, so KVM can map 2 MiB pages.
            assert r.host_addr % (2 << 20) == r.gpa % (2 << 20) == 0 and r.host_addr > 0
            assert r.fd is None


def test_host_addr_is_the_mapping(big_host):
    import ctypes
    with GuestMemory.create(16 * MiB) as m:
        m.write(0x1234, b"hello")
        r = m.regions[0]
        assert ctypes.string_at(r.host_addr + 0x1234, 5) == b"hello"


# --- Bounds checks --------------------------------------------------------------


def test_edges_of_low_region(mem):
    mem.write(HOLE - 1, b"\x5a")                  # last byte of low RAM
    assert mem.read(HOLE - 1, 1) == b"\x5a"
    mem.write(HOLE - 8, b"12345678")
    assert mem.read_u64(HOLE - 8) == struct.unpack("<Q", b"12345678")[0]
    with pytest.raises(GuestMemoryError, match=r"0xbfffffff.*0x2"):
        mem.read(HOLE - 1, 2)                       # one byte into the hole
    with pytest.raises(GuestMemoryError):
        mem.read(HOLE, 1)                           # the hole itself
    with pytest.raises(GuestMemoryError):
        mem.read(0xD000_0000, 4)                    # virtio-mmio window
    with pytest.raises(GuestMemoryError):
        mem.write(HIGH - 1, b"\0\0")                # straddles hole -> high RAM
    with pytest.raises(GuestMemoryError):
        mem.read(HOLE - 4, 8 + layout.MMIO_HOLE_SIZE)  # spans hole into high region


def test_edges_of_high_region(mem):
    end = HIGH + 2 * GiB
    mem.write(HIGH, b"\x01")                        # first byte of high RAM
    mem.write(end - 1, b"\x02")                     # last byte of RAM
    assert mem.read(HIGH, 1) == b"\x01" and mem.read(end - 1, 1) == b"\x02"
    with pytest.raises(GuestMemoryError):
        mem.read(end, 1)                            # one past the end
    with pytest.raises(GuestMemoryError):
        mem.read(end - 1, 2)
    with pytest.raises(GuestMemoryError):
        mem.write(end - 4, b"\0" * 8)


def test_straddling_two_adjacent_regions(big_host):
    with GuestMemory.create(64 * MiB, hotplug_size=256 * MiB) as m:
        # Two regions that touch: still one access may not cover both.
        m.add_region(m.hotplug_base, 128 * MiB)
        m.add_region(m.hotplug_base + 128 * MiB, 128 * MiB)
        m.write(m.hotplug_base + 128 * MiB - 1, b"a")
        m.write(m.hotplug_base + 128 * MiB, b"b")
        with pytest.raises(GuestMemoryError):
            m.read(m.hotplug_base + 128 * MiB - 1, 2)


@pytest.mark.parametrize("gpa, length", [
    (0, -1),
    (-1, 1),
    (-4096, 8192),
    (0, 1 << 64),
    (0, 1 << 80),
    ((1 << 64) - 1, 1),
    ((1 << 64) - 1, 2),              # would wrap to 0 in 64-bit arithmetic
    ((1 << 64) - 4096, 8192),        # would wrap to 4096
    (1 << 64, 0),
    (1 << 70, 4),
    (4 * GiB - 1, (1 << 64) - 4 * GiB + 2),  # wraps to a low in-RAM end
    (0, 5 * GiB),                    # bigger than any one region
    (True, 1),
    (0, 1.0),
    ("0", 1),
])
def test_hostile_ranges_rejected(mem, gpa, length):
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.view(gpa, length)
    assert not mem.is_ram(gpa, length)


def test_errors_are_user_facing_and_name_range(mem):
    with pytest.raises(VmmkitError) as ei:
        mem.read(0xC000_0000, 0x10)
    assert "0xc0000000" in str(ei.value) and "0x10" in str(ei.value)


def test_zero_length(mem):
    assert mem.read(0, 0) == b""
    mem.write(HIGH, b"")
    with pytest.raises(GuestMemoryError):
        mem.read(HOLE, 0)       # empty, but still not in RAM


def test_translate_and_is_ram(mem):
    r, off = mem.translate(HIGH + 0x10, 4)
    assert r.gpa == HIGH and off == 0x10
    r, off = mem.translate(0x1000, 4)
    assert r.gpa == 0 and off == 0x1000
    assert mem.is_ram(0, HOLE) and mem.is_ram(HIGH, 2 * GiB)
    assert not mem.is_ram(0, HOLE + 1)
    assert mem.find_region(HOLE + 5) is None
    assert mem.find_region(HIGH + 5).gpa == HIGH


# --- Data access ------------------------------------------------------------------


def test_read_write_roundtrip(mem):
    data = bytes(range(256)) * 20
    mem.write(0x10_0000 - 100, data)             # crosses page boundaries
    assert mem.read(0x10_0000 - 100, len(data)) == data
    mem.write(HIGH + 5, bytearray(b"xyz"))
    mem.write(HIGH + 8, memoryview(b"uvw"))
    assert mem.read(HIGH + 5, 6) == b"xyzuvw"


def test_integer_roundtrip(mem):
    for gpa in (0x2000, HOLE - 8, HIGH + 3):
        mem.write_u8(gpa, 0xAB)
        assert mem.read_u8(gpa) == 0xAB
        mem.write_u16(gpa, 0xBEEF)
        assert mem.read_u16(gpa) == 0xBEEF
        assert mem.read(gpa, 2) == b"\xef\xbe"      # little-endian
        mem.write_u32(gpa, 0xDEADBEEF)
        assert mem.read_u32(gpa) == 0xDEADBEEF
        mem.write_u64(gpa, 0x0123_4567_89AB_CDEF)
        assert mem.read_u64(gpa) == 0x0123_4567_89AB_CDEF
        assert mem.read(gpa, 8) == bytes.fromhex("efcdab8967452301")
    with pytest.raises(GuestMemoryError):
        mem.read_u64(HOLE - 4)
    with pytest.raises(GuestMemoryError):
        mem.write_u32(HOLE - 2, 1)


def test_read_write_obj(mem):
    desc = struct.Struct("<QIHH")
    mem.write_obj(0x3000, desc, 0x1122334455, 512, 1, 7)
    assert mem.read_obj(0x3000, desc) == (0x1122334455, 512, 1, 7)
    with pytest.raises(GuestMemoryError):
        mem.read_obj(HOLE - 8, desc)


def test_view_is_zero_copy(mem):
    v = mem.view(0x5000, 16)
    v[0:4] = b"abcd"
    assert mem.read(0x5000, 4) == b"abcd"
    mem.write(0x5004, b"ef")
    assert bytes(v[4:6]) == b"ef"
    assert len(v) == 16 and not v.readonly
    v.release()


# --- Dirty tracking --------------------------------------------------------------


def _pages(bitmap: bytes) -> list:
    return [i for i in range(len(bitmap) * 8) if bitmap[i >> 3] >> (i & 7) & 1]


def test_dirty_bitmap_sizes(mem):
    for r in mem.regions:
        assert len(r.dirty_bitmap) == ((r.size // PAGE + 63) // 64) * 8


def test_dirty_only_while_logging(mem):
    mem.write(0x1000, b"x")
    assert all(not any(b) for b in mem.take_dirty_pages().values())
    mem.start_dirty_log()
    assert mem.dirty_logging
    mem.write(0x1000, b"x")
    mem.stop_dirty_log()
    mem.write(0x9000, b"x")                         # after stop: not tracked
    d = mem.take_dirty_pages()
    assert _pages(d[0]) == [1] and _pages(d[HIGH]) == []


def test_dirty_marks_exact_pages(mem):
    mem.start_dirty_log()
    mem.write(0x2FFF, b"ab")                        # straddles pages 2 and 3
    mem.write_u32(0x8000, 1)                        # page 8
    mem.write(HIGH + 5 * PAGE + 10, b"\0" * (3 * PAGE))  # pages 5..8 of high region
    mem.write_obj(0x20_0000 - 2, struct.Struct("<I"), 7)  # pages 0x1ff, 0x200
    mem.write(0x40000, b"")                         # empty write: nothing
    mem.read(0x50000, 100)                          # reads never dirty
    d = mem.take_dirty_pages()
    assert _pages(d[0]) == [2, 3, 8, 0x1FF, 0x200]
    assert _pages(d[HIGH]) == [5, 6, 7, 8]
    # take clears
    d = mem.take_dirty_pages()
    assert all(not any(b) for b in d.values())


def test_dirty_large_range_and_bit_edges(mem):
    mem.start_dirty_log()
    mem.write(7 * PAGE, b"\1" * (20 * PAGE))        # pages 7..26: head, full bytes, tail
    assert _pages(mem.take_dirty_pages()[0]) == list(range(7, 27))
    mem.write(8 * PAGE, b"\1" * (8 * PAGE))         # exactly one byte of bitmap
    assert _pages(mem.take_dirty_pages()[0]) == list(range(8, 16))


def test_view_writes_need_mark_dirty(mem):
    mem.start_dirty_log()
    v = mem.view(0x4000, 2 * PAGE)
    v[:] = b"\xee" * (2 * PAGE)
    assert _pages(mem.take_dirty_pages()[0]) == []  # not tracked automatically
    mem.mark_dirty(0x4000, 2 * PAGE)
    assert _pages(mem.take_dirty_pages()[0]) == [4, 5]
    with pytest.raises(GuestMemoryError):
        mem.mark_dirty(HOLE - 1, 2)
    v.release()


def test_start_dirty_log_starts_clean(mem):
    mem.start_dirty_log()
    mem.write(0, b"x")
    mem.stop_dirty_log()
    mem.start_dirty_log()
    assert all(not any(b) for b in mem.take_dirty_pages().values())


def test_kvm_dirty_log_ors_vmm_bits(mem):
    low_npages = 3 * GiB // PAGE
    kvm_low = bytearray(((low_npages + 63) // 64) * 8)
    kvm_low[0] = 0b0000_0001          # guest dirtied page 0
    kvm_low[1] = 0b1000_0000          # and page 15
    vm = FakeVm(logs={0: bytes(kvm_low)})
    mem.start_dirty_log()
    mem.write(2 * PAGE, b"v")         # VMM dirtied page 2
    mem.write(HIGH, b"v")             # and page 0 of the high region
    d = mem.kvm_dirty_log(vm)
    assert sorted(vm.dirty_calls) == [(0, low_npages), (1, 2 * GiB // PAGE)]
    assert _pages(d[0]) == [0, 2, 15]
    assert _pages(d[HIGH]) == [0]
    assert len(d[0]) == len(kvm_low)
    # VMM bits were consumed
    assert all(not any(b) for b in mem.take_dirty_pages().values())


def test_register_with_fake_vm(mem):
    vm = FakeVm()
    mem.register(vm)
    low, high = mem.regions
    assert vm.calls == [(0, 0, 0, 3 * GiB, low.host_addr), (1, 0, HIGH, 2 * GiB, high.host_addr)]
    vm.calls.clear()
    mem.start_dirty_log(vm)           # re-registers with the log flag
    assert [c[1] for c in vm.calls] == [KVM_MEM_LOG_DIRTY_PAGES] * 2
    vm.calls.clear()
    mem.stop_dirty_log(vm)
    assert [c[1] for c in vm.calls] == [0, 0]


# --- Backings --------------------------------------------------------------------


def test_shared_memfd_region(big_host):
    with GuestMemory.create(8 * MiB, shared=True) as m:
        r = m.regions[0]
        assert r.fd is not None and r.shared
        other = mmap.mmap(r.fd, r.size, flags=mmap.MAP_SHARED)
        try:
            m.write(0x1000, b"through vmm")
            assert other[0x1000:0x100B] == b"through vmm"
            other[0x2000:0x2005] = b"other"
            assert m.read(0x2000, 5) == b"other"
        finally:
            other.close()


def test_private_memory_is_not_shared(big_host):
    with GuestMemory.create(8 * MiB) as m:
        assert m.regions[0].fd is None and not m.regions[0].shared


def test_file_backing(big_host, tmp_path):
    path = tmp_path / "guest.mem"
    with GuestMemory.create(4 * MiB, backing=path) as m:
        m.write(0x10, b"on disk")
        assert m.regions[0].fd is not None
    with open(path, "rb") as f:
        f.seek(0x10)
        assert f.read(7) == b"on disk"
    assert os.path.getsize(path) == 4 * MiB


def test_directory_backing(big_host, tmp_path):
    with GuestMemory.create(4 * MiB, backing=tmp_path) as m:
        m.write(0, b"x")
        assert m.read(0, 1) == b"x"
        assert list(tmp_path.iterdir()) == []      # unlinked file


# --- Hotplug ---------------------------------------------------------------------


def test_hotplug_range_and_regions(big_host):
    with GuestMemory.create(512 * MiB, hotplug_size=1 * GiB) as m:
        # Above the hole even though RAM ends below it.
        assert m.hotplug_base == HIGH and m.hotplug_size == 1 * GiB
        assert not m.is_ram(m.hotplug_base, 1)
        r = m.add_region(m.hotplug_base + 128 * MiB, 128 * MiB)
        assert r.kind == "hotplug" and r.slot == 1
        m.write(r.gpa + 5, b"plugged")
        assert m.read(r.gpa + 5, 7) == b"plugged"
        assert m.size == 512 * MiB                   # boot RAM only
        vm = FakeVm()
        m.register_region(vm, r)
        m.unregister_region(vm, r)
        assert vm.calls == [(1, 0, r.gpa, r.size, r.host_addr), (1, 0, r.gpa, 0, r.host_addr)]
        with pytest.raises(GuestMemoryError, match="overlaps"):
            m.add_region(m.hotplug_base + 128 * MiB, 4096)
        with pytest.raises(GuestMemoryError, match="outside the hotplug range"):
            m.add_region(m.hotplug_base + 1 * GiB, 128 * MiB)
        with pytest.raises(GuestMemoryError, match="outside the hotplug range"):
            m.add_region(m.hotplug_base - 4096, 8192)
        m.remove_region(r.gpa)
        with pytest.raises(GuestMemoryError):
            m.read(r.gpa, 1)
        with pytest.raises(GuestMemoryError):
            m.remove_region(r.gpa)
        with pytest.raises(GuestMemoryError, match="boot RAM"):
            m.remove_region(0)
        # The freed slot is reused.
        assert m.add_region(m.hotplug_base, 128 * MiB).slot == 1


def test_hotplug_base_aligned_above_ram(big_host):
    with GuestMemory.create(5 * GiB + 4 * MiB, hotplug_size=128 * MiB) as m:
        ram_end = HIGH + 2 * GiB + 4 * MiB
        assert m.hotplug_base == ram_end + 124 * MiB
        assert m.hotplug_base % (128 * MiB) == 0


def test_no_hotplug_range(big_host):
    with GuestMemory.create(16 * MiB) as m:
        with pytest.raises(GuestMemoryError, match="no hotplug range"):
            m.add_region(HIGH, 128 * MiB)


def test_hotplug_dirty_tracking(big_host):
    with GuestMemory.create(16 * MiB, hotplug_size=128 * MiB) as m:
        m.start_dirty_log()
        r = m.add_region(m.hotplug_base, 128 * MiB)
        m.write(r.gpa + PAGE, b"x")
        assert _pages(m.take_dirty_pages()[r.gpa]) == [1]


# --- Host limits -----------------------------------------------------------------


def test_absurd_size_refused_with_clear_message():
    with pytest.raises(HostMemoryError) as ei:
        GuestMemory.create(1 << 55)                  # 32 PiB
    msg = str(ei.value)
    assert "cannot allocate" in msg and "of guest memory" in msg and "available" in msg


def test_size_above_ram_plus_swap_refused(monkeypatch):
    fake = {"MemTotal": 8 * GiB, "MemAvailable": 6 * GiB, "SwapTotal": 2 * GiB, "SwapFree": 1 * GiB}
    monkeypatch.setattr(memory, "host_meminfo", lambda path="/proc/meminfo": dict(fake))
    with pytest.raises(HostMemoryError, match=r"cannot allocate 64 GiB of guest memory: .*; "
                                              r"this host has 7 GiB available"):
        GuestMemory.create(64 * GiB)
    # Above what is free but within RAM+swap: overcommit, allowed.
    with GuestMemory.create(9 * GiB) as m:
        assert m.size == 9 * GiB


def test_mmap_failure_wrapped(monkeypatch, big_host):
    def failing(*a, **k):
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(memory.mmap, "mmap", failing)
    with pytest.raises(HostMemoryError, match="Cannot allocate memory"):
        GuestMemory.create(16 * MiB)


def test_meminfo_parser(tmp_path):
    p = tmp_path / "meminfo"
    p.write_text("MemTotal:       16 kB\nHugePages_Total:       3\nSwapFree: 0 kB\n")
    assert memory.host_meminfo(str(p)) == {"MemTotal": 16384, "HugePages_Total": 3, "SwapFree": 0}
    assert memory.host_meminfo(str(tmp_path / "missing")) == {}


def test_close_makes_memory_unusable(big_host):
    m = GuestMemory.create(16 * MiB)
    v = m.view(0, 16)                # a live view must not make close() fail
    m.close()
    with pytest.raises(GuestMemoryError):
        m.read(0, 1)
    v.release()
    m.close()                        # idempotent
