"""The native virtio-blk engine answers each request when its I/O finishes.

``vmm_blk_submit`` starts the I/O of every posted chain and returns;
``vmm_blk_complete`` answers whatever has finished, woken by the executor's
eventfd. These tests hold one request's I/O in the kernel on purpose and
check what the driver sees meanwhile: other requests are answered, a FLUSH
is not, a pause or a reset waits.

The honest way to hold an I/O: the guest buffer of the request is a page
that is not there yet, registered with ``userfaultfd`` (MISSING mode). The
executor's ``preadv``/``pwritev`` faults on it inside the kernel and sleeps
until the test fills the page (``UFFDIO_COPY``), exactly like a slow disk.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import select
import struct
import threading
import time

import pytest

from test_blk_native import (  # noqa: F401 - fixtures
    BUF, F_NEXT, F_WRITE, HEADER, MiB, PAGE, S_OK, SECTOR, T_FLUSH, T_GET_ID, T_IN, T_OUT, file_bytes,
    image, io, make_image, rigs, wait_for,
)
from vmmkit import threads

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

NR_USERFAULTFD = 323  # x86-64
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_COPY = 0xC028AA03
UFFDIO_REGISTER_MODE_MISSING = 1
MADV_DONTNEED = 4

#: The held page: guest RAM no helper allocates from.
HELD = 20 * MiB


class Held:
    """One guest page whose first access blocks (in whichever thread) until :meth:`release`."""

    def __init__(self, mem, gpa=HELD):
        region = mem.regions()[0] if callable(getattr(mem, "regions", None)) else mem.regions[0]
        assert region.gpa <= gpa and gpa + PAGE <= region.gpa + region.size
        self.hva = region.host_addr + (gpa - region.gpa)
        self.fd = _libc.syscall(NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            pytest.skip(f"no userfaultfd here: {os.strerror(ctypes.get_errno())}")
        api = (ctypes.c_uint64 * 3)(UFFD_API, 0, 0)
        self._ioctl(UFFDIO_API, api)
        if _libc.madvise(self.hva, PAGE, MADV_DONTNEED):
            raise OSError(ctypes.get_errno(), "madvise")
        reg = (ctypes.c_uint64 * 4)(self.hva, PAGE, UFFDIO_REGISTER_MODE_MISSING, 0)
        self._ioctl(UFFDIO_REGISTER, reg)
        self.registered, self.released = True, False

    def _ioctl(self, request, arg):
        if _libc.ioctl(self.fd, request, ctypes.addressof(arg)) < 0:
            err = ctypes.get_errno()
            if request == UFFDIO_API:
                os.close(self.fd)
                pytest.skip(f"userfaultfd API refused: {os.strerror(err)}")
            raise OSError(err, os.strerror(err))

    def wait_fault(self, timeout=10):
        """Wait until some thread is blocked on the page."""
        r, _, _ = select.select([self.fd], [], [], timeout)
        assert r, "nobody touched the held page"

    def faulted(self):
        return bool(select.select([self.fd], [], [], 0)[0])

    def release(self, content=bytes(PAGE)):
        """Fill the page with *content*: whoever waits on it carries on."""
        if self.released:
            return
        self.released = True
        src = mmap.mmap(-1, PAGE)
        src.write(content.ljust(PAGE, b"\0"))
        buf = (ctypes.c_char * PAGE).from_buffer(src)
        copy = (ctypes.c_uint64 * 5)(self.hva, ctypes.addressof(buf), PAGE, 0, 0)
        try:
            self._ioctl(UFFDIO_COPY, copy)
        except OSError as exc:
            if exc.errno != 17:  # EEXIST: already there
                raise
        finally:
            del buf
            src.close()

    def close(self):
        self.release()
        if self.registered:
            self._ioctl(UFFDIO_UNREGISTER, (ctypes.c_uint64 * 2)(self.hva, PAGE))
            self.registered = False
            os.close(self.fd)


@pytest.fixture
def held():
    made = []

    def make(mem, gpa=HELD):
        h = Held(mem, gpa)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def _slow_read(r, sector, hdr=BUF + 0x200, status=BUF + 0x300):
    """Post a READ of one page at *sector* into the held page (descriptor slots 200..202)."""
    r.mem.write(hdr, HEADER.pack(T_IN, 0, sector))
    return r.q.add_raw({200: (hdr, 16, F_NEXT, 201), 201: (HELD, PAGE, F_WRITE | F_NEXT, 202),
                        202: (status, 1, F_WRITE, 0)})


def _slow_write(r, sector, hdr=BUF + 0x200, status=BUF + 0x300):
    """Post a WRITE of one page at *sector* from the held page (descriptor slots 200..202)."""
    r.mem.write(hdr, HEADER.pack(T_OUT, 0, sector))
    return r.q.add_raw({200: (hdr, 16, F_NEXT, 201), 201: (HELD, PAGE, F_NEXT, 202),
                        202: (status, 1, F_WRITE, 0)})


#: Executors whose I/O sleeps on the held page in a thread of its own: the
#: pool. io_uring first tries the copy inline, in the submitting thread, so
#: a held page would stop the device thread itself: that models a slow guest
#: page, not a slow disk (io_uring answers a slow disk with -EAGAIN inline
#: and finishes it in its own workers). Its asynchrony is covered above and
#: by the FLUSH ordering test below, without holding anything.
HOLDING = ["threads"]


@pytest.fixture(params=HOLDING)
def hio(request):
    from vmmkit_plugins.blk.native import uring_available
    if request.param == "uring" and not uring_available():
        pytest.skip("io_uring is not available here")
    return request.param


def _pool_threads():
    """This process's threads named like the native pool's workers."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return [n for n in names if n == "vmmkit-blk-io"]


def _rig(rigs, image, io):  # noqa: F811
    r = rigs(image, io=io)
    assert r.dev.native.io_kind == io
    return r


def _hold_or_skip(r, h, io):  # noqa: F811
    """Wait for the held request to sleep on the page."""
    h.wait_fault()


# --- (a) many requests in flight, answered in any order -----------------------------------


@pytest.mark.parametrize("count", [64, 250])
def test_many_in_flight_through_the_worker(rigs, image, io, count):  # noqa: F811
    """Mixed reads and writes, one kick: every one answered once, right data, right status."""
    r = _rig(rigs, image, io)
    rng = random.Random(count)
    old = {8 * i: rng.randbytes(4 * SECTOR) for i in range(count)}
    with open(image, "r+b") as f:
        for sector, data in old.items():
            f.seek(sector * SECTOR)
            f.write(data)
    new, reads, writes = {}, {}, {}
    for i, sector in enumerate(old):
        if i % 2:
            new[sector] = rng.randbytes(4 * SECTOR)
            writes[r.post(T_OUT, sector, new[sector], indirect=True)] = sector
        else:
            reads[r.post(T_IN, sector, in_len=4 * SECTOR, indirect=True)] = sector
    ids = [r.q.add_chain([HEADER.pack(T_GET_ID, 0, 0)], [21], indirect=True) for _ in range(3)]
    r.drv.notify(0)
    used = r.collect(count + 3)
    assert sorted(h for h, _ in used) == sorted(list(reads) + list(writes) + ids)
    lens = dict(used)
    for head, sector in reads.items():
        assert lens[head] == 4 * SECTOR + 1
        assert b"".join(r.q.in_buffers(head)) == old[sector] + bytes([S_OK])
    for head, sector in writes.items():
        assert lens[head] == 1 and r.q.in_buffers(head) == [bytes([S_OK])]
        assert file_bytes(image, sector * SECTOR, 4 * SECTOR) == new[sector]
    assert all(r.q.in_buffers(h)[-1][-1:] == bytes([S_OK]) for h in ids)
    assert r.dev.native.inflight == 0
    assert r.dev.native.stats()["requests"] == count + 3


# --- (b) a request that finishes early is answered before a slow one -------------------------


def test_early_completion_is_not_held_by_a_slow_request(rigs, image, hio, held):
    r = _rig(rigs, image, hio)
    data = os.urandom(PAGE) + os.urandom(SECTOR)
    with open(image, "r+b") as f:
        f.seek(8 * SECTOR)
        f.write(data)
    h = held(r.mem)
    slow = _slow_read(r, 8)
    r.drv.notify(0)
    _hold_or_skip(r, h, hio)
    fast = r.post(T_IN, 16, in_len=SECTOR)
    fast_id = r.q.add_chain([HEADER.pack(T_GET_ID, 0, 0)], [21])
    r.drv.notify(0)
    got = r.collect(2)
    # Answered while the slow read still sleeps in the kernel.
    assert sorted(hd for hd, _ in got) == sorted([fast, fast_id])
    assert b"".join(r.q.in_buffers(fast)) == data[PAGE:] + bytes([S_OK])
    assert r.dev.native.inflight == 1 and h.faulted()
    time.sleep(0.05)
    assert r.q.get_used() == []
    h.release()
    assert r.collect(1) == [(slow, PAGE + 1)]
    assert r.mem.read(BUF + 0x300, 1) == bytes([S_OK])
    assert r.mem.read(HELD, PAGE) == data[:PAGE]
    assert r.dev.native.inflight == 0


# --- (c) FLUSH waits for the writes before it ---------------------------------------------------


def test_flush_is_answered_only_after_earlier_writes(rigs, image, hio, held):
    r = _rig(rigs, image, hio)
    h = held(r.mem)
    slow = _slow_write(r, 8)
    r.drv.notify(0)
    _hold_or_skip(r, h, hio)
    flush = r.post(T_FLUSH)
    r.drv.notify(0)
    time.sleep(0.1)
    assert r.q.get_used() == []  # the write is stuck, so the FLUSH is not answered
    assert r.dev.native.inflight == 2
    content = os.urandom(PAGE)
    h.release(content)
    got = r.collect(2)
    assert [hd for hd, _ in got] == [slow, flush]  # the write first, then the FLUSH
    assert r.mem.read(BUF + 0x300, 1) == bytes([S_OK]) and r.q.in_buffers(flush) == [bytes([S_OK])]
    assert file_bytes(image, 8 * SECTOR, PAGE) == content


@pytest.mark.parametrize("executor", ["uring", "threads", "sync"])
def test_flush_after_many_writes(rigs, image, executor):  # noqa: F811
    """Without holding anything: every write posted before a FLUSH is answered before it."""
    from vmmkit_plugins.blk.native import uring_available
    if executor == "uring" and not uring_available():
        pytest.skip("io_uring is not available here")
    r = _rig(rigs, image, executor)
    for rnd in range(5):
        writes = [r.post(T_OUT, 8 * i, os.urandom(4 * SECTOR)) for i in range(40)]
        flush = r.post(T_FLUSH)
        r.drv.notify(0)
        order = [hd for hd, _ in r.collect(41)]
        assert order[-1] == flush and sorted(order[:-1]) == sorted(writes), rnd


# --- (d) pause waits for what is in flight -----------------------------------------------------


def test_pause_waits_for_requests_in_flight(rigs, image, hio, held):
    r = _rig(rigs, image, hio)
    with open(image, "r+b") as f:
        f.seek(8 * SECTOR)
        f.write(b"\x33" * PAGE)
    h = held(r.mem)
    slow = _slow_read(r, 8)
    r.drv.notify(0)
    _hold_or_skip(r, h, hio)
    result = []
    pauser = threading.Thread(target=lambda: result.append(r.dev.pause()))
    pauser.start()
    time.sleep(0.1)
    assert pauser.is_alive(), "pause returned with a request in flight"
    h.release()
    pauser.join(10)
    assert result == [True]
    # Paused: nothing in flight, the request answered into the used ring.
    assert r.dev.native.inflight == 0
    assert r.dev.state() is None
    assert r.q.get_used() == [(slow, PAGE + 1)]
    assert r.mem.read(HELD, PAGE) == b"\x33" * PAGE
    # Paused means paused: a kick is not served until resume.
    head = r.post(T_IN, 8, in_len=SECTOR)
    r.drv.notify(0)
    time.sleep(0.05)
    assert r.q.get_used() == [] and r.dev.native.inflight == 0
    r.dev.resume()
    assert r.collect(1) == [(head, SECTOR + 1)]


def test_state_refuses_requests_in_flight(rigs, image, held):  # noqa: F811
    r = _rig(rigs, image, "threads")
    h = held(r.mem)
    _slow_read(r, 8)
    r.drv.notify(0)
    _hold_or_skip(r, h, "threads")
    with pytest.raises(RuntimeError, match="in flight"):
        r.dev.state()
    h.release()
    r.collect(1)
    assert r.dev.state() is None


# --- (e) reset with requests in flight ---------------------------------------------------------


def test_reset_waits_for_a_held_request(rigs, image, hio, held):
    r = _rig(rigs, image, hio)
    h = held(r.mem)
    _slow_read(r, 8)
    r.drv.notify(0)
    _hold_or_skip(r, h, hio)
    resetter = threading.Thread(target=r.t.reset)
    resetter.start()
    time.sleep(0.1)
    assert resetter.is_alive(), "reset freed the executor under a request in flight"
    h.release()
    resetter.join(10)
    assert not resetter.is_alive()
    assert r.dev.native.io_kind is None and r.dev.native.inflight == 0
    r.init()
    data = os.urandom(SECTOR)
    assert r.request(T_OUT, 24, data)[0] == S_OK
    assert r.request(T_IN, 24, in_len=SECTOR)[:2] == (S_OK, data)


def test_reset_with_many_requests_in_flight(rigs, image, io):  # noqa: F811
    r = _rig(rigs, image, io)
    for rnd in range(10):
        for i in range(100):
            if i % 2:
                r.post(T_OUT, 8 * i, os.urandom(8 * SECTOR), indirect=True)
            else:
                r.post(T_IN, 8 * i, in_len=8 * SECTOR, indirect=True)
        r.drv.notify(0)
        time.sleep(rnd * 0.0005)
        r.t.reset()  # while they are in flight, or some of them
        assert r.dev.native.io_kind is None and r.dev.native.inflight == 0
        assert _pool_threads() == []  # the pool's workers were joined
        r.init()
        data = os.urandom(SECTOR)
        assert r.request(T_OUT, 2000, data)[0] == S_OK
        assert r.request(T_IN, 2000, in_len=SECTOR)[:2] == (S_OK, data)
    assert r.dev.io_errors == 0
    assert not [t for t in threads.threads_by_role().get(threads.ROLE_DEVICE, []) if t.is_alive()
                and t.name == "device:vda" and r.dev._thread is not t]


# --- more chains posted than request slots ----------------------------------------------------


def test_more_chains_than_request_slots(rigs, image, io):  # noqa: F811
    """Submit stops at the executor's slots; complete says when to take the rest."""
    r = rigs(image, direct=True, io=io)
    n = r.dev.native
    n.open(depth=4)
    data = {8 * i: os.urandom(2 * SECTOR) for i in range(40)}
    heads = {r.post(T_OUT, sector, d): sector for sector, d in data.items()}
    n.process(r.mem, r.vq)
    assert n.inflight <= 4
    answered = []
    for _ in range(200):
        _, again = n.drain(r.mem, r.vq)
        answered += r.q.get_used()
        if again:
            n.process(r.mem, r.vq)
        elif len(answered) == len(heads):
            break
    assert sorted(h for h, _ in answered) == sorted(heads)
    assert all(r.q.in_buffers(h) == [bytes([S_OK])] for h in heads)
    assert n.stats()["max_inflight"] == 4 and n.inflight == 0
    for sector, d in data.items():
        assert file_bytes(image, sector * SECTOR, len(d)) == d
