"""Tests for virtio-blk (vmmkit_plugins.blk) over a real image file, no KVM.

The guest is MmioDriver/SplitQueueDriver; requests go through the real
virtio-MMIO transport and the device's worker thread to a Disk on a file in
tmp_path, and results are checked against the host file's bytes.

Every device test runs against each engine: ``python`` (the reference),
``native`` (C, io_uring where the kernel allows it) and ``native-threads``
(C with the thread-pool fallback that hosts without io_uring get).
"""

from __future__ import annotations

import errno
import os
import struct
import tempfile
import time

import pytest

from vmmkit import threads
from vmmkit.kvm.vm import EventFd
from vmmkit.memory import GuestMemory
from vmmkit.testing import virtio_driver as vd
from vmmkit.testing.virtio_driver import GuestAllocator, MmioDriver
from vmmkit.virtio import VirtioMmioTransport
from vmmkit_plugins.blk.device import VirtioBlk
from vmmkit_plugins.blk.disk import Disk, DiskError

MiB = 1 << 20
SECTOR = 512
DISK_SIZE = 4 * MiB
SECTORS = DISK_SIZE // SECTOR
NEEDS_RESET = 64

# Spelled out from the spec (5.2.6) rather than imported from the code under test.
HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
F_RO, F_BLK_SIZE, F_FLUSH, F_DISCARD, F_WRITE_ZEROES = 5, 6, 9, 13, 14


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


class Rig:
    """A VirtioBlk on an image, behind a transport, driven by an initialised MmioDriver."""

    def __init__(self, path, *, engine="native", read_only=False, cache="writeback", serial="", indirect=True,
                 event_idx=False):
        self.path = path
        self.mem = GuestMemory.create(16 * MiB)
        self.alloc = GuestAllocator(0x10000, 16 * MiB)
        self.disk = Disk(path, read_only=read_only, cache=cache)
        loop = engine.endswith("-loop")  # an irqfd-style interrupt: the native engine serves in its C loop
        engine, _, native_io = engine.removesuffix("-loop").partition("-")
        self.dev = VirtioBlk("vda", self.disk, serial=serial, engine=engine, native_io=native_io or "auto")
        self.irq = EventFd()
        self.t = VirtioMmioTransport(self.dev, self.mem, self.irq.signal, irq_fd=self.irq.fd if loop else None)
        self.drv = MmioDriver(self.t, self.mem, self.alloc)
        (self.q,) = self.drv.init(indirect=indirect, event_idx=event_idx)

    def submit(self, out_bufs, in_lens, *, indirect=False):
        """Post one raw chain and wait for it; return (used len, bytes of all writable buffers)."""
        head = self.q.add_chain(out_bufs, in_lens, indirect=indirect)
        self.drv.notify(0)
        got = []
        wait_for(lambda: got.extend(self.q.get_used()) or got, "the request")
        assert [h for h, _ in got] == [head]
        return got[0][1], b"".join(self.q.in_buffers(head))

    def request(self, rtype, sector=0, data=b"", in_len=0, *, out_split=None, in_split=None, indirect=False):
        """One block request; return (status, data read, used len)."""
        out_bufs = [HEADER.pack(rtype, 0, sector)]
        if out_split:
            pos = 0
            for n in out_split:
                out_bufs.append(data[pos:pos + n])
                pos += n
            assert pos == len(data)
        elif data:
            out_bufs.append(data)
        in_lens = list(in_split) if in_split else ([in_len] if in_len else [])
        used, written = self.submit(out_bufs, in_lens + [1], indirect=indirect)
        return written[-1], written[:-1], used

    def close(self):
        self.t.close()
        self.dev.close()
        self.mem.close()
        self.irq.close()


@pytest.fixture
def image(tmp_path):
    return make_image(tmp_path / "disk.img")


ENGINES = ["python", "native", "native-threads", "native-loop", "native-threads-loop"]


@pytest.fixture(params=ENGINES)
def engine(request):
    """The data path under test: each device test runs once per engine."""
    return request.param


@pytest.fixture
def rigs(engine):
    made = []

    def make(path, **kw):
        kw.setdefault("engine", engine)
        r = Rig(path, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()
    assert not [t for t in threads.threads_by_role().get(threads.ROLE_DEVICE, []) if t.is_alive()]


@pytest.fixture
def rig(rigs, image):
    return rigs(image, serial="data0")


def segments(*segs):
    return b"".join(SEGMENT.pack(*s) for s in segs)


# --- config and features -----------------------------------------------------------


def test_config_space(rig):
    d = rig.drv
    assert struct.unpack("<Q", d.config_read(0, 8))[0] == SECTORS
    assert struct.unpack("<I", d.config_read(12, 4))[0] == 254  # queue size 256 minus header and status
    assert struct.unpack("<I", d.config_read(20, 4))[0] == SECTOR


def test_features_of_a_writable_disk(rig):
    offered = rig.drv.device_features()
    assert not offered >> F_RO & 1
    assert offered >> F_DISCARD & 1 and offered >> F_WRITE_ZEROES & 1
    assert offered >> F_BLK_SIZE & 1 and offered >> F_FLUSH & 1
    assert offered >> 32 & 1  # VERSION_1


def test_features_of_a_read_only_disk(rigs, image):
    offered = rigs(image, read_only=True).drv.device_features()
    assert offered >> F_RO & 1
    assert not offered >> F_DISCARD & 1 and not offered >> F_WRITE_ZEROES & 1


# --- data path -----------------------------------------------------------------------


def test_write_then_read_round_trip(rig):
    data = os.urandom(8 * SECTOR)
    status, _, used = rig.request(T_OUT, 3, data)
    assert (status, used) == (S_OK, 1)
    assert file_bytes(rig.path, 3 * SECTOR, len(data)) == data
    assert file_bytes(rig.path, 0, 3 * SECTOR) == bytes(3 * SECTOR)
    assert file_bytes(rig.path, 11 * SECTOR) == bytes(DISK_SIZE - 11 * SECTOR)

    status, got, used = rig.request(T_IN, 3, in_len=len(data))
    assert (status, got, used) == (S_OK, data, len(data) + 1)
    status, got, _ = rig.request(T_IN, 4, in_len=SECTOR)
    assert (status, got) == (S_OK, data[SECTOR:2 * SECTOR])


def test_last_sector_is_reachable(rig):
    data = os.urandom(SECTOR)
    assert rig.request(T_OUT, SECTORS - 1, data)[0] == S_OK
    assert file_bytes(rig.path, DISK_SIZE - SECTOR) == data
    assert rig.request(T_IN, SECTORS - 1, in_len=SECTOR)[:2] == (S_OK, data)


@pytest.mark.parametrize("indirect", [False, True])
def test_multi_buffer_requests(rig, indirect):
    data = os.urandom(4 * SECTOR)
    status, _, _ = rig.request(T_OUT, 100, data, out_split=[100, 412, 1, 1535], indirect=indirect)
    assert status == S_OK
    assert file_bytes(rig.path, 100 * SECTOR, len(data)) == data
    status, got, used = rig.request(T_IN, 100, in_split=[700, 324, 7, 1017], indirect=indirect)
    assert (status, got, used) == (S_OK, data, len(data) + 1)


def test_status_byte_may_share_the_last_data_buffer(rig):
    data = os.urandom(2 * SECTOR)
    rig.request(T_OUT, 9, data)
    used, written = rig.submit([HEADER.pack(T_IN, 0, 9)], [SECTOR, SECTOR + 1])
    assert used == 2 * SECTOR + 1
    assert written[:-1] == data and written[-1] == S_OK
    # The header may be split too.
    hdr = HEADER.pack(T_IN, 0, 9)
    used, written = rig.submit([hdr[:5], hdr[5:]], [SECTOR + 1])
    assert (written[-1], written[:-1]) == (S_OK, data[:SECTOR])


def test_get_id_pads_the_serial(rig):
    status, ident, used = rig.request(T_GET_ID, in_len=20)
    assert (status, ident, used) == (S_OK, b"data0" + bytes(15), 21)


def test_get_id_with_a_full_length_serial(rigs, image):
    r = rigs(image, serial="S" * 20)
    assert r.request(T_GET_ID, in_len=20)[:2] == (S_OK, b"S" * 20)


def test_flush(rig):
    rig.request(T_OUT, 0, b"\x01" * SECTOR)
    assert rig.request(T_FLUSH)[:3] == (S_OK, b"", 1)


def test_discard_punches_a_hole(rig):
    data = os.urandom(MiB)
    with open(rig.path, "r+b") as f:
        f.seek(MiB)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    blocks_before = os.stat(rig.path).st_blocks
    assert blocks_before * 512 >= MiB
    status, _, _ = rig.request(T_DISCARD, data=segments((MiB // SECTOR, MiB // SECTOR, 0)))
    assert status == S_OK
    st = os.stat(rig.path)
    assert st.st_size == DISK_SIZE
    assert st.st_blocks < blocks_before
    assert file_bytes(rig.path, MiB, MiB) == bytes(MiB)
    assert rig.request(T_IN, MiB // SECTOR, in_len=64 * 1024)[:2] == (S_OK, bytes(64 * 1024))


@pytest.mark.parametrize("flags", [0, 1])
def test_write_zeroes(rig, flags):
    data = os.urandom(16 * SECTOR)
    assert rig.request(T_OUT, 32, data)[0] == S_OK
    # Zero sectors 36..39 and 44..45, in two segments.
    status, _, _ = rig.request(T_WRITE_ZEROES, data=segments((36, 4, flags), (44, 2, flags)))
    assert status == S_OK
    want = bytearray(data)
    want[4 * SECTOR:8 * SECTOR] = bytes(4 * SECTOR)
    want[12 * SECTOR:14 * SECTOR] = bytes(2 * SECTOR)
    assert file_bytes(rig.path, 32 * SECTOR, len(data)) == bytes(want)
    assert rig.request(T_IN, 32, in_len=len(data))[:2] == (S_OK, bytes(want))
    assert os.stat(rig.path).st_size == DISK_SIZE


# --- bad requests --------------------------------------------------------------------


def test_data_length_not_a_multiple_of_512(rig):
    before = file_bytes(rig.path)
    assert rig.request(T_OUT, 0, b"\xff" * 100)[0] == S_IOERR
    assert rig.request(T_OUT, 0, b"\xff" * (SECTOR + 1))[0] == S_IOERR
    assert rig.request(T_IN, 0, in_len=100)[:3] == (S_IOERR, bytes(100), 1)
    assert file_bytes(rig.path) == before


@pytest.mark.parametrize("sector,count", [(SECTORS, 1), (SECTORS - 1, 2), (SECTORS + 1000, 1),
                                          (2 ** 64 - 1, 1), (2 ** 63, 1), (2 ** 64 - 1, 0)])
def test_sectors_past_the_end(rig, sector, count):
    before = file_bytes(rig.path)
    status, _, used = rig.request(T_OUT, sector, b"\xab" * (count * SECTOR))
    assert (status, used) == (S_IOERR, 1)
    status, got, used = rig.request(T_IN, sector, in_len=count * SECTOR)
    assert (status, got, used) == (S_IOERR, bytes(count * SECTOR), 1)
    assert file_bytes(rig.path) == before


def test_unknown_request_type(rig):
    assert rig.request(99, 0, in_len=SECTOR)[:3] == (S_UNSUPP, bytes(SECTOR), 1)


@pytest.mark.parametrize("length", [0, 1, 8, 15])
def test_short_header(rig, length):
    hdr = HEADER.pack(T_IN, 0, 0)[:length]
    used, written = rig.submit([hdr] if length else [], [SECTOR, 1])
    assert (written[-1], used) == (S_IOERR, 1)


def test_write_to_a_read_only_disk(rigs, tmp_path):
    data = os.urandom(DISK_SIZE // 4)
    path = make_image(tmp_path / "ro.img", data=data)
    r = rigs(path, read_only=True)
    assert r.request(T_OUT, 0, b"\x00" * SECTOR)[0] == S_IOERR
    assert r.request(T_DISCARD, data=segments((0, 8, 0)))[0] == S_IOERR
    assert r.request(T_WRITE_ZEROES, data=segments((0, 8, 0)))[0] == S_IOERR
    assert file_bytes(path, 0, len(data)) == data
    assert r.request(T_IN, 0, in_len=SECTOR)[:2] == (S_OK, data[:SECTOR])


def _fill(rig, sector, count):
    data = os.urandom(count * SECTOR)
    assert rig.request(T_OUT, sector, data)[0] == S_OK
    return data


def test_discard_with_flags_is_unsupported(rig):
    data = _fill(rig, 0, 8)
    assert rig.request(T_DISCARD, data=segments((0, 8, 1)))[0] == S_UNSUPP
    assert rig.request(T_WRITE_ZEROES, data=segments((0, 8, 2)))[0] == S_UNSUPP
    assert file_bytes(rig.path, 0, len(data)) == data


def test_discard_with_too_many_segments(rig):
    data = _fill(rig, 0, 17)
    assert rig.request(T_DISCARD, data=segments(*[(i, 1, 0) for i in range(17)]))[0] == S_UNSUPP
    assert rig.request(T_DISCARD, data=b"")[0] == S_UNSUPP
    assert rig.request(T_DISCARD, data=segments((0, 1, 0))[:15])[0] == S_UNSUPP
    assert file_bytes(rig.path, 0, len(data)) == data
    assert rig.request(T_DISCARD, data=segments(*[(i, 1, 0) for i in range(16)]))[0] == S_OK
    assert file_bytes(rig.path, 0, 16 * SECTOR) == bytes(16 * SECTOR)


def test_discard_segment_past_the_end(rig):
    data = _fill(rig, 0, 8)
    # The first segment is fine, but nothing is done unless all are.
    status = rig.request(T_DISCARD, data=segments((0, 8, 0), (SECTORS - 4, 8, 0)))[0]
    assert status == S_IOERR
    assert rig.request(T_WRITE_ZEROES, data=segments((0, 8, 0), (2 ** 64 - 1, 1, 0)))[0] == S_IOERR
    assert rig.request(T_DISCARD, data=segments((0, 2 ** 32 - 1, 0)))[0] == S_IOERR
    assert file_bytes(rig.path, 0, len(data)) == data


@pytest.mark.parametrize("rtype,flags", [(T_DISCARD, 0), (T_WRITE_ZEROES, 0), (T_WRITE_ZEROES, 1)])
def test_empty_segment_is_a_no_op(rig, rtype, flags):
    data = _fill(rig, 0, 8)
    assert rig.request(rtype, data=segments((0, 0, flags), (SECTORS, 0, flags)))[0] == S_OK
    assert rig.dev.io_errors == 0  # a guest's empty range is not a host I/O error
    assert file_bytes(rig.path, 0, len(data)) == data


def test_chain_without_a_writable_byte_needs_reset(rig):
    rig.q.add_chain([HEADER.pack(T_IN, 0, 0)], [])
    rig.drv.notify(0)
    wait_for(lambda: rig.drv.status() & NEEDS_RESET, "DEVICE_NEEDS_RESET")
    assert rig.drv.interrupt_status() & vd.VIRTIO_MMIO_INT_CONFIG
    # A reset and a new initialisation bring the disk back.
    (rig.q,) = rig.drv.init()
    assert rig.request(T_IN, 0, in_len=SECTOR)[:2] == (S_OK, bytes(SECTOR))


def test_host_io_error_is_the_guests_ioerr(rig):
    data = _fill(rig, 5, 1)
    # A real host error for either engine: the image's descriptor number now
    # refers to a write-only open file, so reads fail with EBADF in the kernel.
    saved = os.dup(rig.disk.fd)
    write_only = os.open(rig.path, os.O_WRONLY | os.O_CLOEXEC)
    os.dup2(write_only, rig.disk.fd, inheritable=False)
    os.close(write_only)
    try:
        assert rig.request(T_IN, 5, in_len=SECTOR)[0] == S_IOERR
        assert rig.dev.io_errors == 1
        assert not rig.drv.status() & NEEDS_RESET
        # The device keeps serving: a write still works while reads fail...
        assert rig.request(T_OUT, 6, data)[0] == S_OK
    finally:
        os.dup2(saved, rig.disk.fd, inheritable=False)
        os.close(saved)
    # ...and reads work again once the host recovers.
    assert rig.request(T_IN, 5, in_len=2 * SECTOR)[:2] == (S_OK, data + data)
    assert rig.dev.io_errors == 1


# --- opening disks ---------------------------------------------------------------------


def test_missing_image(tmp_path):
    path = str(tmp_path / "nope.img")
    with pytest.raises(DiskError, match="not found") as exc:
        Disk(path)
    assert path in str(exc.value)


@pytest.mark.parametrize("read_only", [False, True])
def test_directory_is_not_an_image(tmp_path, read_only):
    with pytest.raises(DiskError) as exc:
        Disk(str(tmp_path), read_only=read_only)
    assert str(tmp_path) in str(exc.value)


def test_size_not_a_multiple_of_512(tmp_path):
    path = make_image(tmp_path / "odd.img", size=1000)
    with pytest.raises(DiskError, match="multiple of 512") as exc:
        Disk(path)
    assert path in str(exc.value)


def _open_as_nobody(path, read_only):
    """Try Disk(path) in a child process that dropped root; return the DiskError message or ''."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                Disk(path, read_only=read_only).close()
                msg = ""
            except DiskError as exc:
                msg = str(exc)
            os.write(w, msg.encode() or b"\0")
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged child failed"
    return out.decode().strip("\0")


def test_no_permission(tmp_path):
    if os.geteuid() != 0:
        path = make_image(tmp_path / "locked.img")
        os.chmod(path, 0o444)
        with pytest.raises(DiskError, match="no permission to read and write") as exc:
            Disk(path)
        assert path in str(exc.value)
        return
    # Root bypasses file modes, so the open is tried by a child that dropped to
    # nobody, on an image in a directory nobody may enter (tmp_path's parents
    # are root-only, hence a fresh world-searchable directory).
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        path = make_image(os.path.join(d, "locked.img"))
        os.chmod(path, 0o444)
        msg = _open_as_nobody(path, read_only=False)
        assert path in msg and "no permission to read and write" in msg
        assert _open_as_nobody(path, read_only=True) == ""  # read-only access is allowed
        os.chmod(path, 0)
        msg = _open_as_nobody(path, read_only=True)
        assert path in msg and "no permission to read" in msg


@pytest.mark.parametrize("where", ["tmp_path", "dev_shm"])
def test_cache_none(rigs, tmp_path, where, engine):
    if where == "tmp_path":
        base = str(tmp_path)
    else:
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm")
        base = tempfile.mkdtemp(dir="/dev/shm")
    try:
        path = make_image(os.path.join(base, "direct.img"))
        try:
            r = rigs(path, cache="none")
        except DiskError as exc:
            # This file system refuses O_DIRECT: the error says which setting to change.
            assert "cache" in str(exc) and path in str(exc)
            return
        assert r.disk.direct
        # Guest buffers from the allocator are only 16-byte aligned and these
        # lengths are ragged, so a file system that enforces O_DIRECT alignment
        # refuses them and the bounce buffer takes over. 4 KiB granularity keeps
        # the file offsets and totals valid for any logical block size.
        data = os.urandom(8192)
        status, _, _ = r.request(T_OUT, 8, data, out_split=[100, 3996, 4096])
        assert status == S_OK
        assert file_bytes(path, 8 * SECTOR, len(data)) == data
        status, got, _ = r.request(T_IN, 8, in_split=[3000, 1096, 4096])
        assert (status, got) == (S_OK, data)
        # Where O_DIRECT refuses a misaligned buffer on this (now allocated)
        # range, the round trip above must have gone through the bounce buffer.
        probe = bytearray(4096 + 1)
        try:
            os.preadv(r.disk.fd, [memoryview(probe)[1:]], 4096)
        except OSError as exc:
            assert exc.errno == errno.EINVAL
            if engine == "python":
                assert r.disk._bounce is not None
            else:
                assert r.dev.native.stats()["bounced"] > 0
        assert r.request(T_WRITE_ZEROES, data=segments((8, 8, 0)))[0] == S_OK
        assert file_bytes(path, 8 * SECTOR, 4096) == bytes(4096)
    finally:
        if where != "tmp_path":
            for name in os.listdir(base):
                os.unlink(os.path.join(base, name))
            os.rmdir(base)


# --- pause ---------------------------------------------------------------------------


@pytest.mark.parametrize("event_idx", [False, True])
def test_pause_answers_what_is_in_flight_and_resume_serves_what_came_meanwhile(rigs, image, event_idx):
    # Contract 3: once pause() returns nothing is in flight. Chains posted while paused are
    # served after resume; the driver kicks only when the device asked for it (with event_idx
    # the C loop does not ask while busy, and must find them by itself).
    rig = rigs(image, event_idx=event_idx)
    with open(rig.path, "r+b") as f:
        for i in range(24):
            f.seek((512 + 8 * i) * SECTOR)
            f.write(bytes([0x80 + i]) * SECTOR)
    heads = [rig.q.add_chain([HEADER.pack(T_OUT, 0, 8 * i), bytes([i]) * SECTOR], [1]) for i in range(24)]
    if rig.q.kick_prepare():
        rig.drv.notify(0)
    assert rig.dev.pause()
    if rig.dev.native is not None:
        assert rig.dev.native.inflight == 0
    got = rig.q.get_used()
    # Requests in flight together have no order (virtio 5.2.6): these read other sectors.
    later = [rig.q.add_chain([HEADER.pack(T_IN, 0, 512 + 8 * i)], [SECTOR, 1]) for i in range(24)]
    if rig.q.kick_prepare():
        rig.drv.notify(0)
    time.sleep(0.05)
    assert rig.q.get_used() == []  # paused: nothing more is answered
    rig.dev.resume()
    wait_for(lambda: got.extend(rig.q.get_used()) or len(got) == len(heads) + len(later), "every request")
    assert sorted(h for h, _ in got) == sorted(heads + later)
    for i, head in enumerate(later):
        assert b"".join(rig.q.in_buffers(head)) == bytes([0x80 + i]) * SECTOR + bytes([S_OK])
    for i in range(24):
        assert file_bytes(rig.path, 8 * i * SECTOR, SECTOR) == bytes([i]) * SECTOR
