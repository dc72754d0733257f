"""Tests for the virtio-MMIO transport (vmmkit.virtio.mmio) and the device worker, no KVM.

A tiny echo device (copies its readable bytes into its writable buffers)
sits behind a real VirtioMmioTransport over anonymous guest memory; the
guest is MmioDriver/SplitQueueDriver. Without a KVM VM the transport turns
QueueNotify writes into eventfd signals itself, so a notify wakes the real
worker thread. Waits use a deadline only as a hang guard.
"""

from __future__ import annotations

import os
import select
import struct
import threading
import time

import attrs
import pytest

from vmmkit import threads
from vmmkit.memory import GuestMemory
from vmmkit.testing import virtio_driver as vd
from vmmkit.testing.virtio_driver import GuestAllocator, MmioDriver
from vmmkit.virtio import TransportState, VirtioDevice, VirtioMmioTransport

MiB = 1 << 20
ECHO_ID = 0x99
ECHO_FEATURE = 3  # a device-specific bit the echo device offers
QSIZE = 64
NEEDS_RESET = 64
R = vd  # register offsets and status bits, spelled as the driver module has them


class Echo(VirtioDevice):
    """Copies the readable bytes of each chain into its writable buffers."""

    device_id = ECHO_ID
    queue_sizes = (QSIZE,)

    def __init__(self, name="echo"):
        super().__init__(name)
        self.served = 0

    def device_features(self):
        return 1 << ECHO_FEATURE

    def config_bytes(self):
        return struct.pack("<IHH", 0xDEADBEEF, 7, 9)

    def handle_chain(self, queue_index, chain):
        memory = self.ctx.memory
        n = chain.write(memory, 0, chain.read(memory))
        self.served += 1
        return n


class Irq:
    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.count += 1


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


def live_device_threads():
    return [t for t in threads.threads_by_role().get(threads.ROLE_DEVICE, []) if t.is_alive()]


@pytest.fixture
def mem():
    m = GuestMemory.create(16 * MiB)
    yield m
    m.close()


@pytest.fixture
def alloc():
    return GuestAllocator(0x10000, 16 * MiB)


class Rig:
    def __init__(self, mem, alloc):
        self.mem, self.alloc = mem, alloc
        self.irq = Irq()
        self.dev = Echo()
        self.t = VirtioMmioTransport(self.dev, mem, self.irq)
        self.drv = MmioDriver(self.t, mem, alloc)

    def init(self, **kw):
        (q,) = self.drv.init(**kw)
        return q

    def echo(self, q, payloads, *, indirect=False):
        """Post one request per payload, kick once, wait for them all; return [(head, len, data)]."""
        heads = [q.add_chain([p], [len(p)], indirect=indirect) for p in payloads]
        self.drv.notify(0)
        got = []
        wait_for(lambda: got.extend(q.get_used()) or len(got) == len(heads), "used entries")
        assert sorted(h for h, _ in got) == sorted(heads)
        return [(h, n, b"".join(q.in_buffers(h))) for h, n in got]


@pytest.fixture
def rig(mem, alloc):
    r = Rig(mem, alloc)
    yield r
    r.t.close()
    assert r.dev._thread is None
    assert not live_device_threads()


def features_ok_handshake(drv, accept):
    drv.reset()
    drv.add_status(R.STATUS_ACKNOWLEDGE)
    drv.add_status(R.STATUS_DRIVER)
    drv.write_driver_features(accept)
    drv.add_status(R.STATUS_FEATURES_OK)
    return drv.status()


# --- identity and features -------------------------------------------------------


def test_identity_registers(rig):
    d = rig.drv
    assert d.magic() == 0x74726976
    assert d.version() == 2
    assert d.device_id() == ECHO_ID
    assert d.vendor_id() == 0x6B6D6D76
    d.write32(R.VIRTIO_MMIO_QUEUE_SEL, 0)
    assert d.read32(R.VIRTIO_MMIO_QUEUE_NUM_MAX) == QSIZE
    assert d.read32(R.VIRTIO_MMIO_QUEUE_READY) == 0
    d.write32(R.VIRTIO_MMIO_QUEUE_SEL, 1)  # no such queue
    assert d.read32(R.VIRTIO_MMIO_QUEUE_NUM_MAX) == 0
    assert d.read32(R.VIRTIO_MMIO_SHM_LEN_LOW) == 0xFFFFFFFF  # no shared memory
    assert d.status() == 0 and d.interrupt_status() == 0


def test_device_features(rig):
    d = rig.drv
    d.write32(R.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0)
    lo = d.read32(R.VIRTIO_MMIO_DEVICE_FEATURES)
    d.write32(R.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
    hi = d.read32(R.VIRTIO_MMIO_DEVICE_FEATURES)
    assert hi & 1  # VIRTIO_F_VERSION_1 is bit 32
    assert lo >> 28 & 1 and lo >> 29 & 1  # INDIRECT_DESC, EVENT_IDX
    assert lo >> ECHO_FEATURE & 1
    assert d.device_features() == (hi << 32) | lo
    d.write32(R.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2)
    assert d.read32(R.VIRTIO_MMIO_DEVICE_FEATURES) == 0


@pytest.mark.parametrize("accept", [
    (1 << 32) | (1 << 40),           # a bit that was never offered
    (1 << 32) | (1 << 4),
    1 << 29,                          # no VERSION_1
    0,
])
def test_features_ok_refused(rig, accept):
    status = features_ok_handshake(rig.drv, accept)
    assert not status & R.STATUS_FEATURES_OK
    assert status == R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER
    # The driver may fix its choice and try again.
    rig.drv.write_driver_features(1 << 32)
    rig.drv.add_status(R.STATUS_FEATURES_OK)
    assert rig.drv.status() & R.STATUS_FEATURES_OK


def test_features_ok_accepts_offered_bits(rig):
    accept = (1 << 32) | (1 << 28) | (1 << 29) | (1 << ECHO_FEATURE)
    assert features_ok_handshake(rig.drv, accept) & R.STATUS_FEATURES_OK
    assert rig.t.state().driver_features == accept


def test_status_bits_are_only_cleared_by_writing_zero(rig):
    d = rig.drv
    d.set_status(R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER)
    d.set_status(R.STATUS_ACKNOWLEDGE)
    assert d.status() == R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER
    d.set_status(R.STATUS_DRIVER)
    assert d.status() == R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER
    d.set_status(R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER | R.STATUS_FAILED)
    assert d.status() == R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER | R.STATUS_FAILED
    d.set_status(NEEDS_RESET | R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER | R.STATUS_FAILED)
    assert not d.status() & NEEDS_RESET  # the driver cannot set the device's bit
    d.set_status(0)
    assert d.status() == 0


def test_feature_writes_outside_the_negotiation_window_are_ignored(rig):
    d = rig.drv
    d.reset()
    d.add_status(R.STATUS_ACKNOWLEDGE)
    d.write_driver_features(1 << 32)  # before DRIVER: ignored
    assert rig.t.state().driver_features == 0
    d.add_status(R.STATUS_DRIVER)
    d.add_status(R.STATUS_FEATURES_OK)
    assert not d.status() & R.STATUS_FEATURES_OK  # VERSION_1 never got through
    d.write_driver_features(1 << 32)
    d.add_status(R.STATUS_FEATURES_OK)
    assert d.status() & R.STATUS_FEATURES_OK
    d.write_driver_features((1 << 32) | (1 << 29))  # after FEATURES_OK: ignored
    assert rig.t.state().driver_features == 1 << 32


def test_queue_registers_ignored_before_features_ok_and_after_driver_ok(rig, mem):
    d, t = rig.drv, rig.t
    d.reset()
    d.add_status(R.STATUS_ACKNOWLEDGE)
    d.add_status(R.STATUS_DRIVER)
    d.write32(R.VIRTIO_MMIO_QUEUE_SEL, 0)
    d.write32(R.VIRTIO_MMIO_QUEUE_NUM, 8)
    d.write32(R.VIRTIO_MMIO_QUEUE_READY, 1)
    assert t.state().queues[0].size == QSIZE and d.read32(R.VIRTIO_MMIO_QUEUE_READY) == 0

    q = rig.init(queue_size=16)
    before = t.state().queues[0]
    assert before.size == 16 and before.ready
    for reg, value in ((R.VIRTIO_MMIO_QUEUE_NUM, 8), (R.VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1230),
                       (R.VIRTIO_MMIO_QUEUE_DESC_HIGH, 1), (R.VIRTIO_MMIO_QUEUE_DRIVER_LOW, 0x2000),
                       (R.VIRTIO_MMIO_QUEUE_DEVICE_LOW, 0x3000), (R.VIRTIO_MMIO_QUEUE_READY, 0)):
        d.write32(reg, value)
    assert t.state().queues[0] == before
    assert d.read32(R.VIRTIO_MMIO_QUEUE_READY) == 1
    assert rig.echo(q, [b"still fine"])[0][2] == b"still fine"


def program_queue(d, size, desc, avail, used):
    """Queue 0 set-up by hand, register by register, as virtio_mmio.c does it."""
    d.write32(R.VIRTIO_MMIO_QUEUE_SEL, 0)
    d.write32(R.VIRTIO_MMIO_QUEUE_NUM, size)
    for low, addr in ((R.VIRTIO_MMIO_QUEUE_DESC_LOW, desc), (R.VIRTIO_MMIO_QUEUE_DRIVER_LOW, avail),
                      (R.VIRTIO_MMIO_QUEUE_DEVICE_LOW, used)):
        d.write32(low, addr)
        d.write32(low + 4, addr >> 32)
    d.write32(R.VIRTIO_MMIO_QUEUE_READY, 1)


@pytest.mark.parametrize("ring", ["size", "desc", "used"])
def test_bad_ring_setup_at_driver_ok_needs_reset(rig, alloc, ring):
    d = rig.drv
    assert features_ok_handshake(d, 1 << 32) & R.STATUS_FEATURES_OK
    desc, avail, used = alloc.alloc(16 * 8, 16), alloc.alloc(6 + 2 * 8, 2), alloc.alloc(6 + 8 * 8, 4)
    size = 8
    if ring == "size":
        size = 3
    elif ring == "desc":
        desc += 8  # misaligned
    else:
        used = 16 * MiB - 8  # runs past RAM
    program_queue(d, size, desc, avail, used)
    d.add_status(R.STATUS_DRIVER_OK)
    assert d.status() & NEEDS_RESET
    assert d.interrupt_status() & R.VIRTIO_MMIO_INT_CONFIG
    assert rig.irq.count == 1
    assert rig.dev._thread is None  # the device was never started
    d.set_status(0)
    assert d.status() == 0


def test_driver_ok_without_features_ok_needs_reset(rig):
    d = rig.drv
    d.reset()
    d.add_status(R.STATUS_ACKNOWLEDGE)
    d.add_status(R.STATUS_DRIVER)
    d.add_status(R.STATUS_DRIVER_OK)
    assert d.status() & NEEDS_RESET
    assert rig.dev._thread is None


# --- serving requests ------------------------------------------------------------


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("indirect", [False, True])
def test_round_trip_through_the_worker(rig, event_idx, indirect):
    q = rig.init(event_idx=event_idx, indirect=indirect)
    assert bool(rig.drv.features >> 29 & 1) == event_idx
    assert bool(rig.drv.features >> 28 & 1) == indirect
    tq = rig.t.queues[0]
    assert (tq.event_idx, tq.indirect) == (event_idx, indirect)
    sent = 0
    for i in range(20):  # one at a time
        payload = bytes([i]) * (i + 1)
        ((_, n, data),) = rig.echo(q, [payload], indirect=indirect)
        assert (n, data) == (len(payload), payload)
        sent += 1
    payloads = [os.urandom(k) for k in (1, 100, 4096, 7, 33, 512, 2, 3, 9, 10)]
    by_head = {}
    heads = [q.add_chain([p], [len(p)], indirect=indirect) for p in payloads]
    rig.drv.notify(0)
    got = []
    wait_for(lambda: got.extend(q.get_used()) or len(got) == len(heads), "a batch")
    sent += len(payloads)
    for h, p in zip(heads, payloads):
        by_head[h] = p
    for h, n in got:
        assert n == len(by_head[h]) and b"".join(q.in_buffers(h)) == by_head[h]
    assert rig.dev.served == sent
    wait_for(lambda: rig.drv.interrupt_status() & R.VIRTIO_MMIO_INT_VRING, "the used-buffer interrupt")
    wait_for(lambda: rig.irq.count >= 1, "the irq line")
    if event_idx:
        # The worker re-armed: it wants a kick once the driver goes past what it took.
        wait_for(lambda: q.avail_event() == q.avail_idx(), "avail_event")
    assert not rig.drv.status() & NEEDS_RESET


def test_inspect_shows_a_kick_the_worker_has_not_taken(rig):
    q = rig.init(event_idx=True)
    rig.echo(q, [b"warm"])
    (seen,) = rig.t.inspect()["queues"]
    assert seen["kick_pending"] is False
    assert rig.dev.pause()
    head = q.add_chain([b"late"], [4])
    rig.drv.notify(0)
    (seen,) = rig.t.inspect()["queues"]
    assert seen["kick_pending"] is True, seen  # a paused worker leaves it in the eventfd
    assert seen["avail_idx"] - seen["next_avail"] == 1, seen
    rig.dev.resume()
    got = []
    wait_for(lambda: got.extend(q.get_used()) or got, "the reply after resume")
    assert got == [(head, 4)]
    assert rig.t.inspect()["queues"][0]["kick_pending"] is False


def test_chain_spread_over_several_buffers(rig):
    q = rig.init()
    head = q.add_chain([b"hel", b"lo ", b"world"], [2, 4, 10])
    rig.drv.notify(0)
    got = []
    wait_for(lambda: got.extend(q.get_used()) or got, "the reply")
    assert got == [(head, 11)]
    assert q.in_buffers(head) == [b"he", b"llo ", b"world\0\0\0\0\0"]


def test_interrupt_status_and_ack(rig):
    q = rig.init()
    rig.echo(q, [b"ping"])
    wait_for(lambda: rig.irq.count == 1, "the interrupt")
    assert rig.drv.interrupt_status() == R.VIRTIO_MMIO_INT_VRING
    rig.drv.ack_interrupt(R.VIRTIO_MMIO_INT_VRING)
    assert rig.drv.interrupt_status() == 0
    rig.echo(q, [b"pong"])
    wait_for(lambda: rig.irq.count == 2, "the second interrupt")
    rig.drv.ack_interrupt(R.VIRTIO_MMIO_INT_CONFIG)  # acking another bit leaves this one
    assert rig.drv.interrupt_status() == R.VIRTIO_MMIO_INT_VRING


def test_no_interrupt_flag_suppresses_the_irq(rig):
    q = rig.init()
    q.set_no_interrupt(True)
    rig.echo(q, [b"quiet"])
    # The used entry is out; the worker either already decided or is about to:
    # pausing the worker waits for its callback to finish.
    assert rig.dev.pause()
    rig.dev.resume()
    assert rig.irq.count == 0 and rig.drv.interrupt_status() == 0


def wait_worker_idle(rig, index=0):
    """Wait until the worker took the kick of queue *index* and finished handling it."""
    fd = rig.t.notify_fds[index].fileno()
    wait_for(lambda: not select.select([fd], [], [], 0)[0], "the worker to take the kick")
    assert rig.dev.pause()  # returns once the callback in progress is done
    rig.dev.resume()


def test_hostile_chain_breaks_the_device_until_reset(rig):
    q = rig.init()
    rig.echo(q, [b"before"])
    wait_for(lambda: rig.irq.count == 1, "the used-buffer interrupt")
    gen = rig.drv.read32(R.VIRTIO_MMIO_CONFIG_GENERATION)
    q.add_raw({5: (0x200000, 16, vd.VIRTQ_DESC_F_NEXT, 5)})  # a descriptor looping onto itself
    rig.drv.notify(0)
    wait_for(lambda: rig.drv.status() & NEEDS_RESET, "DEVICE_NEEDS_RESET")
    assert rig.drv.status() == NEEDS_RESET | R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER | \
        R.STATUS_FEATURES_OK | R.STATUS_DRIVER_OK
    wait_for(lambda: rig.irq.count == 2, "the config interrupt")
    assert rig.drv.interrupt_status() & R.VIRTIO_MMIO_INT_CONFIG
    assert rig.drv.read32(R.VIRTIO_MMIO_CONFIG_GENERATION) == gen + 1
    served = rig.dev.served

    # A broken device serves nothing more, even well-formed requests.
    q.add_chain([b"after"], [5])
    rig.drv.notify(0)
    wait_worker_idle(rig)
    assert q.used_idx() == 1 and q.get_used() == []
    assert rig.dev.served == served

    # Reset and a fresh initialisation bring it back.
    q = rig.init()
    assert not rig.drv.status() & NEEDS_RESET and rig.drv.interrupt_status() == 0
    assert rig.echo(q, [b"again"])[0][1:] == (5, b"again")


def test_worker_exception_needs_reset(rig, monkeypatch):
    q = rig.init()

    def boom(queue_index, chain):
        raise RuntimeError("device bug")

    monkeypatch.setattr(rig.dev, "handle_chain", boom)
    q.add_chain([b"x"], [1])
    rig.drv.notify(0)
    wait_for(lambda: rig.drv.status() & NEEDS_RESET, "DEVICE_NEEDS_RESET")
    assert rig.drv.interrupt_status() & R.VIRTIO_MMIO_INT_CONFIG


def test_notify_before_driver_ok_is_not_lost(rig):
    # The device looks at every queue once when it starts.
    d = rig.drv
    assert features_ok_handshake(d, 1 << 32) & R.STATUS_FEATURES_OK
    q = vd.SplitQueueDriver(rig.mem, 16, rig.alloc)
    program_queue(d, 16, q.desc_addr, q.avail_addr, q.used_addr)
    head = q.add_chain([b"early"], [5])
    d.notify(0)  # ignored: not DRIVER_OK yet
    d.add_status(R.STATUS_DRIVER_OK)
    got = []
    wait_for(lambda: got.extend(q.get_used()) or got, "the early request")
    assert got == [(head, 5)] and q.in_buffers(head) == [b"early"]


# --- register access edge cases ----------------------------------------------------


def test_odd_sized_and_misaligned_register_accesses(rig):
    t = rig.t
    for offset, size in ((R.VIRTIO_MMIO_MAGIC_VALUE, 1), (R.VIRTIO_MMIO_MAGIC_VALUE, 2),
                         (R.VIRTIO_MMIO_MAGIC_VALUE, 8), (R.VIRTIO_MMIO_VERSION + 1, 4),
                         (R.VIRTIO_MMIO_STATUS + 2, 2), (R.VIRTIO_MMIO_DEVICE_ID, 3)):
        assert t.bus_read(offset, size) == bytes(size)
    t.bus_write(R.VIRTIO_MMIO_STATUS, b"\x01")
    t.bus_write(R.VIRTIO_MMIO_STATUS, b"\x01\x00")
    t.bus_write(R.VIRTIO_MMIO_STATUS, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    t.bus_write(R.VIRTIO_MMIO_STATUS + 1, b"\x01\x00\x00\x00")
    t.bus_write(R.VIRTIO_MMIO_STATUS, b"")
    assert rig.drv.status() == 0
    t.bus_write(R.VIRTIO_MMIO_STATUS, b"\x01\x00\x00\x00")
    assert rig.drv.status() == R.STATUS_ACKNOWLEDGE


def test_unknown_offsets_read_zero(rig):
    q = rig.init()
    for offset in (0x018, 0x01C, 0x020, 0x028, 0x02C, 0x03C, 0x040, 0x048, 0x04C, 0x050, 0x054,
                   0x068, 0x074, 0x088, 0x09C, 0x0A8, 0x0C0, 0x0C4, 0x0F0, 0x0F8):
        assert rig.drv.read32(offset) == 0, hex(offset)
        rig.drv.write32(offset, 0xFFFFFFFF)
    # Writes to unknown registers changed nothing and broke nothing.
    assert rig.drv.status() & R.STATUS_DRIVER_OK and not rig.drv.status() & NEEDS_RESET
    assert rig.echo(q, [b"ok"])[0][2] == b"ok"


def test_config_space(rig):
    d = rig.drv
    assert d.config_read(0, 4) == struct.pack("<I", 0xDEADBEEF)
    assert d.config_read(4, 2) == struct.pack("<H", 7)
    assert d.config_read(6, 2) == struct.pack("<H", 9)
    assert d.config_read(0, 8) == struct.pack("<IHH", 0xDEADBEEF, 7, 9)
    assert d.config_read(5, 1) == b"\x00"
    assert d.config_read(8, 4) == bytes(4)  # past the end of config space
    assert d.config_read(0xEFC, 4) == bytes(4)
    d.config_write(0, b"\x01\x02\x03\x04")  # no writable fields: ignored
    assert d.config_read(0, 4) == struct.pack("<I", 0xDEADBEEF)
    assert d.read32(R.VIRTIO_MMIO_CONFIG_GENERATION) == 0


# --- snapshots and teardown --------------------------------------------------------


def test_state_mid_run_restores_into_a_fresh_transport(mem, alloc):
    first = Rig(mem, alloc)
    try:
        q = first.init(event_idx=True, indirect=True)
        for i in range(5):
            first.echo(q, [b"one %d" % i], indirect=bool(i & 1))
        wait_for(lambda: q.avail_event() == 5, "the worker to re-arm")
        state = first.t.state()
    finally:
        first.t.close()
    assert isinstance(state, TransportState)
    assert state.status == R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER | R.STATUS_FEATURES_OK | R.STATUS_DRIVER_OK
    assert (state.queues[0].next_avail, state.queues[0].next_used) == (5, 5)

    irq = Irq()
    dev = Echo("echo2")
    t = VirtioMmioTransport(dev, mem, irq)
    try:
        t.restore(state)
        assert t.state() == state
        drv = MmioDriver(t, mem, alloc)
        assert drv.status() == state.status
        heads = [q.add_chain([b"two %d" % i], [5], indirect=True) for i in range(5)]
        drv.notify(0)
        got = []
        wait_for(lambda: got.extend(q.get_used()) or len(got) == 5, "service after restore")
        assert sorted(h for h, _ in got) == sorted(heads)
        assert all(n == 5 for _, n in got)
        assert sorted(b"".join(q.in_buffers(h)) for h in heads) == [b"two %d" % i for i in range(5)]
        assert dev.served == 5
        qs = t.state().queues[0]
        assert (qs.next_avail, qs.next_used) == (10, 10)
    finally:
        t.close()
    assert dev._thread is None and not live_device_threads()


def test_restore_rejects_foreign_state(rig):
    state = rig.t.state()
    with pytest.raises(ValueError, match="version"):
        rig.t.restore(attrs.evolve(state, version=9))
    with pytest.raises(ValueError, match="queues"):
        rig.t.restore(attrs.evolve(state, queues=state.queues * 2))


def test_restore_of_a_broken_device_stays_broken(rig, mem, alloc):
    q = rig.init()
    q.add_raw({3: (16 * MiB, 16, 0, 0)})
    rig.drv.notify(0)
    wait_for(lambda: rig.drv.status() & NEEDS_RESET, "DEVICE_NEEDS_RESET")
    state = rig.t.state()
    rig.t.close()
    dev = Echo("echo3")
    t = VirtioMmioTransport(dev, mem, Irq())
    try:
        t.restore(state)
        assert MmioDriver(t, mem, alloc).status() & NEEDS_RESET
        assert dev._thread is None
    finally:
        t.close()


def test_close_releases_eventfds_and_the_worker(mem, alloc):
    r = Rig(mem, alloc)
    q = r.init()
    r.echo(q, [b"x"])
    assert r.dev._thread is not None and r.dev._thread.is_alive()
    thread = r.dev._thread
    fds = [fd.fileno() for fd in r.t.notify_fds]
    assert all(n >= 0 for n in fds)
    r.t.close()
    assert not thread.is_alive()
    assert all(fd.fd == -1 for fd in r.t.notify_fds)
    for n in fds:
        # Nothing else in this process opens fds meanwhile, so the number is free.
        with pytest.raises(OSError):
            os.fstat(n)
    r.t.close()  # idempotent
    assert not live_device_threads()
