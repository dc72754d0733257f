"""The native engine's rx burst (vmm_vsock_rx in native/virtio_vsock.c) on hand-made rx rings.

One recvmsg fills several posted chains at once; these check that each chain
that got bytes becomes one packet with its own length in its header, in ring
order, that the chains the bytes did not reach stay posted, and that the
budgets (the guest's credit, packets per burst) and odd chains (too small
for a header, the header split over descriptors as Linux 6.1 posts it) are
honoured. No KVM, no threads: a GuestMemory, a test driver and a socketpair.
"""

from __future__ import annotations

import os
import socket
import struct

import pytest

from vmmkit.memory import GuestMemory
from vmmkit.testing.virtio_driver import GuestAllocator, SplitQueueDriver
from vmmkit.virtio.queue import Virtqueue
from vmmkit_plugins.vsock import native as N

# Spelled out from the spec (5.10) rather than imported from the code under test.
HDR = struct.Struct("<QQIIIHHIII")
HEADER = HDR.pack(2, 3, 1024, 5000, 0, 1, 5, 0, 256 * 1024, 77)  # host -> guest RW, len filled per packet
PAYLOAD = 4096  # what a Linux guest's rx buffer holds
MAX_PAYLOAD = 64 * 1024


@pytest.fixture
def ring():
    mem = GuestMemory.create(16 << 20)
    drv = SplitQueueDriver(mem, 128, GuestAllocator(0x10000, 0xF00000))
    q = Virtqueue(256)
    q.size = drv.size
    q.desc_addr, q.avail_addr, q.used_addr = drv.desc_addr, drv.avail_addr, drv.used_addr
    q.ready = True
    q.check(mem)
    a, b = socket.socketpair()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    yield mem, drv, q, a, b
    a.close()
    b.close()
    mem.close()


def post(drv, count, *, split=True, payload=PAYLOAD):
    """Post rx chains as Linux does: a header descriptor and a data one (or one buffer for both)."""
    lens = [HDR.size, payload] if split else [HDR.size + payload]
    return [drv.add_chain([], lens) for _ in range(count)]


def packets(drv):
    """(head, header fields, payload) of each used entry since the last call, in order."""
    out = []
    for head, length in drv.get_used():
        raw = b"".join(drv.in_buffers(head))[:length]
        out.append((head, HDR.unpack(raw[:HDR.size]) if length else None, raw[HDR.size:]))
    return out


def burst(mem, q, sock, budget=1 << 20, max_packets=64):
    return N.NativeVsockPath(MAX_PAYLOAD, max_packets).rx_burst(mem, q, sock.fileno(), HEADER, budget)


def test_one_read_fills_chains_in_order_each_with_its_own_length(ring):
    mem, drv, q, a, b = ring
    heads = post(drv, 40)
    data = os.urandom(100_000)
    b.sendall(data)
    done = burst(mem, q, a)
    assert (done.bytes, done.packets, done.stop) == (100_000, 25, N.STOP_AGAIN)
    assert done.reads == 2  # 16 chains, then the 9 the rest reached: not a read per chain
    got = packets(drv)
    assert [h for h, _, _ in got] == heads[:25]
    lengths = [len(p) for _, _, p in got]
    assert lengths == [PAYLOAD] * 24 + [100_000 - 24 * PAYLOAD]
    expected = HDR.unpack(HEADER)
    for (_, hdr, payload), length in zip(got, lengths):
        assert hdr[4] == length  # len
        assert hdr[:4] + hdr[5:] == expected[:4] + expected[5:]
    assert b"".join(p for _, _, p in got) == data
    assert q.next_avail == q.next_used == 25  # the other 15 chains are still posted
    more = os.urandom(5000)
    b.sendall(more)
    assert burst(mem, q, a).bytes == 5000
    assert [h for h, _, _ in packets(drv)] == heads[25:27]


def test_single_buffer_chains(ring):
    mem, drv, q, a, b = ring
    post(drv, 8, split=False)
    data = os.urandom(3 * PAYLOAD)
    b.sendall(data)
    done = burst(mem, q, a)
    assert (done.packets, done.bytes) == (3, len(data))
    assert b"".join(p for _, _, p in packets(drv)) == data


def test_the_guests_credit_ends_the_burst_mid_chain(ring):
    mem, drv, q, a, b = ring
    post(drv, 8)
    b.sendall(os.urandom(20_000))
    done = burst(mem, q, a, budget=10_000)
    assert (done.bytes, done.packets, done.stop) == (10_000, 3, N.STOP_BUDGET)
    assert [len(p) for _, _, p in packets(drv)] == [PAYLOAD, PAYLOAD, 10_000 - 2 * PAYLOAD]
    assert len(a.recv(1 << 20, socket.MSG_DONTWAIT)) == 10_000  # the rest waits in the socket


def test_packets_per_burst_are_capped(ring):
    mem, drv, q, a, b = ring
    post(drv, 40)
    b.sendall(os.urandom(40 * PAYLOAD))
    done = burst(mem, q, a, max_packets=20)
    assert (done.packets, done.bytes, done.stop) == (20, 20 * PAYLOAD, N.STOP_BUDGET)
    assert q.next_used == 20


def test_a_chain_too_small_for_a_header_is_returned_empty_in_its_place(ring):
    mem, drv, q, a, b = ring
    first = post(drv, 1)
    small = drv.add_chain([], [20])
    rest = post(drv, 3)
    data = os.urandom(10_000)
    b.sendall(data)
    done = burst(mem, q, a)
    assert (done.packets, done.too_small, done.bytes) == (3, 1, 10_000)
    got = packets(drv)
    assert [h for h, _, _ in got] == first + [small] + rest[:2]
    assert got[1][1] is None  # used with length 0
    assert b"".join(p for _, _, p in got) == data


def test_eof_and_an_empty_ring_take_no_chain(ring):
    mem, drv, q, a, b = ring
    done = burst(mem, q, a)
    assert (done.stop, done.packets) == (N.STOP_EMPTY, 0)
    post(drv, 4)
    b.close()
    done = burst(mem, q, a)
    assert (done.stop, done.packets) == (N.STOP_EOF, 0)
    assert q.next_avail == 0 and packets(drv) == []


def test_nothing_to_read_takes_no_chain(ring):
    mem, drv, q, a, b = ring
    post(drv, 4)
    done = burst(mem, q, a)
    assert (done.stop, done.packets) == (N.STOP_AGAIN, 0)
    assert q.next_avail == 0


@pytest.mark.parametrize("early,used_event,wanted", [(True, 0, (0, 1)), (True, 19, (1, 0)), (False, 0, (1, 0))],
                         ids=["given", "given-past-first-read", "caller-raises"])
def test_a_burst_raises_its_first_reads_interrupt_before_copying_the_rest(ring, early, used_event, wanted):
    """Given the interrupt, the first recvmsg's packets (16 here) are published and signalled at once.

    *wanted* is (the call's return: the caller should raise an interrupt, early
    interrupts). A driver (EVENT_IDX) that wants one for the first used entry
    gets it early, and the caller is asked for no second one. One that wants
    it only for the 20th gets none early (16 were published), and the caller
    raises it. Without the interrupt given, the caller raises it, as before.
    """
    from vmmkit._native import ffi, lib
    from vmmkit.virtio.native import NativeMemory, load_queue, store_queue
    mem, drv, q, a, b = ring
    q.event_idx = True
    drv.set_used_event(used_event)
    post(drv, 40)
    b.sendall(os.urandom(100_000))
    nmem, vq, rx = NativeMemory(), ffi.new("struct vmm_vq *"), ffi.new("struct vmm_vsock_rx *")
    nmem.sync(mem)
    isr = ffi.new("uint32_t *")
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        rx.fd = a.fileno()
        ffi.memmove(rx.hdr, HEADER, len(HEADER))
        rx.budget, rx.max_payload, rx.max_packets = 1 << 20, MAX_PAYLOAD, 64
        if early:
            rx.isr, rx.irq_fd = isr, efd
        err = ffi.new("char[]", 256)
        load_queue(vq, q)
        rc = lib.vmm_vsock_rx(nmem.struct, vq, rx, err, len(err))
        store_queue(vq, q)
        assert (rx.bytes, rx.packets, rx.reads) == (100_000, 25, 2)
        assert len(packets(drv)) == 25  # everything published either way
        assert (rc, rx.early_irqs) == wanted
        assert isr[0] == rx.early_irqs
        if rx.early_irqs:
            assert os.eventfd_read(efd) == 1
        else:
            with pytest.raises(BlockingIOError):
                os.eventfd_read(efd)
    finally:
        os.close(efd)
        nmem.forget()
