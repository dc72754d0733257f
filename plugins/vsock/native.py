"""The native engine of virtio-vsock: bursts of stream data in ``native/virtio_vsock.c``, GIL released.

The device (:mod:`.device`) decides, per connection, whether the next packets
are plain stream data; when they are, one call here moves many of them
between the rings and the connection's socket, walking the queue in C
(host to guest, one recvmsg fills up to 16 of the guest's small rx buffers,
each then a packet of its own). The
Python path (:mod:`.datapath` and the device's per-packet code) remains the
reference and serves everything else: handshakes, control packets, the end
of a stream, errors, and whatever C leaves on the ring.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

from vmmkit._native import ffi, lib
from vmmkit.virtio.native import NativeMemory, load_queue, setup_serve, store_queue
from vmmkit.virtio.queue import QueueError

#: How a burst ended.
STOP_BUDGET = lib.VMM_VSOCK_STOP_BUDGET
STOP_EMPTY = lib.VMM_VSOCK_STOP_EMPTY
STOP_AGAIN = lib.VMM_VSOCK_STOP_AGAIN
STOP_EOF = lib.VMM_VSOCK_STOP_EOF
STOP_ERROR = lib.VMM_VSOCK_STOP_ERROR
STOP_PYTHON = lib.VMM_VSOCK_STOP_PYTHON
STOP_SPILL = lib.VMM_VSOCK_STOP_SPILL


class RxResult(NamedTuple):
    """What an rx burst did: bytes and packets given to the guest, how it stopped, errno, interrupt wanted, reads."""

    bytes: int
    packets: int
    too_small: int
    stop: int
    err_no: int
    interrupt: bool
    reads: int = 0  # recvmsg calls: one fills several chains


class TxConn(NamedTuple):
    """What a tx burst did for one connection of its table."""

    bytes: int        # payload the guest sent
    sent: int         # of which the socket took
    packets: int
    buf_alloc: int    # the guest's credit fields from its last packet
    fwd_cnt: int


class TxResult(NamedTuple):
    """What a tx burst did: per connection (table order), how it stopped, the spilled bytes, interrupt wanted."""

    conns: List[TxConn]
    packets: int
    stop: int
    spill_conn: int
    spill: bytes
    err_no: int
    interrupt: bool


class LoopConn(NamedTuple):
    """A connection's counters as the C serving loop left them."""

    rx_cnt: int
    tx_cnt: int
    fwd_cnt: int
    last_fwd_sent: int
    peer_buf_alloc: int
    peer_fwd_cnt: int
    readable: bool
    owe_credit: bool
    credit_requested: bool


class ServeResult(NamedTuple):
    """Why the C serving loop came back, and what it did to each connection of its table."""

    stop: int          # STOP_CONTROL, STOP_RECALL, STOP_PYTHON (STOP_BROKEN raises)
    conns: List[LoopConn]
    conn: int          # STOP_PYTHON: the connection whose stream ended or failed, else -1
    spill_conn: int    # STOP_PYTHON: a socket took part of a packet (-1: none); the rest is in spill
    spill: bytes
    err_no: int


#: How long the C serving loop lets an interrupt for used tx buffers wait for
#: an rx interrupt to go with it (``native/virtio_serve.c``): the driver only
#: frees those buffers on it, so a request and its answer cost one interrupt.
TX_IRQ_DEFER_NS = 5_000_000

STOP_CONTROL = lib.VMM_SERVE_STOP_CONTROL
STOP_RECALL = lib.VMM_SERVE_STOP_RECALL
STOP_LOOP_PYTHON = lib.VMM_SERVE_STOP_PYTHON


class NativeVsockPath:
    """Burst calls into ``native/virtio_vsock.c`` for one device (used from its worker thread only).

    ``max_payload`` caps a packet's payload; ``max_packets`` caps one burst,
    so connections take turns on the rx ring.
    """

    name = "native"

    def __init__(self, max_payload: int, max_packets: int = 64) -> None:
        self._nmem = NativeMemory()
        self._vq = ffi.new("struct vmm_vq *")
        self._rx = ffi.new("struct vmm_vsock_rx *")
        self._tx = ffi.new("struct vmm_vsock_tx *")
        self._err = ffi.new("char[]", 512)
        self._spill = ffi.new("uint8_t[]", max_payload)
        self.max_payload = max_payload
        self.max_packets = max_packets
        self._conns = ffi.new("struct vmm_vsock_conn[]", 1)
        self._conns_cap = 1
        self._serve = ffi.new("struct vmm_vsock_serve *")
        self._rxq = ffi.new("struct vmm_vq *")
        self._lconns = self._pfd = None
        self._lcap = 0

    # The C serving loop's counters since the device was made; C updates them as it goes.
    @property
    def serve_wakeups(self) -> int:
        """Poll wake-ups of the C serving loop."""
        return self._serve.srv.wakeups

    @property
    def serve_interrupts(self) -> int:
        """Interrupts the C serving loop raised."""
        return self._serve.srv.interrupts

    @property
    def serve_coalesced(self) -> int:
        """Interrupts for used tx buffers that waited and went with an rx one."""
        return self._serve.srv.coalesced

    def forget(self) -> None:
        """Drop the memory table (the device was reset; nothing of ours runs in C now)."""
        self._nmem.forget()

    def rx_burst(self, memory, queue, fd: int, header: bytes, budget: int) -> RxResult:
        """Fill rx buffers with stream data read from *fd*, each behind *header* (its length set per packet).

        At most *budget* bytes (the guest's credit). Raises
        :class:`QueueError` when the driver broke the ring.
        """
        self._nmem.sync(memory)
        rx = self._rx
        rx.fd = fd
        ffi.memmove(rx.hdr, header, len(header))
        rx.budget, rx.max_payload, rx.max_packets = budget, self.max_payload, self.max_packets
        load_queue(self._vq, queue)
        rc = lib.vmm_vsock_rx(self._nmem.struct, self._vq, rx, self._err, len(self._err))
        store_queue(self._vq, queue)
        if rc < 0:
            raise QueueError(ffi.string(self._err).decode(errors="replace"))
        return RxResult(rx.bytes, rx.packets, rx.too_small, rx.stop, rx.err_no, bool(rc), rx.reads)

    def tx_burst(self, memory, queue, guest_cid: int,
                 conns: Sequence[tuple]) -> Optional[TxResult]:
        """Take the guest's stream-data packets for *conns* ``(local_port, peer_port, fd, room)`` off the tx ring.

        The guest's CREDIT_UPDATE packets for those connections are taken too
        (their credit fields count as a packet's). Stops at the first packet
        that is anything else, leaving it for the Python path. Raises :class:`QueueError` when the driver broke the ring.
        """
        n = len(conns)
        if n > self._conns_cap:
            self._conns_cap = max(n, 2 * self._conns_cap)
            self._conns = ffi.new("struct vmm_vsock_conn[]", self._conns_cap)
        table = self._conns
        for i, (local_port, peer_port, fd, room) in enumerate(conns):
            c = table[i]
            c.local_port, c.peer_port, c.fd, c.room = local_port, peer_port, fd, room
        self._nmem.sync(memory)
        tx = self._tx
        tx.guest_cid, tx.conns, tx.nconns = guest_cid, table, n
        tx.max_payload, tx.max_packets, tx.spill = self.max_payload, 1 << 30, self._spill
        load_queue(self._vq, queue)
        rc = lib.vmm_vsock_tx(self._nmem.struct, self._vq, tx, self._err, len(self._err))
        store_queue(self._vq, queue)
        if rc < 0:
            raise QueueError(ffi.string(self._err).decode(errors="replace"))
        done = [TxConn(table[i].bytes, table[i].sent, table[i].packets, table[i].buf_alloc, table[i].fwd_cnt)
                for i in range(n)]
        spill = bytes(ffi.buffer(self._spill, tx.spill_len)) if tx.stop == STOP_SPILL else b""
        return TxResult(done, tx.packets, tx.stop, tx.spill_conn, spill, tx.err_no, bool(rc))

    def serve(self, memory, rx_queue, tx_queue, *, rx_kick: int, tx_kick: int, control_fds, py_fd: int,
              interrupt, guest_cid: int, buf_alloc: int, credit_below: int, conns: Sequence[tuple]) -> ServeResult:
        """Serve *conns* both ways in C until Python is needed (``native/virtio_serve.c``).

        *conns* are ``(local_port, peer_port, fd, rx_cnt, tx_cnt, fwd_cnt, last_fwd_sent,
        peer_buf_alloc, peer_fwd_cnt, readable, owe_credit, credit_requested)`` of established
        connections with nothing buffered. The loop returns when one of
        *control_fds* or *py_fd* (the worker's epoll, for everything else)
        is readable, when a packet, a partial write or a stream's end needs
        the Python path, or when guest memory changed (then it comes back
        here). Raises :class:`QueueError` when the driver broke a ring.
        """
        n = len(conns)
        if n > self._lcap:
            self._lcap = max(n, 2 * self._lcap, 8)
            self._lconns = ffi.new("struct vmm_vsock_lconn[]", self._lcap)
            self._pfd = ffi.new("char[]", lib.vmm_pollfd_size() * (5 + self._lcap))
            self._conns = ffi.new("struct vmm_vsock_conn[]", self._lcap)
            self._conns_cap = self._lcap
        table = self._lconns
        for i, values in enumerate(conns):
            c = table[i]
            (c.local_port, c.peer_port, c.fd, c.rx_cnt, c.tx_cnt, c.fwd_cnt, c.last_fwd_sent,
             c.peer_buf_alloc, c.peer_fwd_cnt, c.readable, c.owe_credit, c.credit_requested) = values
        v = self._serve
        srv = v.srv
        setup_serve(srv, memory, tx_kick, control_fds, interrupt)
        v.rx_kick_fd, v.py_fd, v.guest_cid = rx_kick, py_fd, guest_cid
        v.buf_alloc, v.credit_below = buf_alloc, credit_below
        v.max_payload, v.max_packets = self.max_payload, self.max_packets
        v.conns, v.nconns, v.tx_table, v.spill = table, n, self._conns, self._spill
        v.pfd = ffi.cast("struct pollfd *", self._pfd)
        v.tx_irq_defer_ns = TX_IRQ_DEFER_NS
        while True:
            srv.mem_gen = memory.table_gen[0]  # read before the view is built: a change after is seen
            self._nmem.sync(memory)
            load_queue(self._rxq, rx_queue)
            load_queue(self._vq, tx_queue)
            rc = lib.vmm_vsock_serve(self._nmem.struct, self._rxq, self._vq, v, self._err, len(self._err))
            store_queue(self._rxq, rx_queue)
            store_queue(self._vq, tx_queue)
            if rc < 0:
                raise QueueError(ffi.string(self._err).decode(errors="replace"))
            if srv.stop != STOP_RECALL:
                break
        out = [LoopConn(c.rx_cnt, c.tx_cnt, c.fwd_cnt, c.last_fwd_sent, c.peer_buf_alloc, c.peer_fwd_cnt,
                        bool(c.readable), bool(c.owe_credit), bool(c.credit_requested))
               for c in (table[i] for i in range(n))]
        spill = bytes(ffi.buffer(self._spill, v.spill_len)) if v.spill_conn >= 0 else b""
        return ServeResult(srv.stop, out, v.conn, v.spill_conn, spill, v.err_no)
