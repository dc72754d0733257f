"""Tests for virtio-blk's native engine (plugins/blk/native.py, native/virtio_blk.c), no KVM.

test_blk.py already runs every protocol test against both engines; this file
covers what is specific to the C path: hostile queues pushed through it (the
device must end in NEEDS_RESET, with the Python engine's message, and never
crash), a fuzzer comparing it request by request with the Python engine,
many requests in flight at once on each I/O executor, dirty logging of what
C writes, guest memory hotplug, the O_DIRECT bounce buffer, and the atomic
dirty-bitmap helpers.
"""

from __future__ import annotations

import os
import random
import struct
import time

import pytest

from vmmkit import threads
from vmmkit._native import ffi, lib
from vmmkit.kvm.vm import EventFd
from vmmkit.memory import GuestMemory, _set_bits
from vmmkit.testing.virtio_driver import GuestAllocator, MmioDriver, SplitQueueDriver, vring_need_event
from vmmkit.virtio import VirtioMmioTransport
from vmmkit.virtio.device import DeviceContext
from vmmkit.virtio.queue import QueueError, Virtqueue
from vmmkit_plugins.blk import BlkSpec
from vmmkit_plugins.blk.device import VirtioBlk
from vmmkit_plugins.blk.disk import Disk, DiskError
from vmmkit_plugins.blk.native import NativeBlk, uring_available

MiB = 1 << 20
PAGE = 4096
SECTOR = 512
RAM = 32 * MiB
DISK_SIZE = 2 * MiB
SECTORS = DISK_SIZE // SECTOR
NEEDS_RESET = 64
#: Hand-written buffers and indirect tables live here, above the allocator's range.
BUF = 16 * MiB
#: Where fuzzed garbage chains point (64 KiB, refilled before every batch).
SCRATCH = 24 * MiB
#: Disk sectors only garbage chains may touch; well-formed fuzz requests stay above.
GARBAGE_SECTORS = 64

# Spelled out from the spec (5.2.6, 2.7.5) rather than imported from the code under test.
HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")
DESC = struct.Struct("<QIHH")
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4

IO_MODES = ["uring", "threads", "sync"]


def wait_for(pred, what="condition"):
    """Poll *pred* every millisecond; the 10 s deadline only guards against a hang."""
    deadline = time.monotonic() + 10
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def make_image(path, size=DISK_SIZE, data=None):
    with open(path, "wb") as f:
        if data is not None:
            f.write(data)
        f.truncate(size)
    return str(path)


def file_bytes(path, offset=0, length=None):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read() if length is None else f.read(length)


def segments(*segs):
    return b"".join(SEGMENT.pack(*s) for s in segs)


def write_table(mem, addr, descs):
    for i, d in enumerate(descs):
        mem.write_obj(addr + 16 * i, DESC, *d)


def pages_of(dirty):
    """Guest page numbers set in take_dirty_pages() output."""
    out = set()
    for base, bitmap in dirty.items():
        bits = int.from_bytes(bitmap, "little")
        out |= {(base >> 12) + i for i in range(len(bitmap) * 8) if bits >> i & 1}
    return out


class Rig:
    """A VirtioBlk behind a virtio-MMIO transport, driven by an initialised MmioDriver.

    ``engine`` is "python" or "native"; ``io`` the native executor. Interrupts
    are counted rather than injected.
    """

    def __init__(self, path, *, engine="native", io="auto", mem=None, cache="writeback", read_only=False,
                 indirect=True, event_idx=False, serial="fuzz"):
        self.path = path
        self.mem = mem if mem is not None else GuestMemory.create(RAM)
        self.alloc = GuestAllocator(0x10000, BUF)
        self.disk = Disk(path, read_only=read_only, cache=cache)
        # "native-loop": the interrupt is an eventfd, as in a VM, so the device serves in its C loop
        # (native/virtio_serve.c) and raises interrupts there; they are not counted.
        loop = engine == "native-loop"
        self.dev = VirtioBlk("vda", self.disk, serial=serial, engine="native" if loop else engine, native_io=io)
        self.interrupts = 0
        self.irqfd = EventFd() if loop else None
        self.t = VirtioMmioTransport(self.dev, self.mem, self._irq, irq_fd=self.irqfd.fd if loop else None)
        self.drv = MmioDriver(self.t, self.mem, self.alloc)
        self.indirect, self.event_idx = indirect, event_idx
        self.init()

    def _irq(self):
        self.interrupts += 1
        if self.irqfd is not None:
            self.irqfd.signal()

    def init(self):
        (self.q,) = self.drv.init(indirect=self.indirect, event_idx=self.event_idx)

    def needs_reset(self):
        return bool(self.drv.status() & NEEDS_RESET)

    def post(self, rtype, sector=0, data=b"", in_len=0, *, indirect=False):
        return self.q.add_chain([HEADER.pack(rtype, 0, sector)] + ([data] if data else []),
                                ([in_len] if in_len else []) + [1], indirect=indirect)

    def collect(self, count):
        """Wait for *count* used entries (or NEEDS_RESET); return them in order."""
        got = []
        wait_for(lambda: got.extend(self.q.get_used()) or len(got) >= count or self.needs_reset(),
                 "used entries")
        got.extend(self.q.get_used())
        return got

    def request(self, rtype, sector=0, data=b"", in_len=0, *, indirect=False):
        """One request; return (status, data read, used len)."""
        head = self.post(rtype, sector, data, in_len, indirect=indirect)
        self.drv.notify(0)
        got = self.collect(1)
        assert [h for h, _ in got] == [head]
        written = b"".join(self.q.in_buffers(head))
        return written[-1], written[:-1], got[0][1]

    def close(self):
        self.t.close()
        self.dev.close()
        self.mem.close()
        if self.irqfd is not None:
            self.irqfd.close()


class Direct:
    """A VirtioBlk served synchronously from the test thread: no transport, no kicks.

    The device is activated with no notification fds, so its worker never
    serves the queue; :meth:`kick` calls ``process_queue`` itself. Everything
    is then deterministic: what one call pops, how many interrupts it asks for.
    """

    def __init__(self, path, *, engine="native", io="auto", mem=None, cache="writeback", event_idx=True,
                 indirect=True, serial="fuzz"):
        self.path = path
        self.mem = mem if mem is not None else GuestMemory.create(RAM)
        self.alloc = GuestAllocator(0x10000, BUF)
        self.disk = Disk(path, cache=cache)
        self.dev = VirtioBlk("vda", self.disk, serial=serial, engine=engine, native_io=io)
        self.event_idx, self.indirect = event_idx, indirect
        self.interrupts = 0
        self.init()

    def init(self):
        """A fresh queue (as after a device reset and a new DRIVER_OK)."""
        self.dev.reset()
        self.q = SplitQueueDriver(self.mem, 256, self.alloc, event_idx=self.event_idx)
        vq = self.vq = Virtqueue(256)
        vq.desc_addr, vq.avail_addr, vq.used_addr = self.q.desc_addr, self.q.avail_addr, self.q.used_addr
        vq.ready, vq.event_idx, vq.indirect = True, self.event_idx, self.indirect
        vq.check(self.mem)
        self.dev.activate(DeviceContext(memory=self.mem, queues=[vq], features=0, notify_fds=[None],
                                        signal_used=self._irq, signal_config=lambda: None,
                                        needs_reset=lambda why: None))
        if self.dev._native_active and self.dev.native.eventfd >= 0:
            # Completions are answered by kick() alone, in this thread, not by the worker.
            self.dev._loop.remove(self.dev.native.eventfd)

    def _irq(self):
        self.interrupts += 1

    post = Rig.post

    def kick(self):
        """Serve the queue once, then wait for every request in flight; return the protocol error, or None."""
        try:
            self.dev.process_queue(0)
        except QueueError as exc:
            return str(exc)
        self.settle()
        return None

    def settle(self):
        """Wait for the native engine's requests in flight and answer them (as a pause does)."""
        if self.dev.native is not None and self.dev._native_active and self.dev.native.drain(self.mem, self.vq)[0]:
            self._irq()

    def close(self):
        self.dev.close()
        self.mem.close()


@pytest.fixture
def rigs():
    made = []

    def make(path, direct=False, **kw):
        r = (Direct if direct else Rig)(path, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()
    assert not [t for t in threads.threads_by_role().get(threads.ROLE_DEVICE, []) if t.is_alive()]


@pytest.fixture(params=IO_MODES)
def io(request):
    """Each native I/O executor; io_uring only where this kernel allows it."""
    if request.param == "uring" and not uring_available():
        pytest.skip("io_uring is not available here")
    return request.param


@pytest.fixture
def image(tmp_path):
    return make_image(tmp_path / "disk.img")


# --- hostile queues ----------------------------------------------------------------
#
# Each case posts one chain that breaks the protocol (the same cases as
# test_virtio_queue.py, at the device's queue size of 256). Both engines must
# end in NEEDS_RESET with the same message.


def _loop(r):
    r.q.add_raw([(BUF, 16, F_NEXT, 1), (BUF + 16, 16, F_NEXT, 0)])


def _self_loop(r):
    r.q.add_raw({3: (BUF, 16, F_NEXT | F_WRITE, 3)})


def _longer_than_the_queue(r):
    table = BUF + 0x1000
    write_table(r.mem, table, [(BUF + i, 1, F_NEXT, i + 1) for i in range(256)] + [(BUF + 256, 1, F_WRITE, 0)])
    r.q.add_raw([(table, 257 * 16, F_INDIRECT, 0)])


def _outside(addr, length):
    def case(r):
        r.q.add_raw([(BUF, 16, F_NEXT, 1), (addr, length, F_WRITE, 0)])
    return case


def _next_beyond(nxt):
    def case(r):
        r.q.add_raw({2: (BUF, 16, F_NEXT, nxt)})
    return case


def _head_beyond(head):
    return lambda r: r.q.publish(head)


def _avail_jump(idx):
    return lambda r: r.q.set_avail_idx(idx)


def _readable_after_writable(r):
    r.q.add_raw([(BUF, 16, F_WRITE | F_NEXT, 1), (BUF + 16, 16, 0, 0)])


def _indirect(descs, length=None, flags=F_INDIRECT, extra=()):
    def case(r):
        table = BUF + 0x1000
        write_table(r.mem, table, descs)
        n = len(descs) * 16 if length is None else length
        r.q.add_raw([(table, n, flags, 1)] + list(extra))
    return case


def _nested_indirect(r):
    outer, inner = BUF + 0x1000, BUF + 0x2000
    write_table(r.mem, inner, [(BUF, 16, 0, 0)])
    write_table(r.mem, outer, [(inner, 16, F_INDIRECT, 0)])
    r.q.add_raw([(outer, 16, F_INDIRECT, 0)])


def _indirect_table_at(addr, length):
    return lambda r: r.q.add_raw([(addr, length, F_INDIRECT, 0)])


def _no_status_byte(r):
    r.q.add_chain([HEADER.pack(T_IN, 0, 0)], [])


def _only_empty_writable(r):
    r.q.add_raw([(BUF, 16, F_NEXT, 1), (BUF + 16, 0, F_WRITE, 0)])


HOSTILE = {
    "descriptor loop": (_loop, {}),
    "self loop": (_self_loop, {}),
    "chain longer than the queue": (_longer_than_the_queue, {}),
    "buffer just past RAM": (_outside(RAM, 16), {}),
    "buffer straddling the end of RAM": (_outside(RAM - 8, 16), {}),
    "buffer in the MMIO hole": (_outside(0xFEE00000, 4), {}),
    "buffer far away": (_outside(1 << 40, 1), {}),
    "buffer wrapping 64 bits": (_outside((1 << 64) - 8, 16), {}),
    "buffer wrapping 64 bits, 4 GiB long": (_outside((1 << 64) - 1, 0xFFFFFFFF), {}),
    "next index 256": (_next_beyond(256), {}),
    "next index 65535": (_next_beyond(0xFFFF), {}),
    "head 256": (_head_beyond(256), {}),
    "head 65535": (_head_beyond(0xFFFF), {}),
    "avail.idx 257 ahead": (_avail_jump(257), {}),
    "avail.idx backwards": (_avail_jump(0xFFFF), {}),
    "readable after writable": (_readable_after_writable, {}),
    "readable after writable, indirect": (_indirect([(BUF, 16, F_WRITE | F_NEXT, 1), (BUF + 16, 16, 0, 0)]), {}),
    "indirect not negotiated": (_indirect([(BUF, 16, 0, 0)]), {"indirect": False}),
    "indirect with NEXT": (_indirect([(BUF, 16, 0, 0)], flags=F_INDIRECT | F_NEXT,
                                     extra=[(BUF, 16, F_WRITE, 0)]), {}),
    "indirect length 0": (_indirect([(BUF, 16, 0, 0)], length=0), {}),
    "indirect length 8": (_indirect([(BUF, 16, 0, 0)], length=8), {}),
    "indirect length 17": (_indirect([(BUF, 16, 0, 0)] * 2, length=17), {}),
    "nested indirect": (_nested_indirect, {}),
    "indirect table past RAM": (_indirect_table_at(RAM, 16), {}),
    "indirect table straddling the end of RAM": (_indirect_table_at(RAM - 16, 32), {}),
    "indirect table wrapping 64 bits": (_indirect_table_at((1 << 64) - 16, 32), {}),
    "indirect table huge": (_indirect_table_at(1 << 50, 0xFFFFFFF0), {}),
    "indirect next beyond the table": (_indirect([(BUF, 16, F_NEXT, 2), (BUF, 16, F_WRITE, 0)]), {}),
    "loop in an indirect table": (_indirect([(BUF, 16, F_NEXT, 1), (BUF + 16, 16, F_NEXT, 0)]), {}),
    "buffer outside RAM in an indirect table": (_indirect([(BUF, 16, F_NEXT, 1), ((1 << 64) - 4, 8, F_WRITE, 0)]), {}),
    "no status byte": (_no_status_byte, {}),
    "only an empty writable buffer": (_only_empty_writable, {}),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_chain_needs_reset_with_the_python_message(rigs, tmp_path, case):
    build, kw = HOSTILE[case]
    messages = {}
    for engine in ("python", "native", "native-loop"):
        path = make_image(tmp_path / f"{engine}.img")
        r = rigs(path, engine=engine, **kw)
        build(r)
        r.drv.notify(0)
        wait_for(r.needs_reset, "DEVICE_NEEDS_RESET")
        assert r.dev.broken.startswith("queue 0: ")
        messages[engine] = r.dev.broken
        assert file_bytes(path) == bytes(DISK_SIZE)
        # No crash, no stuck thread: a reset brings the disk back.
        r.init()
        assert r.request(T_OUT, 8, b"\x5a" * SECTOR)[0] == S_OK
        assert r.request(T_IN, 8, in_len=SECTOR)[:2] == (S_OK, b"\x5a" * SECTOR)
    assert messages["native"] == messages["native-loop"] == messages["python"]


def test_chains_before_a_bad_one_are_answered(rigs, tmp_path):
    results = {}
    for engine in ("python", "native", "native-loop"):
        path = make_image(tmp_path / f"{engine}.img")
        r = rigs(path, engine=engine)
        with open(path, "r+b") as f:
            f.write(b"\x07" * SECTOR)
        # Disjoint sectors: requests in flight together have no order (virtio 5.2.6).
        a = r.post(T_OUT, 8, b"\x01" * SECTOR)
        b = r.post(T_IN, 0, in_len=SECTOR)
        r.q.publish(300)  # a head outside the queue
        r.post(T_OUT, 16, b"\x02" * SECTOR)  # never reached
        r.drv.notify(0)
        wait_for(r.needs_reset, "DEVICE_NEEDS_RESET")
        # Answered in completion order: the native engine may finish the read first.
        used = sorted(r.q.get_used())
        assert [h for h, _ in used] == sorted([a, b])
        results[engine] = (used, r.q.in_buffers(b), file_bytes(path), r.dev.broken)
        assert file_bytes(path, 16 * SECTOR, SECTOR) == bytes(SECTOR)
    assert results["native"] == results["native-loop"] == results["python"]


@pytest.mark.parametrize("engine", ["native", "native-loop"])
def test_rings_that_vanish_need_reset(rigs, image, engine):
    """Rings in hotplugged memory that goes away: C re-checks them at every call (the
    serving loop comes back to Python for a new view of guest RAM)."""
    mem = GuestMemory.create(RAM, hotplug_size=128 * MiB)
    base = mem.hotplug_base
    mem.add_region(base, MiB)
    r = rigs(image, mem=mem, engine=engine)
    r.alloc = r.drv.alloc = GuestAllocator(base, base + MiB)
    r.init()  # rings now live in the hotplugged region
    assert r.request(T_OUT, 8, b"\x03" * SECTOR)[0] == S_OK
    mem.remove_region(base)
    r.drv.notify(0)
    wait_for(r.needs_reset, "DEVICE_NEEDS_RESET")
    assert "outside guest RAM" in r.dev.broken


# --- parity fuzzing ------------------------------------------------------------------


class Fuzzer:
    """Generates batches of requests, the same for every rig it is applied to."""

    def __init__(self, seed):
        self.rng = random.Random(seed)

    def _range(self, claimed, max_count=32):
        """A sector range no other request of this batch touches, or None."""
        rng = self.rng
        for _ in range(20):
            count = rng.randrange(1, max_count + 1)
            start = rng.randrange(GARBAGE_SECTORS, SECTORS - count + 1)
            if all(start + count <= a or b <= start for a, b in claimed):
                claimed.append((start, start + count))
                return start, count
        return None

    def _bad_sector(self):
        return self.rng.choice([SECTORS, SECTORS + 7, 2 ** 63, 2 ** 64 - 1, SECTORS - 1])

    def request(self, claimed):
        """(out_bufs, in_lens, indirect) for one well-formed chain with random content."""
        rng = self.rng
        kind = rng.choices(["in", "out", "flush", "get_id", "discard", "wz", "unknown", "short"],
                           [30, 30, 5, 5, 8, 8, 3, 3])[0]
        data, in_len, rtype, sector = b"", 0, T_IN, 0
        if kind in ("in", "out"):
            rtype = T_IN if kind == "in" else T_OUT
            rng_ok = rng.random() < 0.9 and self._range(claimed)
            if rng_ok:
                sector, count = rng_ok
                length = count * SECTOR
                if rng.random() < 0.05:
                    length -= rng.randrange(1, SECTOR)  # not whole sectors: IOERR
            else:
                sector, length = self._bad_sector(), SECTOR * rng.randrange(1, 4)
            if kind == "out":
                data = rng.randbytes(length)
            else:
                in_len = length
        elif kind == "flush":
            rtype = T_FLUSH
        elif kind == "get_id":
            rtype, in_len = T_GET_ID, rng.randrange(0, 41)
        elif kind in ("discard", "wz"):
            rtype = T_DISCARD if kind == "discard" else T_WRITE_ZEROES
            segs = []
            for _ in range(rng.randrange(1, 4)):
                found = self._range(claimed, 64)
                if found is None or rng.random() < 0.1:
                    segs.append((self._bad_sector(), rng.randrange(0, 9), 0))
                else:
                    flags = rng.choice([0, 0, 1]) if rtype == T_WRITE_ZEROES else 0
                    if rng.random() < 0.05:
                        flags = rng.choice([2, 0x80000000])
                    segs.append((found[0], found[1], flags))
            data = segments(*segs)
            if rng.random() < 0.05:
                data = data[:rng.randrange(0, len(data))]  # ragged: UNSUPP
        elif kind == "unknown":
            rtype = rng.choice([2, 3, 7, 99, 0xFFFFFFFF])
            in_len = rng.choice([0, SECTOR])
        header = HEADER.pack(rtype, rng.randrange(0, 1 << 32), sector)
        if kind == "short":
            header = header[:rng.randrange(0, 16)]
        outs = [header] if header else []
        if rng.random() < 0.2 and len(header) > 1:
            cut = rng.randrange(1, len(header))
            outs = [header[:cut], header[cut:]]
        outs += self._split(data)
        ins = self._split_lens(in_len)
        if ins and rng.random() < 0.3:
            ins[-1] += 1  # the status byte shares the last data buffer
        else:
            ins.append(1)
        return outs, ins, rng.random() < 0.3

    def _split(self, data):
        if not data:
            return []
        cuts = sorted(self.rng.sample(range(1, len(data)), min(len(data) - 1, self.rng.randrange(0, 4))))
        return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]

    def _split_lens(self, n):
        return [len(p) for p in self._split(bytes(n))]

    def garbage(self, count_slots):
        """Raw descriptors for a chain that may break any rule, pointing only at SCRATCH,
        the last bytes of RAM, or outside RAM (never at other chains or the rings)."""
        rng = self.rng

        def addr():
            return rng.choice([SCRATCH + rng.randrange(0, PAGE), SCRATCH + 0x800, RAM - rng.randrange(0, 64),
                               (1 << 64) - rng.randrange(1, 1 << 16), rng.randrange(0, 1 << 64), 0xFEE00000])

        def length():
            return rng.choice([0, 1, 16, 17, 32, 512, PAGE, rng.randrange(0, 1 << 12), 0xFFFFFFFF])

        n = rng.randrange(1, 5)
        slots = count_slots(n)
        descs = {}
        for s in slots:
            # Never into another chain's descriptors: their buffers are in flight.
            nxt = rng.choice(slots) if rng.random() < 0.7 else rng.randrange(256, 1 << 16)
            descs[s] = (addr(), length(), rng.randrange(0, 8), nxt)
        return slots[0], descs

    def scratch(self):
        """SCRATCH's content for a batch: a header, random bytes, an indirect table into it."""
        rng = self.rng
        rtype = rng.choice([T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, 99])
        head = HEADER.pack(rtype, 0, rng.randrange(0, GARBAGE_SECTORS // 2))
        body = rng.randbytes(0x800 - len(head))
        table = b"".join(DESC.pack(SCRATCH + rng.randrange(0, 0x700), rng.randrange(0, 0x100),
                                   rng.randrange(0, 8), rng.randrange(0, 8)) for _ in range(8))
        blob = head + body + table
        return blob + bytes(0x10000 - len(blob))


def run_batch(rig, fuzz_plan):
    """Post one batch (the same plan for every rig), serve it, return everything the driver can see."""
    rig.mem.write(SCRATCH, fuzz_plan["scratch"])
    heads = []
    for item in fuzz_plan["chains"]:
        if item[0] == "garbage":
            rig.q.add_raw(item[2], head=item[1])
            heads.append(("garbage", item[1]))
        else:
            outs, ins, indirect = item[1]
            heads.append(("chain", rig.q.add_chain(outs, ins, indirect=indirect)))
    error = rig.kick()
    interrupts, rig.interrupts = rig.interrupts, 0
    # The native engine answers in completion order; the requests of a batch touch disjoint sectors.
    used = sorted(rig.q.get_used())
    # The driver frees descriptors in used order: put its free list in one order for
    # every rig, so both hand out the same heads to the next batch.
    rig.q._free.sort(reverse=True)
    answered = {h for h, _ in used}
    buffers = [rig.q.in_buffers(h) for kind, h in heads if kind == "chain" and h in answered]
    return {"error": error, "used": used, "buffers": buffers, "interrupts": interrupts,
            "scratch": rig.mem.read(SCRATCH, 0x10000), "avail_event": rig.q.avail_event(),
            "tail": rig.mem.read(RAM - 64, 64)}


@pytest.mark.parametrize("seed", [1, 2])
def test_fuzz_native_matches_python(rigs, tmp_path, io, seed):
    fuzz = Fuzzer(seed)
    initial = fuzz.rng.randbytes(DISK_SIZE)
    py = rigs(make_image(tmp_path / "py.img", data=initial), direct=True, engine="python")
    na = rigs(make_image(tmp_path / "native.img", data=initial), direct=True, engine="native", io=io)
    resets = garbage_batches = answered = 0
    for batch in range(120):
        claimed = []
        plan = {"scratch": fuzz.scratch(), "chains": []}
        n = fuzz.rng.randrange(1, 17)
        garbage_at = fuzz.rng.randrange(n) if fuzz.rng.random() < 0.15 else -1
        for i in range(n):
            if i == garbage_at:
                # Both drivers hand out the same slots, so one set of raw descriptors fits both.
                head, descs = fuzz.garbage(lambda k: py.q.take_free(k))
                assert na.q.take_free(len(descs)) == list(descs)
                plan["chains"].append(("garbage", head, descs))
                garbage_batches += 1
            else:
                plan["chains"].append(("chain", fuzz.request(claimed)))
        want = run_batch(py, plan)
        got = run_batch(na, plan)
        assert got == want, f"batch {batch}"
        answered += len(got["used"])
        if batch % 20 == 19:
            assert file_bytes(na.path) == file_bytes(py.path), f"batch {batch}"
        if want["error"]:
            resets += 1
            py.init()
            na.init()
    assert file_bytes(na.path) == file_bytes(py.path)
    assert py.dev.io_errors == na.dev.io_errors == 0
    # The generator reached the interesting outcomes, so the comparisons above meant something.
    assert resets and garbage_batches and answered > 500


def test_random_rings_never_crash_c(rigs, image, io):
    """Random bytes in every ring and in the buffers they point at: C answers or refuses, nothing else."""
    r = rigs(image, direct=True, io=io)
    rng = random.Random(0xC4A05)
    q, vq = r.q, r.vq
    tables = [BUF + 0x1000 * i for i in range(4)]
    outcomes = {"served": 0, "error": 0}
    answered = 0
    for _ in range(600):
        # Mostly plausible values, so that chains get far enough to reach the disk.
        def addr():
            if rng.random() < 0.7:
                return BUF + 0x400 * rng.randrange(0, 32)
            return rng.choice([rng.randrange(BUF, BUF + 0x8000), rng.choice(tables), RAM - rng.randrange(0, 64),
                               (1 << 64) - rng.randrange(1, 1 << 16), rng.randrange(0, 1 << 64)])

        def desc():
            length = rng.choice([16, 16, 512, 513, 1024, 0, 1, 17, rng.randrange(0, 1 << 13), 0xFFFFFFFF])
            flags = rng.choice([0, 1, 2, 3, 1, 3]) if rng.random() < 0.9 else rng.randrange(0, 1 << 16)
            nxt = rng.randrange(0, 256) if rng.random() < 0.9 else rng.randrange(0, 1 << 16)
            return DESC.pack(addr(), length, flags, nxt)

        r.mem.write(q.desc_addr, b"".join(desc() for _ in range(256)))
        for t in tables:
            r.mem.write(t, b"".join(desc() for _ in range(8)))
        r.mem.write(tables[0], DESC.pack(tables[1], 64, 4, 0))  # sometimes reached: an indirect hop
        # Buffers hold plausible headers now and then, so some chains reach the disk.
        for a in range(BUF, BUF + 0x8000, 0x400):
            r.mem.write(a, HEADER.pack(rng.choice([T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES, 77]),
                                       0, rng.randrange(0, SECTORS + 2)) + rng.randbytes(16))
        ring = [rng.randrange(0, 256) if rng.random() < 0.95 else rng.randrange(0, 1 << 16) for _ in range(256)]
        r.mem.write(q.avail_addr, rng.randbytes(4) + struct.pack("<256H", *ring) + rng.randbytes(2))
        ahead = rng.choice([0, 1, 1, 2, 3, rng.randrange(0, 300)])
        vq.next_avail = (r.mem.read_u16(q.avail_addr + 2) - ahead) & 0xFFFF
        used = vq.next_used
        error = r.kick()
        outcomes["error" if error else "served"] += 1
        answered += (vq.next_used - used) & 0xFFFF
    assert all(outcomes.values()) and answered > 50, (outcomes, answered)


# --- many requests in flight --------------------------------------------------------


@pytest.mark.parametrize("count", [32, 200])
def test_many_requests_in_flight(rigs, image, io, count):
    r = rigs(image, direct=True, io=io)
    assert r.dev.native.io_kind == io
    rng = random.Random(count)
    blocks = {}
    heads = []
    for i in range(count):
        sector = 8 * i
        blocks[sector] = rng.randbytes(8 * SECTOR)
        # Direct chains take 3 descriptors: mix them in while the ring has room.
        heads.append(r.post(T_OUT, sector, blocks[sector], indirect=count > 64 or bool(i % 2)))
    assert r.kick() is None  # one kick for all of them
    used = r.q.get_used()
    assert sorted(h for h, _ in used) == sorted(heads)  # answered in any order, each once
    assert all(n == 1 for _, n in used)
    assert all(r.q.in_buffers(h) == [bytes([S_OK])] for h in heads)
    # They were all in flight together, not one after the other.
    assert r.dev.native.stats()["max_inflight"] == count
    assert r.dev.native.inflight == 0
    for sector, data in blocks.items():
        assert file_bytes(r.path, sector * SECTOR, len(data)) == data

    reads = [r.post(T_IN, sector, in_len=len(data), indirect=count > 64) for sector, data in blocks.items()]
    assert r.kick() is None
    used = r.q.get_used()
    assert sorted(h for h, _ in used) == sorted(reads)
    assert all(n == 8 * SECTOR + 1 for _, n in used)
    for head, data in zip(reads, blocks.values()):
        got = b"".join(r.q.in_buffers(head))
        assert got == data + bytes([S_OK])
    assert r.vq.next_avail == r.vq.next_used == 2 * count  # the queue state came back to Python
    assert r.dev.native.stats()["requests"] == 2 * count


def test_32_writes_one_notify_through_the_transport(rigs, image, io):
    r = rigs(image, io=io)
    data = [os.urandom(4 * SECTOR) for _ in range(32)]
    heads = [r.post(T_OUT, 8 + 4 * i, d) for i, d in enumerate(data)]
    r.drv.notify(0)
    used = r.collect(32)
    assert sorted(h for h, _ in used) == sorted(heads) and all(n == 1 for _, n in used)
    assert all(r.q.in_buffers(h) == [bytes([S_OK])] for h in heads)
    assert file_bytes(r.path, 8 * SECTOR, 32 * 4 * SECTOR) == b"".join(data)
    assert r.drv.interrupt_status() & 1


def test_flush_between_writes_in_one_batch(rigs, image, io):
    r = rigs(image, io=io)
    heads = [r.post(T_OUT, 8, b"\x01" * SECTOR), r.post(T_FLUSH), r.post(T_OUT, 16, b"\x02" * SECTOR),
             r.post(T_FLUSH)]
    r.drv.notify(0)
    assert [h for h, _ in r.collect(4)] == heads
    assert all(r.q.in_buffers(h)[-1] == bytes([S_OK]) for h in heads)
    assert file_bytes(r.path, 8 * SECTOR, SECTOR) == b"\x01" * SECTOR
    assert file_bytes(r.path, 16 * SECTOR, SECTOR) == b"\x02" * SECTOR


def test_many_buffers_in_one_request(rigs, image, io):
    r = rigs(image, io=io)
    data = os.urandom(16 * SECTOR)
    cuts = sorted(random.Random(7).sample(range(1, len(data)), 249))
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
    head = r.q.add_chain([HEADER.pack(T_OUT, 0, 40)] + pieces, [1], indirect=True)
    r.drv.notify(0)
    r.collect(1)
    assert r.q.in_buffers(head) == [bytes([S_OK])]
    assert file_bytes(r.path, 40 * SECTOR, len(data)) == data
    head = r.q.add_chain([HEADER.pack(T_IN, 0, 40)], [len(p) for p in pieces] + [1], indirect=True)
    r.drv.notify(0)
    r.collect(1)
    assert b"".join(r.q.in_buffers(head)) == data + bytes([S_OK])


def test_adjacent_buffers_become_one_iovec(rigs, image):
    """Descriptors that continue one another in guest memory reach the host as one iovec, and still log dirt."""
    r = rigs(image, direct=True, event_idx=True)
    hdr, status, buf = BUF, BUF + 0x100, BUF + 0x10000
    data = os.urandom(8 * SECTOR)
    r.mem.write(buf, data)
    r.mem.write(hdr, HEADER.pack(T_OUT, 0, 16))
    # Four adjacent 1 KiB pieces: one iovec.
    _serve_raw(r, [(hdr, 16, F_NEXT, 1)] + [(buf + 0x400 * i, 0x400, F_NEXT, 2 + i) for i in range(4)]
               + [(status, 1, F_WRITE, 0)])
    assert r.mem.read(status, 1) == bytes([S_OK])
    assert file_bytes(r.path, 16 * SECTOR, 4 * SECTOR * 2) == data
    stats = r.dev.native.stats()
    assert (stats["rw_requests"], stats["rw_segments"]) == (1, 1)

    # Read back into a gap-split layout: pieces 0-1 adjacent, 2 far off, 3 just after 2: two iovecs.
    r.mem.start_dirty_log()
    far = BUF + 0x30000 - 0x400  # piece 2 ends, and piece 3 starts, on a page boundary
    layout = [buf + 0x8000, buf + 0x8400, far, far + 0x400]
    r.mem.write(hdr, HEADER.pack(T_IN, 0, 16))
    pages, used_pages = _serve_raw(r, [(hdr, 16, F_NEXT, 1)]
                                   + [(a, 0x400, F_WRITE | F_NEXT, 2 + i) for i, a in enumerate(layout)]
                                   + [(status, 1, F_WRITE, 0)])
    r.mem.stop_dirty_log()
    assert r.mem.read(status, 1) == bytes([S_OK])
    assert b"".join(r.mem.read(a, 0x400) for a in layout) == data[:4 * 0x400]
    stats = r.dev.native.stats()
    assert (stats["rw_requests"], stats["rw_segments"]) == (2, 3)
    # The joined iovec that crosses a page boundary marks both pages.
    assert pages == {(buf + 0x8000) >> 12, far >> 12, (far + 0x400) >> 12, status >> 12} | used_pages


# --- interrupts --------------------------------------------------------------------------


def _get_ids(r, n):
    for _ in range(n):
        r.q.add_chain([HEADER.pack(T_GET_ID, 0, 0)], [21])


def test_interrupts_follow_used_event(rigs, image):
    r = rigs(image, direct=True, event_idx=True)
    _get_ids(r, 3)
    r.kick()
    assert r.interrupts == 1  # used_event 0, used.idx 0 -> 3
    assert r.kick() is None and r.interrupts == 1  # nothing new
    r.q.set_used_event(5)  # wake me once used.idx passes 5
    old = 3
    for want in (False, False, True):
        _get_ids(r, 1)
        r.kick()
        assert bool(r.interrupts - 1) is want is vring_need_event(5, old + 1, old)
        old += 1
    # With EVENT_IDX, avail.flags is ignored (2.7.7.2) and avail_event is re-armed.
    r.q.get_used()
    r.q.set_no_interrupt(True)
    _get_ids(r, 1)
    r.kick()
    assert r.interrupts == 3 and r.q.avail_event() == 7


def test_interrupts_follow_no_interrupt(rigs, image):
    r = rigs(image, direct=True, event_idx=False)
    r.q.set_no_interrupt(True)
    _get_ids(r, 2)
    r.kick()
    assert r.interrupts == 0 and len(r.q.get_used()) == 2
    r.q.set_no_interrupt(False)
    _get_ids(r, 1)
    r.kick()
    assert r.interrupts == 1
    assert r.q.avail_event() == 0  # only written with EVENT_IDX


# --- dirty logging -------------------------------------------------------------------


def _serve_raw(r, descs):
    """Post raw descriptors, drop the driver's own dirt, serve, and return the pages the device dirtied."""
    slot = r.q.used_idx() % 256
    r.q.add_raw(descs)
    r.mem.take_dirty_pages()
    assert r.kick() is None
    pages = pages_of(r.mem.take_dirty_pages())
    r.q.get_used()
    used = r.q.used_addr
    return pages, {(used + 2) >> 12, (used + 4 + 8 * slot) >> 12, (used + 4 + 8 * 256) >> 12}


def test_dirty_log_sees_what_c_writes(rigs, image):
    r = rigs(image, direct=True, event_idx=True)
    data = os.urandom(2 * SECTOR)
    r.q.add_chain([HEADER.pack(T_OUT, 0, 8), data], [1])
    r.kick()  # builds the C memory table before logging starts
    r.q.get_used()
    # C reads the logging flag GuestMemory shares with it: no table rebuild needed.
    r.mem.start_dirty_log()
    hdr, buf, status = BUF, BUF + 0x10800, BUF + 0x20000
    r.mem.write(hdr, HEADER.pack(T_IN, 0, 8))
    # A read straddling two pages: both get marked, the header's page does not.
    pages, used_pages = _serve_raw(r, [(hdr, 16, F_NEXT, 1), (buf, 0x1000, F_WRITE | F_NEXT, 2),
                                       (status, 1, F_WRITE, 0)])
    assert pages == {buf >> 12, (buf + 0xFFF) >> 12, status >> 12} | used_pages
    assert r.mem.read(buf, 2 * SECTOR) == data

    # A write only reads guest memory: just the status byte and the used ring are dirtied.
    r.mem.write(hdr, HEADER.pack(T_OUT, 0, 8))
    pages, used_pages = _serve_raw(r, [(hdr, 16, F_NEXT, 1), (buf, 0x400, F_NEXT, 2), (status, 1, F_WRITE, 0)])
    assert pages == {status >> 12} | used_pages

    # GET_ID writes the serial, here with the status byte in the same buffer.
    r.mem.write(hdr, HEADER.pack(T_GET_ID, 0, 0))
    pages, used_pages = _serve_raw(r, [(hdr, 16, F_NEXT, 1), (buf + 0x3000, 21, F_WRITE, 0)])
    assert pages == {(buf + 0x3000) >> 12} | used_pages
    assert r.mem.read(buf + 0x3000, 21) == b"fuzz" + bytes(16) + bytes([S_OK])

    r.mem.stop_dirty_log()
    r.mem.write(hdr, HEADER.pack(T_IN, 0, 8))
    pages, _ = _serve_raw(r, [(hdr, 16, F_NEXT, 1), (buf, 0x1000, F_WRITE | F_NEXT, 2), (status, 1, F_WRITE, 0)])
    assert pages == set()


# --- guest memory hotplug -------------------------------------------------------------


def test_region_changes_are_picked_up(rigs, image):
    mem = GuestMemory.create(RAM, hotplug_size=128 * MiB)
    base = mem.hotplug_base
    r = rigs(image, mem=mem)
    data = os.urandom(4 * SECTOR)
    assert r.request(T_OUT, 8, data)[0] == S_OK  # the C table is built without the new region
    region = mem.add_region(base, MiB)
    hdr, status = BUF, BUF + 0x100
    mem.write(hdr, HEADER.pack(T_IN, 0, 8))
    r.q.add_raw([(hdr, 16, F_NEXT, 1), (base + 0x1000, len(data), F_WRITE | F_NEXT, 2), (status, 1, F_WRITE, 0)])
    r.drv.notify(0)
    r.collect(1)
    assert not r.needs_reset()
    assert mem.read(status, 1) == bytes([S_OK])
    assert mem.read(base + 0x1000, len(data)) == data

    mem.remove_region(base)
    assert region.mm is None
    r.q.add_raw({10: (hdr, 16, F_NEXT, 11), 11: (base + 0x1000, len(data), F_WRITE | F_NEXT, 12),
                 12: (status, 1, F_WRITE, 0)})
    r.drv.notify(0)
    wait_for(r.needs_reset, "DEVICE_NEEDS_RESET")
    assert f"buffer {base + 0x1000:#x}+{len(data):#x} is outside guest RAM" in r.dev.broken


# --- O_DIRECT and the bounce buffer ---------------------------------------------------


def test_bounce_buffer_for_misaligned_direct_io(rigs, tmp_path, io):
    path = make_image(tmp_path / "direct.img")
    try:
        r = rigs(path, io=io, cache="none")
    except DiskError as exc:
        pytest.skip(f"no O_DIRECT here: {exc}")
    # This host's O_DIRECT may take any buffer; pretend it wants 4 KiB alignment.
    r.dev.native.mem_align = PAGE
    data = os.urandom(3 * PAGE)
    head = r.q.add_chain([HEADER.pack(T_OUT, 0, 8), data[:100], data[100:PAGE + 7], data[PAGE + 7:]], [1])
    r.drv.notify(0)
    r.collect(1)
    assert r.q.in_buffers(head) == [bytes([S_OK])]
    assert file_bytes(path, 8 * SECTOR, len(data)) == data
    status, got, used = r.request(T_IN, 8, in_len=len(data))
    assert (status, got, used) == (S_OK, data, len(data) + 1)
    assert r.dev.native.stats()["bounced"] == 2
    # Write-zeroes through the same disk still works.
    head = r.q.add_chain([HEADER.pack(T_WRITE_ZEROES, 0, 0), segments((8, 8, 0))], [1])
    r.drv.notify(0)
    r.collect(1)
    assert file_bytes(path, 8 * SECTOR, PAGE) == bytes(PAGE)


# --- engines and executors --------------------------------------------------------------


def test_engine_choice(image):
    assert BlkSpec.__attrs_attrs__.engine.default == "native"
    disk = Disk(image)
    try:
        assert VirtioBlk("vda", disk).engine == "native"
        assert VirtioBlk("vda", disk, engine="python").native is None
        with pytest.raises(ValueError, match="engine"):
            VirtioBlk("vda", disk, engine="rust")
        with pytest.raises(ValueError, match="I/O mode"):
            NativeBlk(disk, b"", io="aio")
    finally:
        disk.close()


def test_auto_executor_prefers_io_uring(rigs, image):
    r = rigs(image)
    assert r.dev.native.io_kind == ("uring" if uring_available() else "threads")
    r.t.reset()
    assert r.dev.native.io_kind is None  # freed at reset
    r.init()
    assert r.dev.native.io_kind is not None and r.request(T_IN, 0, in_len=SECTOR)[0] == S_OK


# --- the atomic dirty-bitmap helpers ---------------------------------------------------------


def test_bitmap_helpers():
    bm = bytearray(16)
    ptr = ffi.from_buffer("uint8_t[]", bm)
    assert lib.vmm_bitmap_set_range(ptr, len(bm), 3, 3) == 0
    assert lib.vmm_bitmap_set_range(ptr, len(bm), 7, 25) == 0
    assert lib.vmm_bitmap_set_range(ptr, len(bm), 127, 127) == 0
    want = {3} | set(range(7, 26)) | {127}
    assert {i for i in range(128) if bm[i >> 3] >> (i & 7) & 1} == want
    # Out of range or backwards: refused, nothing set.
    assert lib.vmm_bitmap_set_range(ptr, len(bm), 120, 128) == -1
    assert lib.vmm_bitmap_set_range(ptr, len(bm), 9, 8) == -1
    with pytest.raises(ValueError):
        _set_bits(bm, 0, 128)
    out = bytearray(16)
    lib.vmm_bitmap_take(ptr, ffi.from_buffer("uint8_t[]", out), len(bm))
    assert {i for i in range(128) if out[i >> 3] >> (i & 7) & 1} == want
    assert bm == bytearray(16)


def _post_next(r, posted):
    """Post the next of a run of one-sector writes: write i puts byte i (mod 256) in sector 8 * i."""
    i = len(posted)
    posted.append(r.post(T_OUT, 8 * i, bytes([i & 0xFF]) * SECTOR))


def _assert_all_written(r, posted, got):
    """Every posted write came back in the used ring, once, and its sector holds its byte."""
    assert sorted(h for h, _ in got) == sorted(posted)
    for i in range(len(posted)):
        assert file_bytes(r.path, 8 * i * SECTOR, SECTOR) == bytes([i & 0xFF]) * SECTOR


def test_coalesced_interrupts_deliver_every_completion(rigs, image, io, monkeypatch):
    """The C loop may hold an interrupt back for more completions; none may be lost.

    Coalescing is forced on (any request in flight, a wait of up to the whole
    average latency). The driver behaves as Linux's: it waits for the
    interrupt, reads and acknowledges InterruptStatus, takes every used entry
    (each take re-arms used_event) and keeps 32 requests posted. A lost
    interrupt leaves it waiting with used entries it was never told about.
    """
    import select
    from vmmkit_plugins.blk import native as blk_native
    monkeypatch.setattr(blk_native, "COALESCE_MIN_INFLIGHT", 1)
    monkeypatch.setattr(blk_native, "COALESCE_SHIFT", 0)
    monkeypatch.setattr(blk_native, "COALESCE_FLOOR_NS", 0)
    r = rigs(image, engine="native-loop", io=io, event_idx=True)
    if io == "threads":
        r.dev.native._blk.pool_delay_ns = 1_000_000  # a disk, not the page cache: on a loaded host too, some stay in flight
    total, depth = 160, 32
    posted, got, woken = [], [], 0
    for _ in range(depth):
        _post_next(r, posted)
    r.drv.notify(0)
    while len(got) < total:
        ready, _, _ = select.select([r.irqfd.fd], [], [], 10)
        assert ready, (f"no interrupt for 10 s with {len(got)} of {total} answered; "
                       f"used.idx {r.q.used_idx()}, stats {r.dev.native.stats()}")
        r.irqfd.drain()
        woken += 1
        r.drv.ack_interrupt(r.drv.interrupt_status())
        while new := r.q.get_used():
            got.extend(new)
            for _ in new:
                if len(posted) < total:
                    _post_next(r, posted)
            if r.q.kick_prepare():
                r.drv.notify(0)
    _assert_all_written(r, posted, got)
    assert all(r.q.in_buffers(h)[-1] == bytes([S_OK]) for h in posted)
    stats = r.dev.native.stats()
    # An interrupt waits only with requests still in flight when it falls due. The thread pool
    # finishes them one by one, so it always has some; io_uring may finish a whole batch at
    # once (and sync I/O always does), so there it may never wait.
    if io == "threads":
        assert stats["serve_coalesced"] > 0, stats
    elif io == "sync":
        assert stats["serve_coalesced"] == 0, stats
    assert woken < total


def _fake_activity(tmp_path, monkeypatch, blocking):
    """vCPU activity from a statistics file the test writes, handed to the transports made from now on."""
    from tests.unit.test_kvm_stats import stats_file
    from vmmkit.kvm.stats import KvmStats, VcpuActivity
    from vmmkit.virtio import mmio
    from vmmkit.virtio.device import NativeInterrupt
    activity = VcpuActivity()
    activity.add_stats(KvmStats(stats_file(tmp_path, {"blocking": int(blocking), "halt_exits": 7})))
    monkeypatch.setattr(mmio, "NativeInterrupt", lambda isr, fd, _activity=None: NativeInterrupt(isr, fd, activity))
    return activity


def _busy_rig(rigs, image, monkeypatch, tmp_path, blocking, io, pool_delay_ns=0, **constants):
    """A native-loop rig whose vCPU statistics say *blocking* (or busy), with the blk module's
    *constants* set for the test, and a thread pool that takes *pool_delay_ns* a request."""
    from vmmkit_plugins.blk import native as blk_native
    for name, value in constants.items():
        monkeypatch.setattr(blk_native, name, value)
    activity = _fake_activity(tmp_path, monkeypatch, blocking)
    r = rigs(image, engine="native-loop", io=io, event_idx=True)
    if pool_delay_ns:
        r.dev.native._blk.pool_delay_ns = pool_delay_ns
    return r, activity


def _drive(r, total, refill, stagger=0.0):
    """A driver as Linux's writing *total* sectors: two requests first (*stagger* seconds apart),
    then ``refill(in_flight, answered)`` more after each batch of used entries, kicking only
    when the device asked. Fails on a lost request (no interrupt for 10 s) or wrong data;
    returns the kicks it made."""
    import select
    import time
    posted, got, kicks = [], [], 0

    def post(n):
        nonlocal kicks
        for _ in range(min(n, total - len(posted))):
            _post_next(r, posted)
        if r.q.kick_prepare():
            r.drv.notify(0)
            kicks += 1

    post(1)
    time.sleep(stagger)
    post(1)
    while len(got) < total:
        ready, _, _ = select.select([r.irqfd.fd], [], [], 10)
        assert ready, f"no interrupt for 10 s with {len(got)} of {total} answered; stats {r.dev.native.stats()}"
        r.irqfd.drain()
        r.drv.ack_interrupt(r.drv.interrupt_status())
        while new := r.q.get_used():
            got.extend(new)
            post(refill(len(posted) - len(got), len(new)))
    _assert_all_written(r, posted, got)
    return kicks


@pytest.mark.parametrize("blocking", [False, True], ids=["busy", "waiting"])
def test_a_busy_guest_gets_its_completions_together(rigs, image, io, monkeypatch, tmp_path, blocking):
    """With two requests in flight (too few to coalesce), an interrupt waits only while no vCPU is halted.

    The wait is made as long as the average latency so that a request's pair
    partner nearly always finishes within it; the driver fails on a lost
    interrupt either way.
    """
    # BUSY_FLOOR_NS 0: the latency rule alone (the streaming tests take the floor). The thread
    # pool is a disk, not the page cache: on a loaded host too, some stay in flight.
    r, activity = _busy_rig(rigs, image, monkeypatch, tmp_path, blocking, io,
                            pool_delay_ns=1_000_000 if io == "threads" else 0,
                            BUSY_SHIFT=0, COALESCE_FLOOR_NS=0, BUSY_FLOOR_NS=0)
    # Two requests in flight (under COALESCE_MIN_INFLIGHT): the next pair goes once both are back.
    _drive(r, 120, lambda in_flight, _answered: 0 if in_flight else 2)
    stats = r.dev.native.stats()
    if blocking or io == "sync":  # sync I/O is done before the interrupt is due: nothing in flight to wait for
        assert stats["serve_busy_held"] == 0 and stats["serve_coalesced"] == 0, stats
    else:
        # Too few in flight for plain coalescing: whatever waited, waited for the busy guest. The
        # thread pool finishes a pair one by one, so there the first always waits for the second
        # (io_uring may finish both at once).
        assert stats["serve_busy_held"] == stats["serve_coalesced"], stats
        if io == "threads":
            assert stats["serve_busy_held"] > 0, stats
    r.close()  # the device's loop reads the statistics until it stops
    activity.close()


@pytest.mark.parametrize("blocking", [False, True], ids=["busy", "waiting"])
def test_a_busy_guest_posts_without_kicks(rigs, image, monkeypatch, tmp_path, blocking):
    """With a request in flight, a busy guest is asked for no kick; a waiting one is, after every round.

    The thread pool stands in for a slow disk (50 ms a request, so that a
    loaded host still posts in time: with 20 ms it once did not), and the
    driver keeps two requests in flight half a request apart, posting the
    next as each comes back and kicking only when the device asked for it: a
    request the device failed to find by itself would never be answered, and
    the test fails on the 10 s wait. Interrupts are not held here, so that
    each completion comes back alone.
    """
    r, activity = _busy_rig(rigs, image, monkeypatch, tmp_path, blocking, "threads", pool_delay_ns=50_000_000,
                            BUSY_SHIFT=63, BUSY_FLOOR_NS=0)
    total = 40
    kicks = _drive(r, total, lambda _in_flight, answered: answered, stagger=0.025)
    stats = r.dev.native.stats()
    if blocking:
        assert stats["serve_busy_unarmed"] == 0 and kicks > total // 2, (kicks, stats)
    else:
        assert stats["serve_busy_unarmed"] > 0 and kicks < total // 8, (kicks, stats)
    r.close()  # the device's loop reads the statistics until it stops
    activity.close()


def _stream(r, total, depth, gap):
    """A driver as a CPU-bound fio: it posts one request every *gap* seconds while fewer than
    *depth* are unanswered, kicking only when the device asked, and takes every used entry on
    each interrupt. Fails on a lost request (no progress for 10 s) or wrong data; returns the
    number of interrupts it took."""
    import select
    import time
    posted, got, interrupts = [], [], 0
    last = time.monotonic()
    while len(got) < total:
        if len(posted) < total and len(posted) - len(got) < depth:
            _post_next(r, posted)
            if r.q.kick_prepare():
                r.drv.notify(0)
        ready, _, _ = select.select([r.irqfd.fd], [], [], gap)
        if ready:
            r.irqfd.drain()
            interrupts += 1
            r.drv.ack_interrupt(r.drv.interrupt_status())
            while new := r.q.get_used():
                got.extend(new)
                last = time.monotonic()
        assert time.monotonic() - last < 10, (f"no completion for 10 s with {len(got)} of {total} answered; "
                                              f"stats {r.dev.native.stats()}")
    _assert_all_written(r, posted, got)
    return interrupts


@pytest.mark.parametrize("blocking", [False, True], ids=["busy", "waiting"])
def test_a_busy_streaming_guest_takes_its_completions_together(rigs, image, monkeypatch, tmp_path, blocking):
    """A busy guest that streams (posts a request every millisecond, eight unanswered at most, on a
    disk of 2 ms a request: one or two in flight, often none when an interrupt falls due) gets
    interrupts that carry several completions each, held by the floor also with nothing in
    flight; the latency rule alone would give it one per request or two. The floor is not capped
    by COALESCE_MAX_NS (2 ms here, which would give it about 40 of 120). A waiting guest gets
    each at once."""
    r, activity = _busy_rig(rigs, image, monkeypatch, tmp_path, blocking, "threads", pool_delay_ns=2_000_000,
                            BUSY_FLOOR_NS=20_000_000)
    total = 120
    interrupts = _stream(r, total, depth=8, gap=0.001)
    stats = r.dev.native.stats()
    if blocking:
        assert stats["serve_busy_held"] == 0, stats
    else:
        assert stats["serve_busy_held"] > 0 and interrupts < total // 4, (interrupts, stats)
    r.close()  # the device's loop reads the statistics until it stops
    activity.close()


def test_a_busy_guest_with_one_request_at_a_time_gets_it_at_once(rigs, image, monkeypatch, tmp_path):
    """The floor is for streams: a busy guest that waits for each request before it posts the next
    (a synchronous reader beside a CPU hog) never has two completions in one interrupt, so its
    interrupts never wait with nothing in flight."""
    r, activity = _busy_rig(rigs, image, monkeypatch, tmp_path, False, "sync",
                            BUSY_FLOOR_NS=20_000_000)
    total = 40
    assert _stream(r, total, depth=1, gap=0.001) == total
    stats = r.dev.native.stats()
    assert stats["serve_busy_held"] == 0 and stats["serve_coalesced"] == 0, stats
    r.close()
    activity.close()
