"""Tests for virtio-vsock (vmmkit_plugins.vsock), no KVM.

The guest is vmmkit's test driver (``virtio_harness``): the test posts rx
buffers and tx packets by hand, the way Linux's virtio_transport does, and
reads what the device put in the rx buffers. The device's worker thread
runs for real, and the host side is real Unix sockets in tmp_path, used as
Firecracker's clients use them (``CONNECT <port>\\n`` / ``OK <port>\\n``,
``<uds_path>_<port>`` listeners).
"""

from __future__ import annotations

import collections
import os
import socket
import stat
import struct
import threading
import time

import attrs
import pytest

from vmmkit.errors import VmmkitError
from vmmkit_plugins.vsock import device as vsock_device
from vmmkit_plugins.vsock.device import BUF_ALLOC, MAX_PENDING_RST, VirtioVsock, VsockState, parse_connect

# Spelled out from the spec (5.10) rather than imported from the code under test.
HDR = struct.Struct("<QQIIIHHIII")
RX, TX, EVENT = 0, 1, 2
HOST_CID, CID = 2, 3
STREAM = 1
REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7
SHUT_RCV, SHUT_SEND = 1, 2
GUEST_BUF = 256 * 1024
KiB = 1 << 10


@attrs.frozen
class Pkt:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int
    data: bytes = b""


def wait_for(pred, what="condition", timeout=10.0):
    """Poll *pred* every millisecond; the deadline only guards against a hang."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


class Guest:
    """The guest's side of virtio-vsock, by hand: rx buffers in, tx packets out."""

    def __init__(self, bench, cid=CID):
        self.bench, self.cid = bench, cid
        self.rxq, self.txq, self.evq = bench.queues[RX], bench.queues[TX], bench.queues[EVENT]
        self.inbox = collections.deque()
        self.empty_buffers = 0  # rx buffers the device gave back unused

    def post_rx(self, count=32, size=HDR.size + 4096, split=False):
        for _ in range(count):
            self.rxq.add_chain([], [HDR.size, size - HDR.size] if split else [size])
        self.bench.driver.notify(RX)

    def send(self, op, src_port, dst_port, data=b"", *, length=None, type_=STREAM, flags=0, buf_alloc=GUEST_BUF,
             fwd_cnt=0, src_cid=None, dst_cid=HOST_CID, split=True, raw=None):
        hdr = HDR.pack(self.cid if src_cid is None else src_cid, dst_cid, src_port, dst_port,
                       len(data) if length is None else length, type_, op, flags, buf_alloc, fwd_cnt)
        if raw is not None:
            bufs = [raw]
        elif split and data:
            bufs = [hdr, data]
        else:
            bufs = [hdr + data]
        head = self.txq.add_chain(bufs, [])
        self.bench.driver.notify(TX)
        wait_for(lambda: any(h == head for h, _ in self.txq.get_used()), "the device to take a tx packet")

    def _collect(self):
        for head, written in self.rxq.get_used():
            raw = b"".join(self.rxq.in_buffers(head))[:written]
            if written < HDR.size:
                self.empty_buffers += 1
                continue
            fields = HDR.unpack(raw[:HDR.size])
            self.inbox.append(Pkt(*fields, data=raw[HDR.size:HDR.size + fields[4]]))

    def recv(self, timeout=10.0) -> Pkt:
        def ready():
            self._collect()
            return bool(self.inbox)
        wait_for(ready, "an rx packet", timeout)
        return self.inbox.popleft()

    def recv_op(self, op, timeout=10.0) -> Pkt:
        """The next packet, which must be *op* (credit updates in between are skipped)."""
        while True:
            pkt = self.recv(timeout)
            if pkt.op == CREDIT_UPDATE and op != CREDIT_UPDATE:
                continue
            assert pkt.op == op, f"expected op {op}, got {pkt}"
            return pkt

    def quiet(self, seconds=0.2):
        """Assert that no packet arrives for a while."""
        time.sleep(seconds)
        self._collect()
        assert not self.inbox, f"unexpected packets: {list(self.inbox)}"


@pytest.fixture
def uds(tmp_path):
    return str(tmp_path / "v.sock")


@pytest.fixture(params=["native", "python", "native-loop"])
def engine(request):
    """Every device test runs against each data path: the C engine, the Python reference, and the
    C engine with an eventfd interrupt, as in a VM, so that it serves in its C loop."""
    return request.param


def on_bench(virtio_harness, uds, engine, **options):
    """A device with *engine* on a test bench: (device, bench)."""
    device = VirtioVsock("vsock0", CID, uds, engine="loop" if engine == "native-loop" else engine)
    return device, virtio_harness(device, irqfd=engine == "native-loop", **options)


@pytest.fixture
def vsock(virtio_harness, uds, engine):
    """(device, bench, guest) with 32 rx buffers posted."""
    device, bench = on_bench(virtio_harness, uds, engine)
    guest = Guest(bench)
    guest.post_rx(32)
    return device, bench, guest


def host_connect(uds, port, line=None):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(uds)
    try:
        s.sendall(line if line is not None else f"CONNECT {port}\n".encode())
    except (BrokenPipeError, ConnectionResetError):
        pass  # the device closed it first (a limit): the caller sees the stream closed
    return s


def read_line(s) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        out += chunk
    return out


def recv_exact(s, n) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def establish(guest, uds, port=5000, guest_port=None):
    """A host-initiated connection, accepted by the guest: (host socket, host port, guest port)."""
    s = host_connect(uds, port)
    req = guest.recv_op(REQUEST)
    assert (req.src_cid, req.dst_cid, req.dst_port, req.type) == (HOST_CID, CID, port, STREAM)
    assert req.buf_alloc == BUF_ALLOC
    guest.send(RESPONSE, port, req.src_port)
    assert read_line(s) == f"OK {req.src_port}\n".encode()
    return s, req.src_port, port


def closed(s, timeout=30.0) -> bool:
    """Whether the host socket sees end of stream (or a reset) within *timeout*."""
    s.settimeout(timeout)
    try:
        return s.recv(4096) == b""
    except ConnectionResetError:
        return True


# ----- the device as the driver sees it -----

def test_device_id_queues_and_config_hold_the_guest_cid(vsock):
    device, bench, _ = vsock
    assert bench.driver.device_id() == 19
    assert len(bench.queues) == 3
    assert struct.unpack("<Q", bench.config(0, 8)) == (CID,)


def test_guest_cid_out_of_range_is_refused(uds):
    for cid in (0, 1, 2, 0xFFFFFFFF):
        with pytest.raises(ValueError):
            VirtioVsock("v", cid, uds)
    assert not os.path.exists(uds)


# ----- uds_path -----

def test_uds_path_is_owner_only_and_removed_on_close(uds):
    device = VirtioVsock("v", CID, uds)
    st = os.lstat(uds)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    device.close()
    assert not os.path.exists(uds)


def test_stale_socket_file_is_replaced(uds):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(uds)
    dead.close()  # the file stays, nobody accepts: what a killed VMM leaves behind
    device = VirtioVsock("v", CID, uds)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(uds)  # the new socket accepts (into its backlog)
        s.close()
    finally:
        device.close()


def test_socket_served_by_a_live_process_is_an_error(uds):
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(uds)
    live.listen(1)
    try:
        with pytest.raises(VmmkitError, match="in use"):
            VirtioVsock("v", CID, uds)
        assert os.path.exists(uds)  # never removed from under its owner
    finally:
        live.close()


def test_path_that_is_not_a_socket_or_has_no_directory_is_an_error(tmp_path):
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(VmmkitError, match="not a socket"):
        VirtioVsock("v", CID, str(regular))
    assert regular.read_text() == "keep me"
    with pytest.raises(VmmkitError, match="does not exist"):
        VirtioVsock("v", CID, str(tmp_path / "nodir" / "v.sock"))


def test_close_leaves_a_replacement_socket_alone(uds):
    device = VirtioVsock("v", CID, uds)
    os.unlink(uds)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(uds)
    try:
        device.close()
        assert os.path.exists(uds)
    finally:
        other.close()


# ----- host-initiated connections -----

def test_connect_handshake_then_data_both_ways(vsock, uds):
    device, bench, guest = vsock
    s, hport, gport = establish(guest, uds)
    assert hport >= 1 << 30
    s.sendall(b"hello guest")
    pkt = guest.recv_op(RW)
    assert (pkt.src_port, pkt.dst_port, pkt.data) == (hport, gport, b"hello guest")
    guest.send(RW, gport, hport, b"hello host")
    assert recv_exact(s, 10) == b"hello host"
    assert device.connection_count() == 1
    s.close()
    shut = guest.recv_op(SHUTDOWN)
    assert shut.flags == SHUT_RCV | SHUT_SEND
    guest.send(RST, gport, hport)
    wait_for(lambda: device.connection_count() == 0, "the connection to go")
    assert not bench.needs_reset


def test_connect_accepts_firecracker_spellings():
    assert parse_connect(b"CONNECT 5000") == 5000
    assert parse_connect(b"connect 52") == 52
    assert parse_connect(b"CONNECT  4294967295\r") == 4294967295
    for bad in (b"CONNECT", b"CONNECT 4294967296", b"CONNECT -1", b"CONNECT 5x", b"LISTEN 5",
                b"CONNECT 5 6", b"", b"CONNECT \xff", b"CONNECT +5", "CONNECT \u0665".encode()):
        assert parse_connect(bad) is None, bad


def test_bytes_after_the_connect_line_reach_the_guest_first(vsock, uds):
    _, _, guest = vsock
    s = host_connect(uds, 5000, b"CONNECT 5000\nearly bytes")
    req = guest.recv_op(REQUEST)
    guest.send(RESPONSE, 5000, req.src_port)
    assert read_line(s) == f"OK {req.src_port}\n".encode()
    assert guest.recv_op(RW).data == b"early bytes"
    s.sendall(b" and later ones")
    assert guest.recv_op(RW).data == b" and later ones"


def test_no_listener_in_the_guest_closes_the_host_stream_promptly(vsock, uds, monkeypatch):
    # With the request timeout out of reach, only the guest's RST can close the stream in time.
    monkeypatch.setattr(vsock_device, "REQUEST_TIMEOUT", 3600.0)
    device, _, guest = vsock
    s = host_connect(uds, 7777)
    req = guest.recv_op(REQUEST)
    guest.send(RST, 7777, req.src_port)  # what Linux answers when nothing listens
    assert closed(s)
    assert device.connection_count() == 0


@pytest.mark.parametrize("line", [b"HELLO 5000\n", b"CONNECT\n", b"CONNECT 99999999999\n", b"CONNECT 12ab\n",
                                  b"X" * 40, b"CONNECT 5000" + b" " * 30 + b"\n"])
def test_malformed_connect_closes_only_that_stream(vsock, uds, line):
    device, bench, guest = vsock
    good, hport, gport = establish(guest, uds)
    bad = host_connect(uds, 0, line)
    assert closed(bad)
    guest.quiet()  # no REQUEST went to the guest
    good.sendall(b"still here")
    assert guest.recv_op(RW).data == b"still here"
    assert device.stats["bad_connect"] == 1
    assert device.connection_count() == 1
    assert not bench.needs_reset


def test_host_closing_before_connect_line_costs_nothing(vsock, uds):
    device, _, guest = vsock
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(uds)
    s.sendall(b"CONN")
    s.close()
    guest.quiet()
    wait_for(lambda: device.buffered_bytes() == 0, "the partial line to be dropped")


def test_unanswered_request_times_out(vsock, uds, monkeypatch):
    monkeypatch.setattr(vsock_device, "REQUEST_TIMEOUT", 0.3)
    device, _, guest = vsock
    s = host_connect(uds, 5000)
    req = guest.recv_op(REQUEST)
    assert closed(s)
    rst = guest.recv_op(RST)
    assert (rst.src_port, rst.dst_port) == (req.src_port, 5000)
    assert device.connection_count() == 0


def test_host_giving_up_before_the_guest_answers_resets_the_guest_side(vsock, uds):
    device, _, guest = vsock
    s = host_connect(uds, 5000)
    req = guest.recv_op(REQUEST)
    s.close()
    rst = guest.recv_op(RST)
    assert (rst.src_port, rst.dst_port) == (req.src_port, 5000)
    wait_for(lambda: device.connection_count() == 0, "the connection to go")


def test_many_connections_at_once_keep_their_data_apart(vsock, uds):
    device, _, guest = vsock
    guest.post_rx(200)
    conns = []
    for i in range(64):
        s = host_connect(uds, 6000 + i)
        conns.append(s)
    ports = {}
    for _ in range(64):
        req = guest.recv_op(REQUEST)
        ports[req.dst_port] = req.src_port
        guest.send(RESPONSE, req.dst_port, req.src_port)
    for i, s in enumerate(conns):
        assert read_line(s) == f"OK {ports[6000 + i]}\n".encode()
    for i, s in enumerate(conns):
        s.sendall(f"to guest {i}".encode())
    got = {}
    while len(got) < 64:
        pkt = guest.recv_op(RW)
        got[pkt.dst_port] = got.get(pkt.dst_port, b"") + pkt.data
    assert got == {6000 + i: f"to guest {i}".encode() for i in range(64)}
    for i in range(64):
        guest.send(RW, 6000 + i, ports[6000 + i], f"to host {i}".encode())
    for i, s in enumerate(conns):
        want = f"to host {i}".encode()
        assert recv_exact(s, len(want)) == want
    assert device.connection_count() == 64


def test_connection_limit_refuses_new_ones_both_ways(vsock, uds, monkeypatch):
    monkeypatch.setattr(vsock_device, "MAX_CONNECTIONS", 2)
    device, _, guest = vsock
    first = establish(guest, uds, port=5000)[0]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_6000")
    listener.listen(4)
    guest.send(REQUEST, 2000, 6000)
    guest.recv_op(RESPONSE)
    assert closed(host_connect(uds, 5001))  # a third, from the host
    guest.send(REQUEST, 2001, 6000)  # a third, from the guest
    assert guest.recv_op(RST).dst_port == 2001
    assert device.stats["refused_limit"] == 2
    first.sendall(b"the first still works")
    assert guest.recv_op(RW).data == b"the first still works"
    listener.close()


# ----- credit and bounded memory -----

def test_host_to_guest_respects_the_guest_credit(vsock, uds, engine):
    device, _, guest = vsock
    s = host_connect(uds, 5000)
    req = guest.recv_op(REQUEST)
    guest.send(RESPONSE, 5000, req.src_port, buf_alloc=8 * KiB)
    assert read_line(s).startswith(b"OK ")
    payload = os.urandom(64 * KiB)
    s.sendall(payload)
    got = b""
    while True:
        pkt = guest.recv()
        if pkt.op == CREDIT_REQUEST:
            break
        assert pkt.op == RW
        got += pkt.data
    assert got == payload[:8 * KiB]  # exactly the credit, then a request for more
    guest.quiet()
    # The guest answers with no more room (its application has not read yet): no new request,
    # or the two would ping-pong for as long as the application sleeps.
    guest.send(CREDIT_UPDATE, 5000, req.src_port, buf_alloc=8 * KiB, fwd_cnt=0)
    guest.quiet()
    # The guest's application read it all: tell the device.
    received = len(got)
    while received < len(payload):
        guest.send(CREDIT_UPDATE, 5000, req.src_port, buf_alloc=8 * KiB, fwd_cnt=received)
        while True:
            pkt = guest.recv()
            if pkt.op == CREDIT_REQUEST:
                break
            assert pkt.op == RW
            got += pkt.data
            if len(got) == len(payload):
                break
        assert len(got) - received <= 8 * KiB
        received = len(got)
    assert got == payload
    # The native engine takes the guest's credit updates in C (the Python engine never uses C).
    updates = len(payload) // (8 * KiB)  # one with no room, then one per 8 KiB read but the last
    stats = dict(device.stats)
    if engine == "native":
        assert stats.get("tx_native_packets", 0) >= updates, stats
    elif engine == "native-loop":
        assert stats.get("rx_loop_bytes", 0) > 0, stats  # and the loop carried data on the updated credit
    else:
        assert stats.get("tx_native_packets", 0) == stats.get("loop_rounds", 0) == 0, stats


def test_a_guest_that_does_not_read_makes_the_host_writer_block_not_the_vmm_grow(virtio_harness, uds, engine):
    device, bench = on_bench(virtio_harness, uds, engine)
    guest = Guest(bench)
    guest.post_rx(1)
    s = host_connect(uds, 5000)
    req = guest.recv_op(REQUEST)
    guest.post_rx(1)
    guest.send(RESPONSE, 5000, req.src_port)
    assert read_line(s).startswith(b"OK ")
    s.setblocking(False)
    written = 0
    chunk = b"x" * 65536
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            written += s.send(chunk)
        except BlockingIOError:
            time.sleep(0.05)
            try:
                written += s.send(chunk)
            except BlockingIOError:
                break
    assert written < 16 << 20, "the host writer never blocked"
    assert device.buffered_bytes() == 0
    # What the one rx buffer carried is all the guest got; nothing piles up in the device.
    pkt = guest.recv_op(RW)
    assert len(pkt.data) == 4096
    guest.quiet()
    assert device.buffered_bytes() == 0


def test_guest_sending_past_its_credit_is_reset_with_bounded_buffering(vsock, uds):
    device, bench, guest = vsock
    path = f"{uds}_6000"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    guest.send(REQUEST, 1025, 6000)
    resp = guest.recv_op(RESPONSE)
    assert resp.buf_alloc == BUF_ALLOC
    host, _ = listener.accept()  # and never reads
    chunk = os.urandom(64 * KiB)
    peak = 0
    for _ in range(64):
        guest.send(RW, 1025, 6000, chunk)
        peak = max(peak, device.buffered_bytes())
        guest._collect()
        if any(p.op == RST for p in guest.inbox):
            break
    else:
        raise AssertionError("the device took 4 MiB past the credit without a reset")
    assert peak <= BUF_ALLOC
    assert device.stats["credit_overrun"] == 1
    assert device.connection_count() == 0
    assert device.buffered_bytes() == 0
    assert not bench.needs_reset
    host.close()
    listener.close()


def test_slow_host_reader_gets_everything_within_credit(vsock, uds):
    device, _, guest = vsock
    guest.post_rx(64)
    path = f"{uds}_6001"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    guest.send(REQUEST, 1026, 6001)
    guest.recv_op(RESPONSE)
    host, _ = listener.accept()
    payload = os.urandom(2 << 20)
    sent = 0
    peer_fwd = 0
    got = bytearray()
    # The guest sends only what its credit allows; the host reads slowly.
    while len(got) < len(payload):
        credit = BUF_ALLOC - (sent - peer_fwd)
        if sent < len(payload) and credit > 0:
            n = min(credit, 64 * KiB, len(payload) - sent)
            guest.send(RW, 1026, 6001, payload[sent:sent + n])
            sent += n
        host.settimeout(0.01)
        try:
            got += host.recv(32 * KiB)
        except socket.timeout:
            pass
        guest._collect()
        while guest.inbox:
            pkt = guest.inbox.popleft()
            assert pkt.op == CREDIT_UPDATE, pkt
            assert pkt.buf_alloc == BUF_ALLOC
            peer_fwd = pkt.fwd_cnt
        assert device.buffered_bytes() <= BUF_ALLOC
    assert bytes(got) == payload
    assert device.stats["credit_overrun"] == 0


# ----- guest-initiated connections -----

def test_guest_connects_to_a_host_listener(vsock, uds):
    device, bench, guest = vsock
    path = f"{uds}_5200"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(10)
    guest.send(REQUEST, 49152, 5200)
    resp = guest.recv_op(RESPONSE)
    assert (resp.src_cid, resp.dst_cid, resp.src_port, resp.dst_port) == (HOST_CID, CID, 5200, 49152)
    host, _ = listener.accept()
    host.settimeout(10)
    guest.send(RW, 49152, 5200, b"from the guest")
    assert recv_exact(host, 14) == b"from the guest"
    host.sendall(b"from the host")
    assert guest.recv_op(RW).data == b"from the host"
    # The guest closes: SHUTDOWN both ways, answered with RST; the host sees the end.
    guest.send(SHUTDOWN, 49152, 5200, flags=SHUT_RCV | SHUT_SEND)
    rst = guest.recv_op(RST)
    assert (rst.src_port, rst.dst_port) == (5200, 49152)
    assert closed(host)
    assert device.connection_count() == 0
    assert not bench.needs_reset
    listener.close()


def test_guest_connecting_where_nobody_listens_gets_rst(vsock, uds):
    device, _, guest = vsock
    guest.send(REQUEST, 49153, 5300)
    rst = guest.recv_op(RST)
    assert (rst.src_cid, rst.dst_cid, rst.src_port, rst.dst_port) == (HOST_CID, CID, 5300, 49153)
    assert device.connection_count() == 0
    # A stale file is no listener either.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(f"{uds}_5301")
    dead.close()
    guest.send(REQUEST, 49154, 5301)
    assert guest.recv_op(RST).dst_port == 49154


def test_half_close_each_way(vsock, uds):
    device, _, guest = vsock
    s, hport, gport = establish(guest, uds)
    # The host is done sending: the guest hears SHUTDOWN(SEND), and can still send.
    s.sendall(b"last words")
    s.shutdown(socket.SHUT_WR)
    assert guest.recv_op(RW).data == b"last words"
    shut = guest.recv_op(SHUTDOWN)
    assert shut.flags == SHUT_SEND
    guest.send(RW, gport, hport, b"reply after host EOF")
    assert recv_exact(s, 20) == b"reply after host EOF"
    # Then the guest is done sending too: the host reads end of stream.
    guest.send(SHUTDOWN, gport, hport, flags=SHUT_SEND)
    assert closed(s)
    # The guest socket closes for good: SHUTDOWN both, the device's RST ends it.
    guest.send(SHUTDOWN, gport, hport, flags=SHUT_RCV | SHUT_SEND)
    guest.recv_op(RST)
    wait_for(lambda: device.connection_count() == 0, "the connection to go")


def test_guest_rst_closes_the_host_stream(vsock, uds):
    device, _, guest = vsock
    s, hport, gport = establish(guest, uds)
    guest.send(RST, gport, hport)
    assert closed(s)
    assert device.connection_count() == 0


def test_credit_request_is_answered_with_credit_update(vsock, uds):
    _, _, guest = vsock
    s, hport, gport = establish(guest, uds)
    guest.send(RW, gport, hport, b"abc")
    assert recv_exact(s, 3) == b"abc"
    guest.send(CREDIT_REQUEST, gport, hport)
    pkt = guest.recv_op(CREDIT_UPDATE)
    assert (pkt.buf_alloc, pkt.fwd_cnt) == (BUF_ALLOC, 3)


# ----- hostile packets -----

def test_hostile_headers_are_refused_without_breaking_the_device(vsock, uds):
    device, bench, guest = vsock
    s, hport, gport = establish(guest, uds)
    # Too short for a header: dropped.
    guest.send(RW, 0, 0, raw=b"\x00" * 20)
    # Spoofed source CID, or for another CID than the host: dropped, nobody to answer.
    guest.send(REQUEST, 1, 5000, src_cid=7)
    guest.send(REQUEST, 1, 5000, dst_cid=9)
    guest.quiet()
    # Unknown type or op with no connection: RST.
    guest.send(REQUEST, 2, 5000, type_=2)
    assert guest.recv_op(RST).dst_port == 2
    guest.send(99, 3, 5000)
    assert guest.recv_op(RST).dst_port == 3
    # Orphan packets of known ops: RST (but never an RST for an RST).
    guest.send(RW, 4, 5000, b"data")
    assert guest.recv_op(RST).dst_port == 4
    guest.send(RST, 5, 5000)
    guest.quiet()
    assert device.connection_count() == 1
    # A length larger than the buffer on a live connection: that connection is reset.
    guest.send(RW, gport, hport, b"short", length=4096)
    rst = guest.recv_op(RST)
    assert (rst.src_port, rst.dst_port) == (hport, gport)
    assert closed(s)
    # A length over the protocol maximum, too.
    s2, hport2, gport2 = establish(guest, uds, port=5001)
    guest.send(RW, gport2, hport2, b"x" * 70000)
    assert guest.recv_op(RST).dst_port == gport2
    assert closed(s2)
    # RESPONSE for a connection nobody requested, data before the handshake ended.
    s3 = host_connect(uds, 5002)
    req = guest.recv_op(REQUEST)
    guest.send(RW, 5002, req.src_port, b"too early")
    assert guest.recv_op(RST).dst_port == 5002
    assert closed(s3)
    assert device.stats["bad_packets"] >= 5
    assert device.stats["dropped_cid"] == 2
    assert not bench.needs_reset
    # And the device still works.
    s4, hport4, gport4 = establish(guest, uds, port=5003)
    s4.sendall(b"ok")
    assert guest.recv_op(RW).data == b"ok"


def test_rx_buffers_too_small_for_a_header_are_returned_unused(virtio_harness, uds, engine):
    device, bench = on_bench(virtio_harness, uds, engine)
    guest = Guest(bench)
    guest.post_rx(2, size=16)
    guest.post_rx(2, split=True)
    s, hport, gport = establish(guest, uds)
    assert guest.empty_buffers == 2
    assert not bench.needs_reset


def test_rst_flood_without_rx_buffers_stays_bounded(virtio_harness, uds, engine):
    device, bench = on_bench(virtio_harness, uds, engine)
    guest = Guest(bench)
    for i in range(MAX_PENDING_RST + 50):
        guest.send(RW, i, 5000, b"?")
    assert device.stats["rst_dropped"] == 50
    guest.post_rx(8)
    assert guest.recv_op(RST).dst_port == 0


# ----- reset, snapshot -----

def test_device_reset_closes_host_streams_and_keeps_listening(vsock, uds):
    device, bench, guest = vsock
    s, _, _ = establish(guest, uds)
    bench.transport.reset()
    assert closed(s)
    assert device.connection_count() == 0
    # The driver starts it again; the same uds_path serves.
    bench2_queues = bench.driver.init(queues=3)
    bench.queues = bench2_queues
    guest2 = Guest(bench)
    guest2.post_rx(8)
    s2, _, _ = establish(guest2, uds)
    s2.sendall(b"again")
    assert guest2.recv_op(RW).data == b"again"


def test_restore_sends_transport_reset_and_drops_connections(vsock, uds):
    device, bench, guest = vsock
    for _ in range(4):
        guest.evq.add_chain([], [4])
    bench.driver.notify(EVENT)
    s, _, _ = establish(guest, uds)
    saved = bench.transport.state()
    assert saved.device == VsockState(guest_cid=CID)
    bench.transport.restore(saved)
    assert closed(s)
    used = wait_for(lambda: guest.evq.get_used(), "the transport reset event")
    head, written = used[0]
    assert written == 4
    assert guest.evq.in_buffers(head) == [b"\x00\x00\x00\x00"]
    # Connections made after the restore work.
    s2, _, _ = establish(guest, uds, port=5010)
    s2.sendall(b"after restore")
    assert guest.recv_op(RW).data == b"after restore"


def test_restore_refuses_another_cid_or_version(vsock):
    device, _, _ = vsock
    with pytest.raises(ValueError, match="CID"):
        device.restore(VsockState(guest_cid=CID + 1))
    with pytest.raises(ValueError, match="version"):
        device.restore(VsockState(version=2, guest_cid=CID))


def test_a_stale_hangup_event_does_not_end_a_live_connection(vsock, uds):
    # The event loop may hand a connection an event fetched for a closed fd whose number it reuses.
    from vmmkit.epoll import EPOLLERR, EPOLLHUP
    device, _, guest = vsock
    s, hport, gport = establish(guest, uds)
    (conn,) = device._conns.values()
    assert device.pause()
    try:
        device._on_conn_event(conn, EPOLLHUP | EPOLLERR)  # as the worker would, while it is parked
    finally:
        device.resume()
    s.sendall(b"still alive")
    assert guest.recv_op(RW).data == b"still alive"
    guest.send(RW, gport, hport, b"both ways")
    assert recv_exact(s, 9) == b"both ways"


def test_pause_stops_the_data_path_until_resumed(vsock, uds):
    device, _, guest = vsock
    s, _, _ = establish(guest, uds)
    assert device.pause()
    s.sendall(b"while paused")
    guest.quiet(0.3)
    device.resume()
    assert guest.recv_op(RW).data == b"while paused"


def test_device_writes_guest_memory_only_inside_posted_buffers_and_used_rings(virtio_harness, uds, engine):
    device, bench = on_bench(virtio_harness, uds, engine)
    guest = Guest(bench)
    # Every byte the driver has not handed out yet holds a canary; the driver records what it hands out.
    alloc = bench.alloc
    start, end = alloc.next, alloc.end
    canary = bytes(range(256)) * ((end - start) // 256 + 1)
    bench.memory.write(start, canary[:end - start])
    handed_out = []
    real_alloc = alloc.alloc

    def recording_alloc(size, align=16):
        addr = real_alloc(size, align)
        handed_out.append((addr, size))
        return addr
    alloc.alloc = recording_alloc
    # Traffic of every kind: both directions, many packets, a reset, a hostile length, an orphan.
    guest.post_rx(64, split=True)
    s, hport, gport = establish(guest, uds)
    payload = os.urandom(300 * KiB)
    s.sendall(payload[:200 * KiB])
    got = b""
    while len(got) < 200 * KiB:
        pkt = guest.recv()
        if pkt.op == RW:
            got += pkt.data
        guest.post_rx(1, split=True)
    assert got == payload[:200 * KiB]
    for i in range(0, len(payload), 60 * KiB):
        guest.send(RW, gport, hport, payload[i:i + 60 * KiB])
    assert recv_exact(s, len(payload)) == payload
    guest.send(RW, gport, hport, b"x", length=100)
    guest.send(RW, 9, 5000, b"orphan")
    guest.post_rx(8)
    time.sleep(0.2)
    after = bench.memory.read(start, end - start)
    mine = bytearray(end - start)  # 1 where the driver handed the bytes out
    for addr, size in handed_out:
        mine[addr - start:addr - start + size] = b"\x01" * size
    stray = []
    for page in range(0, end - start, 4096):  # page by page, then byte by byte where a page changed
        if after[page:page + 4096] == canary[page:page + 4096] or all(mine[page:page + 4096]):
            continue
        stray += [hex(start + pos) for pos in range(page, min(page + 4096, end - start))
                  if after[pos] != canary[pos] and not mine[pos]]
    assert not stray, f"writes outside anything the driver handed out: {stray[:10]}"


# ----- the [[device]] table and create() -----

def load(tmp_path, text):
    from vmmkit.config import load_config
    from vmmkit_plugins.vsock import VsockSpec
    path = tmp_path / "vm.toml"
    path.write_text(text)
    return load_config(path, device_kinds={"vsock": VsockSpec})


def test_table_resolves_uds_path_against_the_toml_directory(tmp_path):
    spec = load(tmp_path, '[[device]]\nkind = "vsock"\nguest_cid = 3\nuds_path = "v.sock"\n')
    options = spec.devices[0].options
    assert (options.guest_cid, options.uds_path) == (3, str(tmp_path / "v.sock"))


@pytest.mark.parametrize("body,message", [
    ('guest_cid = 2\nuds_path = "v.sock"', "guest_cid: expected a value from 3 to 4294967294, found 2"),
    ('guest_cid = 4294967295\nuds_path = "v.sock"', "guest_cid: expected a value from 3 to 4294967294"),
    ('uds_path = "v.sock"', "guest_cid: required key missing"),
    ('guest_cid = 3', "uds_path: required key missing"),
    ('guest_cid = 3\nuds_path = "/' + "x" * 120 + '"', "uds_path: expected a Unix socket path of at most 107 bytes"),
])
def test_table_mistakes_are_named(tmp_path, body, message):
    from vmmkit.schema import ConfigError
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f'[[device]]\nkind = "vsock"\n{body}\n')
    assert message in str(info.value)


class FakeVm:
    def __init__(self, fail=False):
        self.devices, self.attached, self.fail = {}, [], fail

    def add_virtio_device(self, device):
        if self.fail:
            raise VmmkitError("too many virtio devices")
        self.attached.append(device)


def test_create_attaches_one_device_and_refuses_a_second(tmp_path):
    from vmmkit_plugins.vsock import create
    spec = load(tmp_path, f'[[device]]\nkind = "vsock"\nguest_cid = 3\nuds_path = "a.sock"\n'
                          f'[[device]]\nkind = "vsock"\nguest_cid = 4\nuds_path = "b.sock"\n')
    vm = FakeVm()
    first = create(vm, spec.devices[0])
    vm.devices[spec.devices[0].id] = first
    try:
        assert vm.attached == [first] and first.guest_cid == 3
        with pytest.raises(VmmkitError, match="at most one vsock device"):
            create(vm, spec.devices[1])
        assert not os.path.exists(tmp_path / "b.sock")
    finally:
        first.close()
    assert not os.path.exists(tmp_path / "a.sock")


def test_create_removes_the_socket_when_the_vm_refuses_the_device(tmp_path):
    from vmmkit_plugins.vsock import create
    spec = load(tmp_path, '[[device]]\nkind = "vsock"\nguest_cid = 3\nuds_path = "a.sock"\n')
    with pytest.raises(VmmkitError, match="too many"):
        create(FakeVm(fail=True), spec.devices[0])
    assert not os.path.exists(tmp_path / "a.sock")


# ----- a guest that behaves like Linux's virtio_transport, echoing on several connections -----

class EchoGuest:
    """Accepts connections on a port and echoes, keeping the credit rules both ways as Linux does.

    Its receive buffer is small (*buf_alloc*) and its application reads in small
    bites, so the device has to stop at the guest's credit and wait for updates;
    it sends only what the device's credit allows. A packet past its credit
    fails the test (Linux would drop it silently and the stream would break).
    """

    def __init__(self, guest, port, buf_alloc=48 * KiB, bite=7 * KiB):
        self.g, self.port, self.buf_alloc, self.bite = guest, port, buf_alloc, bite
        self.conns = {}
        self.errors = []

    def conn(self, key):
        return self.conns.setdefault(key, {"rx": bytearray(), "fwd": 0, "last_fwd": 0, "eof": False,
                                           "tx": 0, "peer_buf": 0, "peer_fwd": 0, "shut_sent": False})

    def hdr_args(self, c):
        return dict(buf_alloc=self.buf_alloc, fwd_cnt=c["fwd"])

    def step(self):
        g = self.g
        g._collect()
        free = g.rxq.num_free() // 2
        if free:
            g.post_rx(free, split=True)
        while g.inbox:
            pkt = g.inbox.popleft()
            key = (pkt.dst_port, pkt.src_port)
            if pkt.op == REQUEST and pkt.dst_port == self.port:
                c = self.conn(key)
                c["peer_buf"], c["peer_fwd"] = pkt.buf_alloc, pkt.fwd_cnt
                g.send(RESPONSE, self.port, pkt.src_port, **self.hdr_args(c))
                continue
            c = self.conns.get(key)
            if c is None:
                continue
            c["peer_buf"], c["peer_fwd"] = pkt.buf_alloc, pkt.fwd_cnt
            if pkt.op == RW:
                if len(c["rx"]) + len(pkt.data) > self.buf_alloc:
                    self.errors.append(f"{key}: {len(pkt.data)} bytes past the credit")
                c["rx"] += pkt.data
            elif pkt.op == CREDIT_REQUEST:
                g.send(CREDIT_UPDATE, key[0], key[1], **self.hdr_args(c))
            elif pkt.op == SHUTDOWN:
                if pkt.flags & SHUT_SEND:
                    c["eof"] = True
                if pkt.flags == SHUT_RCV | SHUT_SEND and not c["rx"]:
                    g.send(RST, key[0], key[1])  # what Linux does: nothing left, so reset
                    del self.conns[key]
            elif pkt.op == RST:
                del self.conns[key]
        for key, c in list(self.conns.items()):
            # The application: read a bite, echo it within the device's credit.
            credit = c["peer_buf"] - (c["tx"] - c["peer_fwd"])
            n = min(self.bite, len(c["rx"]), credit, 64 * KiB)
            if n > 0:
                data = bytes(c["rx"][:n])
                del c["rx"][:n]
                c["fwd"] += n
                c["tx"] += n
                g.send(RW, key[0], key[1], data, **self.hdr_args(c))
                c["last_fwd"] = c["fwd"]
            elif c["fwd"] - c["last_fwd"] and self.buf_alloc - (c["fwd"] - c["last_fwd"]) < 16 * KiB:
                g.send(CREDIT_UPDATE, key[0], key[1], **self.hdr_args(c))
                c["last_fwd"] = c["fwd"]
            if c["eof"] and not c["rx"] and not c["shut_sent"]:
                # Both directions are done: the application closes its socket (the device answers RST).
                g.send(SHUTDOWN, key[0], key[1], flags=SHUT_SEND, **self.hdr_args(c))
                g.send(SHUTDOWN, key[0], key[1], flags=SHUT_RCV | SHUT_SEND, **self.hdr_args(c))
                c["shut_sent"] = True


def test_echo_on_several_connections_with_small_guest_buffers_keeps_every_byte(virtio_harness, uds, engine):
    device, bench = on_bench(virtio_harness, uds, engine, memory_size=32 << 20)
    guest = Guest(bench)
    echo = EchoGuest(guest, 5000)
    payloads = [os.urandom(600 * KiB + i * 1000) for i in range(4)]
    results = [None] * len(payloads)
    socks = [host_connect(uds, 5000) for _ in payloads]

    def host(i):
        s = socks[i]
        assert read_line(s).startswith(b"OK ")
        sender = threading.Thread(target=lambda: (s.sendall(payloads[i]), s.shutdown(socket.SHUT_WR)))
        sender.start()
        out = bytearray()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        sender.join()
        s.close()
        results[i] = bytes(out)

    hosts = [threading.Thread(target=host, args=(i,), daemon=True) for i in range(len(payloads))]
    for t in hosts:
        t.start()
    deadline = time.monotonic() + 60
    while any(t.is_alive() for t in hosts):
        assert time.monotonic() < deadline, f"stalled: {[len(r or b'') for r in results]}, stats {device.stats}"
        echo.step()
        time.sleep(0.0005)
    assert not echo.errors, echo.errors[:3]
    assert [r == p for r, p in zip(results, payloads)] == [True] * len(payloads)
    wait_for(lambda: (echo.step(), device.connection_count() == 0)[1], "every connection to end")
    # The bulk bytes went through C both ways with the native engine, and never with the Python one.
    native = (device.stats["rx_native_packets"], device.stats["tx_native_packets"])
    loop = (device.stats["rx_loop_bytes"], device.stats["tx_loop_bytes"])
    if engine == "native":
        assert native[0] > 0 and native[1] > 0, native
    elif engine == "native-loop":
        assert loop[0] > 0 and loop[1] > 0, loop  # the C serving loop carried bulk both ways
    else:
        assert native == loop == (0, 0), (native, loop)
    assert device.buffered_bytes() == 0
    assert not bench.needs_reset


def test_a_descriptor_loop_on_the_tx_ring_needs_reset_and_closes_the_host_streams(vsock, uds):
    # With the native engine C walks the tx ring first: it must catch the loop as the Python walker does.
    device, bench, guest = vsock
    s = establish(guest, uds)[0]
    buf = bench.alloc.alloc(4096)
    bench.queues[TX].add_raw({200: (buf, HDR.size, 1, 201), 201: (buf + HDR.size, 64, 1, 200)})  # NEXT both ways
    bench.driver.notify(TX)
    wait_for(lambda: bench.needs_reset, "NEEDS_RESET")
    assert closed(s)
    assert device.connection_count() == 0


def connected_with_event_idx(virtio_harness, uds, engine):
    """(device, bench, guest, host socket, host port, guest port): one connection, EVENT_IDX on."""
    device, bench = on_bench(virtio_harness, uds, engine, event_idx=True)
    guest = Guest(bench)
    guest.post_rx(32)
    s, host_port, port = establish(guest, uds)
    return device, bench, guest, s, host_port, port


def test_loop_lets_a_tx_interrupt_wait_for_the_answer(virtio_harness, uds, monkeypatch):
    # The C serving loop holds an interrupt for used tx buffers back (the driver only frees them
    # on it) until an rx interrupt carries it: a request and its answer cost the guest one
    # interrupt. The wait is made long here, so that only the answer can end it (and the Python
    # path's, for the handshake, none, so that it cannot come in between).
    from vmmkit_plugins.vsock import native as vsock_native
    monkeypatch.setattr(vsock_native, "TX_IRQ_DEFER_NS", 60 * 10**9)
    monkeypatch.setattr(vsock_device, "TX_IRQ_DEFER", 0)
    device, bench, guest, s, host_port, port = connected_with_event_idx(virtio_harness, uds, "native-loop")
    irqfd = bench._irqfd
    wait_for(lambda: device.stats.get("loop_rounds", 0) > 0, "the C loop to serve")
    for i in range(3):
        irqfd.drain()
        guest.send(RW, port, host_port, b"ping %d" % i)  # returns once the tx buffer is used
        assert recv_exact(s, 6) == b"ping %d" % i
        time.sleep(0.2)
        assert irqfd.drain() == 0, "the tx interrupt did not wait for the answer"
        s.sendall(b"pong %d" % i)
        pkt = guest.recv_op(RW)
        assert pkt.data == b"pong %d" % i
        wait_for(lambda: irqfd.drain(), "the answer's interrupt")
    assert device._native.serve_coalesced >= 3


def test_loop_does_not_let_a_tx_interrupt_wait_when_the_driver_has_many_to_free(virtio_harness, uds, monkeypatch):
    # A driver that has a quarter of its tx ring to take back gets its interrupt at once: it
    # may be about to run out of ring.
    from vmmkit_plugins.vsock import native as vsock_native
    monkeypatch.setattr(vsock_native, "TX_IRQ_DEFER_NS", 60 * 10**9)
    device, bench, guest, s, host_port, port = connected_with_event_idx(virtio_harness, uds, "native-loop")
    irqfd = bench._irqfd
    guest.send(RW, port, host_port, b"x")
    assert recv_exact(s, 1) == b"x"
    irqfd.drain()
    # Post a quarter of the ring at once and do not take the used entries back.
    size = guest.txq.size
    heads = [guest.txq.add_chain([HDR.pack(CID, HOST_CID, port, host_port, 1, STREAM, RW, 0, GUEST_BUF, 0), b"y"], [])
             for _ in range(size // 4)]
    bench.driver.notify(TX)
    assert recv_exact(s, len(heads)) == b"y" * len(heads)
    wait_for(lambda: irqfd.drain(), "the interrupt for a quarter of the tx ring")


@pytest.mark.parametrize("engine", ["native", "python"])
def test_a_tx_interrupt_waits_for_the_answer(virtio_harness, uds, engine, monkeypatch):
    # The worker's path: an interrupt for used tx buffers goes with the next rx interrupt.
    monkeypatch.setattr(vsock_device, "TX_IRQ_DEFER", 60)
    device, bench, guest, s, host_port, port = connected_with_event_idx(virtio_harness, uds, engine)
    for i in range(3):
        before = bench.interrupts
        guest.send(RW, port, host_port, b"ping %d" % i)
        assert recv_exact(s, 6) == b"ping %d" % i
        time.sleep(0.2)
        assert bench.interrupts == before, "the tx interrupt did not wait for the answer"
        s.sendall(b"pong %d" % i)
        assert guest.recv_op(RW).data == b"pong %d" % i
        wait_for(lambda: bench.interrupts == before + 1, "one interrupt for both")
    assert device.stats["tx_irqs_carried"] >= 3


@pytest.mark.parametrize("engine", ["native", "python"])
def test_a_tx_interrupt_comes_by_itself_when_no_answer_comes_in_time(virtio_harness, uds, engine, monkeypatch):
    monkeypatch.setattr(vsock_device, "TX_IRQ_DEFER", 0.05)
    device, bench, guest, s, host_port, port = connected_with_event_idx(virtio_harness, uds, engine)
    wait_for(lambda: not device._tx_irq_owed, "the handshake's tx interrupt")
    before = bench.interrupts
    guest.send(RW, port, host_port, b"no answer")
    assert recv_exact(s, 9) == b"no answer"
    wait_for(lambda: bench.interrupts == before + 1, "the tx interrupt on its own")
