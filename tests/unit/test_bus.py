"""Host-only tests for vmmkit.bus."""

from __future__ import annotations

import threading

import pytest

from vmmkit.bus import PIO_LIMIT, Bus, BusDevice, BusError
from vmmkit.errors import VmmkitError


class Regs(BusDevice):
    """A device with a byte array of registers that logs accesses."""

    def __init__(self, size=0x100):
        self.regs = bytearray(size)
        self.log = []

    def bus_read(self, offset, size):
        self.log.append(("r", offset, size))
        return bytes(self.regs[offset:offset + size])

    def bus_write(self, offset, data):
        self.log.append(("w", offset, bytes(data)))
        self.regs[offset:offset + len(data)] = data


def test_find_and_dispatch():
    bus = Bus("mmio")
    a, b = Regs(), Regs()
    bus.insert(a, 0xD000_0000, 0x1000, "virtio-blk")
    bus.insert(b, 0xD000_1000, 0x1000, "virtio-net")
    assert bus.find(0xD000_0000) == (a, 0)
    assert bus.find(0xD000_0FFF) == (a, 0xFFF)
    assert bus.find(0xD000_1004) == (b, 4)
    assert bus.find(0xD000_2000) is None
    assert bus.find(0xCFFF_FFFF) is None
    bus.write(0xD000_1010, b"\x01\x02\x03\x04")
    assert b.log == [("w", 0x10, b"\x01\x02\x03\x04")] and a.log == []
    assert bus.read(0xD000_1010, 4) == b"\x01\x02\x03\x04"
    assert b.log[-1] == ("r", 0x10, 4)
    assert [r.name for r in bus.ranges()] == ["virtio-blk", "virtio-net"]


def test_overlap_refused_naming_both():
    bus = Bus("mmio")
    bus.insert(Regs(), 0x1000, 0x1000, "uart")
    for base, size in [(0x1000, 0x1000), (0x0800, 0x1000), (0x1800, 0x10), (0x1FFF, 1), (0, 0x10000)]:
        with pytest.raises(BusError) as ei:
            bus.insert(Regs(), base, size, "rtc")
        msg = str(ei.value)
        assert "rtc" in msg and "uart" in msg and "0x1000..0x1fff" in msg and f"{base:#x}" in msg
        assert isinstance(ei.value, VmmkitError)
    # Touching ranges are fine on both sides.
    bus.insert(Regs(), 0x2000, 0x10, "after")
    bus.insert(Regs(), 0x0F00, 0x100, "before")
    assert [r.name for r in bus.ranges()] == ["before", "uart", "after"]


def test_invalid_ranges():
    bus = Bus("pio", limit=PIO_LIMIT)
    with pytest.raises(BusError, match="positive"):
        bus.insert(Regs(), 0x3F8, 0, "uart")
    with pytest.raises(BusError, match="outside"):
        bus.insert(Regs(), 0xFFFF, 2, "wraps")
    with pytest.raises(BusError, match="outside"):
        bus.insert(Regs(), -1, 2, "negative")
    mmio = Bus("mmio")
    with pytest.raises(BusError, match="outside"):
        mmio.insert(Regs(), (1 << 64) - 0x10, 0x20, "wraps")
    mmio.insert(Regs(), (1 << 64) - 0x10, 0x10, "top")     # up to the last byte is fine


def test_unmapped_reads_ff_and_writes_ignored():
    bus = Bus("pio", limit=PIO_LIMIT)
    assert bus.read(0x80, 1) == b"\xff"
    assert bus.read(0x80, 4) == b"\xff" * 4
    bus.write(0x80, b"\x00")
    assert bus.unhandled == 3


def test_remove():
    bus = Bus()
    dev = Regs()
    bus.insert(dev, 0x100, 0x10, "dev")
    with pytest.raises(BusError, match="nothing is mapped at 0x104"):
        bus.remove(0x104)
    assert bus.remove(0x100) is dev
    assert bus.find(0x100) is None
    bus.insert(Regs(), 0x100, 0x10, "again")        # range is free again


def test_straddling_access_truncated():
    bus = Bus()
    dev = Regs(0x10)
    dev.regs[:] = bytes(range(0x10))
    bus.insert(dev, 0x100, 0x10, "dev")
    assert bus.read(0x10E, 4) == b"\x0e\x0f\xff\xff"
    assert dev.log[-1] == ("r", 0xE, 2)
    bus.write(0x10F, b"\xaa\xbb")
    assert dev.log[-1] == ("w", 0xF, b"\xaa")
    # An access starting before the device is unmapped as a whole.
    assert bus.read(0xFE, 4) == b"\xff" * 4
    assert bus.unhandled == 3


def test_bad_device_read_length():
    class Short(BusDevice):
        def bus_read(self, offset, size):
            return b"\0"

    bus = Bus()
    bus.insert(Short(), 0, 0x10, "short")
    with pytest.raises(BusError, match="short.*returned 1 bytes for a 4-byte read"):
        bus.read(0, 4)


def test_default_busdevice():
    bus = Bus()
    bus.insert(BusDevice(), 0, 0x10, "dummy")
    assert bus.read(0, 2) == b"\xff\xff"
    bus.write(0, b"\x01")
    assert bus.unhandled == 0


def test_device_exceptions_propagate():
    class Broken(BusDevice):
        def bus_write(self, offset, data):
            raise RuntimeError("device bug")

    bus = Bus()
    bus.insert(Broken(), 0, 0x10, "broken")
    with pytest.raises(RuntimeError, match="device bug"):
        bus.write(0, b"\0")


def test_per_device_lock_serialises_and_opt_out():
    """With bus_lock the device never sees two accesses at once; without, it can."""

    class Probe(BusDevice):
        def __init__(self, lock):
            self.bus_lock = lock
            self.inside = 0
            self.max_inside = 0
            self.entered = threading.Event()
            self.release = threading.Event()
            self.guard = threading.Lock()

        def bus_read(self, offset, size):
            with self.guard:
                self.inside += 1
                self.max_inside = max(self.max_inside, self.inside)
                if self.inside == 2:
                    self.release.set()
            self.entered.set()
            # First caller waits (bounded) for a second one to get in.
            self.release.wait(timeout=0.5 if self.bus_lock else 10)
            with self.guard:
                self.inside -= 1
            return b"\0" * size

    for lock in (True, False):
        dev = Probe(lock)
        bus = Bus()
        bus.insert(dev, 0, 0x10, "probe")
        bus.insert(dev, 0x100, 0x10, "probe-bar2")     # same device, second range: same lock
        threads = [threading.Thread(target=bus.read, args=(addr, 4)) for addr in (0, 0x100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert dev.max_inside == (1 if lock else 2)


def test_device_with_unhashable_type():
    import attrs

    @attrs.define
    class Unhashable(BusDevice):
        value: int = 0

    bus = Bus()
    dev = Unhashable()
    bus.insert(dev, 0, 4, "a")
    bus.insert(dev, 4, 4, "b")
    assert bus.read(0, 1) == b"\xff"
    bus.remove(0)
    bus.remove(4)
