"""virtio-vsock (virtio 1.x, 5.10) with Firecracker's hybrid Unix-socket backend.

Three queues: rx (device -> guest packets), tx (guest -> device packets) and
event (transport resets). Stream sockets only. Every connection is one
guest AF_VSOCK socket joined to one host AF_UNIX stream:

* **Host-initiated.** A host program connects to ``uds_path`` and writes
  ``CONNECT <port>\\n``. The device picks a host-side port (from 2**30 up,
  round robin) and sends the guest a REQUEST; on the guest's RESPONSE it
  writes ``OK <host port>\\n`` to the Unix stream, which from then on *is*
  the connection. The guest's RST (nobody listening) closes the Unix stream
  at once. A line that is not ``CONNECT <u32>`` within 32 bytes closes that
  Unix stream and nothing else.
* **Guest-initiated.** A guest connection to CID 2, port P becomes a Unix
  connection to ``<uds_path>_<P>``; if nobody accepts there, the guest gets
  RST (connection refused).

Flow control is the protocol's credit scheme, both ways. Towards the guest,
bytes are read from the Unix socket only when the guest has posted an rx
buffer *and* has credit for them, straight into that buffer: the device
buffers nothing in that direction, so a guest that stops reading leaves the
data in the host socket, whose sender then blocks. From the guest, each
connection advertises ``BUF_ALLOC`` bytes; whatever the Unix peer does not
take at once waits in the connection's tx buffer, which the credit scheme
bounds by ``BUF_ALLOC``: a guest that sends beyond its credit gets RST.

Shutdowns are per direction: the guest's SHUTDOWN(SEND) becomes
``shutdown(SHUT_WR)`` on the Unix stream once its buffer is flushed, and a
half-closed Unix stream becomes SHUTDOWN(SEND) to the guest (both flags once
the host has closed completely). A SHUTDOWN of both directions from the
guest is answered with RST, which ends the connection, as Linux expects.

Everything runs on the device's worker thread: queue kicks, the listening
socket, every Unix stream and a timer (request and close timeouts) are fds
in its event loop. Three engines move the bytes. ``native``
hands runs of plain stream data to C (:mod:`.native`, ``native/virtio_vsock.c``):
one call walks the ring and moves many packets between guest buffers and a
socket with the GIL released. ``python`` is the reference: every packet goes
through the per-packet code here and a data path object (:mod:`.datapath`).
The native engine leaves everything but stream data and the guest's credit
updates (handshakes, other control packets, the end of a stream, errors) to
that same per-packet code. ``loop`` (the default) goes further, in a VM
(where the interrupt is an irqfd): once only established connections have
work, the worker enters a C serving loop (``native/virtio_serve.c``,
:meth:`VirtioVsock._serve_in_c`) that polls their sockets and both queues'
kicks itself, moves data both ways,
takes the guest's credit updates and sends ours, and raises interrupts, so a
busy connection costs no Python at all; it comes back for everything else.

Connections cannot survive a snapshot: after :meth:`VirtioVsock.restore` the
device sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, and the guest drops its
connections and reads the CID again.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import select
import socket
import struct
import time
from typing import Deque, Dict, Optional, Set, Tuple

import attrs

from vmmkit.epoll import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT
from vmmkit.virtio import VirtioDevice
from vmmkit.virtio.constants import ID_VSOCK
from vmmkit.virtio.queue import DescriptorChain, QueueError

from . import packet as P
from .datapath import PythonDataPath
from . import native as N
from .host import TickTimer, listen_unix, same_file

log = logging.getLogger("vmmkit.vsock")

RX, TX, EVENT = 0, 1, 2
QUEUE_SIZE = 256

#: Receive buffer space the device advertises per connection (its buf_alloc); it bounds each tx buffer.
BUF_ALLOC = 256 * 1024
#: Tell the guest about forwarded bytes once the free space it knows of drops below this.
CREDIT_UPDATE_BELOW = BUF_ALLOC // 2
#: Connections at once (any state); beyond it, new ones are refused.
MAX_CONNECTIONS = 1024
#: Host streams accepted but not yet through their CONNECT line.
MAX_HANDSHAKES = 256
#: The CONNECT line, newline included, must fit in this many bytes.
MAX_CONNECT_LINE = 32
#: RSTs waiting for an rx buffer that belong to no connection (more are dropped).
MAX_PENDING_RST = 1024
#: Rounds into the C serving loop per worker event; each comes back for Python's work.
MAX_SERVE_ROUNDS = 64
#: Seconds the guest has to answer a REQUEST, and to finish closing a connection.
REQUEST_TIMEOUT = 5.0
CLOSE_TIMEOUT = 10.0
#: Seconds between timer ticks while any connection has a deadline.
TICK = 0.25
#: Seconds an interrupt for used tx buffers may wait for an rx interrupt to carry it (0: never).
#: The driver only frees those buffers on it (its flow control is the credit, which comes on
#: rx), so a request and its answer cost the guest one interrupt, not two. It does not wait
#: while the driver has a quarter of its tx ring or more to take back.
TX_IRQ_DEFER = 0.005
#: Host ports of host-initiated connections are allocated from here (as Firecracker does).
HOST_PORT_BASE = 1 << 30

_CONFIG = struct.Struct("<Q")

#: The data path engines (see the module docstring).
ENGINES = ("native", "python", "loop")

# Connection states.
LOCAL_INIT = "local-init"      # host-initiated, waiting for the guest's RESPONSE
PEER_INIT = "peer-init"        # guest-initiated, our RESPONSE not sent yet
ESTABLISHED = "established"
CLOSING = "closing"            # the host closed completely; waiting for the guest's RST

# What a connection owes the guest, in this order of priority (host data and SHUTDOWN come between
# REQUEST and CREDIT_REQUEST).
OWE_RESPONSE = 1
OWE_REQUEST = 2
OWE_CREDIT_REQUEST = 4
OWE_CREDIT_UPDATE = 8

# Whether the host socket has something to read.
NOT_READABLE, READABLE, MAYBE_READABLE = 0, 1, 2


@attrs.frozen
class VsockState:
    """The device's runtime state (contract 1). Connections do not survive a restore."""

    version: int = 1
    guest_cid: int = 0


class Connection:
    """One guest stream socket joined to one host Unix stream."""

    __slots__ = ("local_port", "peer_port", "sock", "state", "host_initiated", "owe",
                 "request_sent", "readable", "prefix", "host_eof", "host_gone", "peer_shut", "wr_shut",
                 "tx_chunks", "tx_len", "tx_cnt", "fwd_cnt", "last_fwd_sent", "rx_cnt", "peer_buf_alloc",
                 "peer_fwd_cnt", "credit_requested", "deadline", "events", "registered", "queued", "dead")

    def __init__(self, local_port: int, peer_port: int, sock: socket.socket, state: str, *, host_initiated: bool):
        self.local_port, self.peer_port = local_port, peer_port
        self.sock: Optional[socket.socket] = sock
        self.state = state
        self.host_initiated = host_initiated
        self.owe = 0
        self.request_sent = False
        self.readable = NOT_READABLE
        self.prefix = b""              # bytes read past the CONNECT line, sent before the stream's
        self.host_eof = False          # the host will send nothing more
        self.host_gone = False         # both directions of the Unix stream are shut
        self.peer_shut = 0             # SHUTDOWN flags the guest sent
        self.wr_shut = False           # we shut the Unix stream's write side
        self.tx_chunks: Deque[bytes] = collections.deque()  # guest bytes the host has not taken yet
        self.tx_len = 0
        self.tx_cnt = 0                # bytes received from the guest (u32, wraps)
        self.fwd_cnt = 0               # of those, bytes written to the host (u32, wraps)
        self.last_fwd_sent = 0         # fwd_cnt as the guest last heard it
        self.rx_cnt = 0                # bytes sent to the guest (u32, wraps)
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.credit_requested = False
        self.deadline: Optional[float] = None
        self.events = 0
        self.registered = False
        self.queued = False
        self.dead = False

    @property
    def key(self) -> Tuple[int, int]:
        return self.local_port, self.peer_port

    def __repr__(self) -> str:
        return f"<vsock connection host:{self.local_port} guest:{self.peer_port} {self.state}>"


class _Handshake:
    """A host stream accepted on ``uds_path``, until its CONNECT line is read."""

    __slots__ = ("sock", "buf")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""


def parse_connect(line: bytes) -> Optional[int]:
    """The port of a ``CONNECT <port>`` line (newline stripped), or None when it is not one.

    The keyword is case-insensitive and words may be separated by any
    whitespace (as Firecracker reads it); the port is a decimal u32.
    """
    try:
        words = line.decode("ascii").split()
    except UnicodeDecodeError:
        return None
    if len(words) != 2 or words[0].lower() != "connect":
        return None
    port = words[1]
    if not port.isdigit() or len(port) > 10:
        return None
    value = int(port)
    return value if value <= P.U32 else None


class VirtioVsock(VirtioDevice):
    """A virtio-vsock device whose host side is Unix sockets at *uds_path* (Firecracker's scheme)."""

    device_id = ID_VSOCK
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, name: str, guest_cid: int, uds_path: str, *, datapath=None, engine: str = "loop"):
        if engine not in ENGINES:
            raise ValueError(f"unknown vsock engine {engine!r}; expected one of {', '.join(ENGINES)}")
        if not P.MIN_GUEST_CID <= guest_cid <= P.MAX_GUEST_CID:
            raise ValueError(f"guest CID {guest_cid} is outside {P.MIN_GUEST_CID}..{P.MAX_GUEST_CID}")
        super().__init__(name)
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.datapath = datapath or PythonDataPath()
        self.engine = engine
        self._native = N.NativeVsockPath(P.MAX_PKT_PAYLOAD) if engine in ("native", "loop") else None
        #: Counters for diagnostics and tests (bad packets, refusals, bytes each way).
        self.stats: collections.Counter = collections.Counter()
        self._listener = listen_unix(uds_path)
        self._listener_stat = os.lstat(uds_path)
        try:
            self._timer = TickTimer()
            self._tx_irq_timer = TickTimer()
        except BaseException:
            if hasattr(self, "_timer"):
                self._timer.close()
            self._close_listener()
            raise
        self._tx_irq_owed = False
        self._conns: Dict[Tuple[int, int], Connection] = {}
        self._handshakes: Dict[int, _Handshake] = {}
        self._host_ports: Set[int] = set()
        self._rx_ready: Deque[Connection] = collections.deque()
        self._rst_queue: Deque[Tuple[int, int]] = collections.deque()
        self._timed: Set[Connection] = set()
        self._port_last = HOST_PORT_BASE - 1
        self._accept_paused = False
        self._reset_event_pending = False
        self._closed = False

    # ----- what the driver sees -----
    def config_bytes(self) -> bytes:
        """struct virtio_vsock_config: the guest's CID."""
        return _CONFIG.pack(self.guest_cid)

    # ----- lifecycle -----
    def activate(self, ctx) -> None:
        """Start the worker, then let it serve the listening socket and the timer too."""
        super().activate(ctx)
        self._loop.add(self._listener, self._callback(self._on_listener))
        self._loop.add(self._timer, self._callback(self._on_timer))
        self._loop.add(self._tx_irq_timer, self._callback(self._on_tx_irq_timer))
        self._accept_paused = False

    def reset(self) -> None:
        """Stop the worker and drop every connection (their Unix streams are closed); keep listening."""
        super().reset()
        self._drop_all()
        if self._native is not None:
            self._native.forget()

    def fail(self, why: str) -> None:
        """The driver broke the protocol: drop every connection and stop accepting until a reset.

        The connections go first, so that once NEEDS_RESET is visible no host
        stream of this device is left.
        """
        self.broken = why  # the event-loop callbacks stop here
        if self._loop is not None:
            for fd in (self._listener, self._timer, self._tx_irq_timer):
                try:
                    self._loop.remove(fd)
                except (KeyError, OSError):
                    pass
        self._drop_all()
        super().fail(why)

    def close(self) -> None:
        """Stop, close every socket and remove ``uds_path``."""
        if self._closed:
            return
        self._closed = True
        self.reset()
        log.debug("%s: closed; %s", self.name, dict(self.stats))
        self._timer.close()
        self._tx_irq_timer.close()
        self._close_listener()

    def _close_listener(self) -> None:
        self._listener.close()
        if same_file(self.uds_path, self._listener_stat):
            try:
                os.unlink(self.uds_path)
            except OSError:
                pass

    def _drop_all(self) -> None:
        for conn in list(self._conns.values()):
            self._remove(conn)
        for hs in list(self._handshakes.values()):
            self._close_handshake(hs)
        self._rx_ready.clear()
        self._rst_queue.clear()
        self._timed.clear()
        self._host_ports.clear()
        if self._timer.fd >= 0:
            self._timer.disarm()
        self._tx_irq_owed = False
        if self._tx_irq_timer.fd >= 0:
            self._tx_irq_timer.disarm()

    # ----- snapshots -----
    def state(self) -> VsockState:
        """The CID; connections are not part of a snapshot."""
        return VsockState(guest_cid=self.guest_cid)

    def restore(self, state: VsockState) -> None:
        """Take a saved state; the guest is told its connections are gone (TRANSPORT_RESET) once active."""
        if state.version != 1:
            raise ValueError(f"vsock state version {state.version} is not supported (expected 1)")
        if state.guest_cid != self.guest_cid:
            raise ValueError(f"{self.name}: the snapshot's guest CID is {state.guest_cid}, "
                             f"this device's is {self.guest_cid}")
        self._drop_all()
        self._reset_event_pending = True

    # ----- introspection (tests, diagnostics) -----
    def connection_count(self) -> int:
        """Connections in any state."""
        return len(self._conns)

    def buffered_bytes(self) -> int:
        """Bytes the device holds for all connections (tx buffers, CONNECT leftovers, partial lines)."""
        return (sum(c.tx_len + len(c.prefix) for c in self._conns.values())
                + sum(len(h.buf) for h in self._handshakes.values()))

    # ----- serving -----
    def _callback(self, fn, *args):
        """An event-loop callback for a socket or the timer: skipped once broken, queue errors break the device."""
        def callback(_fd, events):
            if self.broken is not None or self.ctx is None:
                return
            try:
                fn(*args, events)
                self._serve_in_c()
            except QueueError as exc:
                self.fail(str(exc))
        return callback

    def process_queue(self, index: int) -> None:
        """A queue kick: packets to take (tx), buffers to fill (rx), event buffers (event)."""
        if index == TX:
            self._process_tx()
        elif index == RX:
            self._process_rx()
        elif index == EVENT:
            self._process_events()
        self._serve_in_c()

    # ----- the C serving loop (engine = "loop", in a VM) -----
    def _serve_in_c(self) -> None:
        """Hand the established connections to C until it needs Python (``native/virtio_serve.c``).

        In C, data flows both ways, the guest's credit updates are taken and
        ours sent, and interrupts are raised, with no Python per packet or
        per event. C comes back for anything else: a handshake, a control
        packet, a stream's end, a socket that does not take all the guest
        sent, or any other fd of the worker's loop (pause, kill, the
        listener, the timer, connections it does not serve).
        """
        ctx = self.ctx
        if (self.engine != "loop" or ctx is None or ctx.native_interrupt is None or self._loop is None
                or self.broken is not None or len(ctx.notify_fds) < 2 or ctx.notify_fds[RX] is None
                or ctx.notify_fds[TX] is None):
            return
        for _ in range(MAX_SERVE_ROUNDS):
            if self._rst_queue or any(not c.dead and not self._in_c(c) for c in self._rx_ready):
                return  # packets for the guest that only the Python path makes
            table = [c for c in self._conns.values() if self._in_c(c)]
            if not table:
                return
            for c in table:
                if c.events:
                    # C polls these itself; the loop's epoll (which C also watches) must not wake for them.
                    self._loop.modify(c.sock, 0)
                    c.events = 0
            result = self._native.serve(
                ctx.memory, ctx.queues[RX], ctx.queues[TX], rx_kick=ctx.notify_fds[RX].fd,
                tx_kick=ctx.notify_fds[TX].fd, control_fds=self._loop.control_fds(), py_fd=self._loop.epoll_fd(),
                interrupt=ctx.native_interrupt, guest_cid=self.guest_cid, buf_alloc=BUF_ALLOC,
                credit_below=CREDIT_UPDATE_BELOW,
                conns=[(c.local_port, c.peer_port, c.sock.fileno(), c.rx_cnt, c.tx_cnt, c.fwd_cnt, c.last_fwd_sent,
                        c.peer_buf_alloc, c.peer_fwd_cnt, c.readable != NOT_READABLE,
                        bool(c.owe & OWE_CREDIT_UPDATE), c.credit_requested) for c in table])
            self.stats["loop_rounds"] += 1
            for c, got in zip(table, result.conns):
                moved_rx, moved_tx = (got.rx_cnt - c.rx_cnt) & P.U32, (got.tx_cnt - c.tx_cnt) & P.U32
                self.stats["rx_bytes"] += moved_rx
                self.stats["tx_bytes"] += moved_tx
                self.stats["rx_loop_bytes"] += moved_rx
                self.stats["tx_loop_bytes"] += moved_tx
                c.rx_cnt, c.tx_cnt, c.fwd_cnt, c.last_fwd_sent = got.rx_cnt, got.tx_cnt, got.fwd_cnt, got.last_fwd_sent
                c.peer_buf_alloc, c.peer_fwd_cnt = got.peer_buf_alloc, got.peer_fwd_cnt
                c.credit_requested = got.credit_requested
                c.readable = READABLE if got.readable else NOT_READABLE
                c.owe = (c.owe | OWE_CREDIT_UPDATE) if got.owe_credit else (c.owe & ~OWE_CREDIT_UPDATE)
            if result.spill_conn >= 0:
                conn = table[result.spill_conn]
                if result.err_no:
                    self._reset(conn, f"host write failed: {os.strerror(result.err_no)}")
                else:
                    conn.tx_chunks.append(result.spill)
                    conn.tx_len += len(result.spill)
            for c in table:
                if not c.dead:
                    self._refresh(c)
            if result.stop != N.STOP_LOOP_PYTHON:
                # The worker loop's turn (pause, kill, its other fds). Serve what is ready first, as
                # every callback does: after a pause nothing may wake the worker for it.
                self._process_rx()
                return
            # A packet, a partial write or a stream's end for the per-packet path; then C again.
            self._process_tx()

    @staticmethod
    def _in_c(conn: Connection) -> bool:
        """Whether the C serving loop may carry *conn*: established, open both ways, nothing buffered or owed."""
        return (conn.state == ESTABLISHED and conn.sock is not None and conn.registered and not conn.dead
                and not conn.tx_chunks and not conn.prefix and not conn.host_eof and not conn.host_gone
                and not conn.peer_shut and not conn.wr_shut and not conn.owe & ~OWE_CREDIT_UPDATE
                and conn.deadline is None)

    # ----- tx: packets from the guest -----
    def _process_tx(self) -> None:
        ctx = self.ctx
        queue, memory = ctx.queues[TX], ctx.memory
        if not queue.ready:
            return
        irq = False
        while True:
            if self._native is not None:
                irq |= self._native_tx(queue, memory)
            while (chain := queue.pop(memory)) is not None:
                self._handle_tx(chain)
                queue.add_used(memory, chain.head, 0)
                if self._native is not None:
                    irq |= self._native_tx(queue, memory)
            if not queue.rearm(memory):
                break
        if queue.needs_interrupt(memory) or irq:
            self._tx_interrupt(queue, memory)
        self._process_rx()

    def _tx_interrupt(self, queue, memory) -> None:
        """The driver wants an interrupt for used tx buffers: let it wait for an rx one (TX_IRQ_DEFER), or raise it."""
        if self._tx_irq_owed:
            return
        backlog = (queue.next_used - queue.used_event(memory)) & 0xFFFF if queue.event_idx else queue.size
        if TX_IRQ_DEFER <= 0 or backlog >= queue.size // 4:
            self.ctx.signal_used()
            return
        self._tx_irq_owed = True
        # A timer still set for an interrupt that was carried meanwhile may end this wait early;
        # that costs an interrupt at worst, and re-arming at every request costs two system calls.
        if not self._tx_irq_timer.armed:
            self._tx_irq_timer.once(TX_IRQ_DEFER)

    def _signal_used(self) -> None:
        """Raise the interrupt (for rx or event buffers); it carries an owed tx one."""
        self.ctx.signal_used()
        if self._tx_irq_owed:
            self._tx_irq_owed = False
            self.stats["tx_irqs_carried"] += 1

    def _on_tx_irq_timer(self, _events: int) -> None:
        self._tx_irq_timer.drain()
        self._tx_irq_timer.armed = False
        if self._tx_irq_owed:
            self._tx_irq_owed = False
            self.ctx.signal_used()

    def _native_tx(self, queue, memory) -> bool:
        """Stream data from the guest straight to its sockets, in C, up to the first packet that is anything else.

        Only connections that could take the data at once are in C's table:
        established, not shut for sending by the guest, nothing buffered.
        Returns whether the driver wants an interrupt for what C used.
        """
        conns = [c for c in self._conns.values()
                 if c.state == ESTABLISHED and c.sock is not None and not c.tx_chunks and not c.dead
                 and not c.peer_shut & P.SHUTDOWN_SEND]
        if not conns:
            return False
        done = self._native.tx_burst(memory, queue, self.guest_cid,
                                     [(c.local_port, c.peer_port, c.sock.fileno(), BUF_ALLOC - c.tx_len)
                                      for c in conns])
        if not done.packets:
            return done.interrupt
        self.stats["tx_native_packets"] += done.packets
        for i, (conn, got) in enumerate(zip(conns, done.conns)):
            if not got.packets:
                continue
            conn.peer_buf_alloc, conn.peer_fwd_cnt = got.buf_alloc, got.fwd_cnt
            if self._credit(conn):
                conn.credit_requested = False
            conn.tx_cnt = (conn.tx_cnt + got.bytes) & P.U32
            conn.fwd_cnt = (conn.fwd_cnt + got.sent) & P.U32
            self.stats["tx_bytes"] += got.bytes
            if i == done.spill_conn:
                if done.err_no:
                    self._reset(conn, f"host write failed: {os.strerror(done.err_no)}")
                    continue
                conn.tx_chunks.append(done.spill)
                conn.tx_len += len(done.spill)
            self._check_credit_update(conn)
            self._refresh(conn)
        return done.interrupt

    def _handle_tx(self, chain: DescriptorChain) -> None:
        memory = self.ctx.memory
        if chain.readable_len < P.HDR_SIZE:
            self.stats["bad_packets"] += 1
            log.debug("%s: tx packet of %d bytes has no whole header; dropped", self.name, chain.readable_len)
            return
        (src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc,
         fwd_cnt) = P.HEADER.unpack(chain.read(memory, 0, P.HDR_SIZE))
        if src_cid != self.guest_cid or dst_cid != P.HOST_CID:
            # Spoofed source, or for a CID this device does not serve: nobody to answer.
            self.stats["dropped_cid"] += 1
            log.debug("%s: tx packet %d -> %d (guest CID %d, host CID 2); dropped", self.name, src_cid, dst_cid,
                      self.guest_cid)
            return
        conn = self._conns.get((dst_port, src_port))
        if (type_ != P.TYPE_STREAM or op not in P.KNOWN_OPS or length > P.MAX_PKT_PAYLOAD
                or length > chain.readable_len - P.HDR_SIZE):
            self.stats["bad_packets"] += 1
            log.debug("%s: bad tx packet: type %d op %d len %d in %d bytes", self.name, type_, op, length,
                      chain.readable_len)
            if conn is not None:
                self._reset(conn, f"bad packet (type {type_}, op {op}, len {length})")
            elif op != P.OP_RST:
                self._queue_rst(dst_port, src_port)
            return
        if conn is None:
            if op == P.OP_REQUEST:
                self._guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
            elif op != P.OP_RST:
                self._queue_rst(dst_port, src_port)  # nothing by that name here
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        if self._credit(conn):
            # Ask again at the next stall; not while the guest still has no room, or a guest
            # answering every CREDIT_REQUEST with the same credit would ping-pong with us for ever.
            conn.credit_requested = False
        if op == P.OP_RST:
            log.debug("%s: %r: RST from the guest", self.name, conn)
            self._remove(conn)  # the host's Unix stream closes now
            return
        if op == P.OP_RW:
            self._guest_data(conn, chain, length)
        elif op == P.OP_RESPONSE:
            if conn.state == LOCAL_INIT and conn.request_sent:
                self._host_connected(conn)
            else:
                self._reset(conn, f"RESPONSE in state {conn.state}")
        elif op == P.OP_SHUTDOWN:
            self._guest_shutdown(conn, flags)
        elif op == P.OP_CREDIT_REQUEST:
            if conn.state == ESTABLISHED:
                conn.owe |= OWE_CREDIT_UPDATE
        elif op == P.OP_REQUEST:
            self._reset(conn, "a second REQUEST for a live connection")
        self._refresh(conn)

    def _guest_connect(self, local_port: int, peer_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        """A guest REQUEST to host port *local_port*: connect to ``<uds_path>_<port>`` or answer RST."""
        if len(self._conns) >= MAX_CONNECTIONS:
            self._refused(f"{len(self._conns)} connections open; refusing the guest's connection "
                          f"to port {local_port}")
            self._queue_rst(local_port, peer_port)
            return
        path = f"{self.uds_path}_{local_port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
        except OSError as exc:  # nobody listening (ENOENT, ECONNREFUSED) or backlog full (EAGAIN)
            sock.close()
            self.stats["guest_connect_refused"] += 1
            log.debug("%s: guest connection to port %d: %s: %s", self.name, local_port, path, exc)
            self._queue_rst(local_port, peer_port)
            return
        conn = Connection(local_port, peer_port, sock, PEER_INIT, host_initiated=False)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        conn.owe = OWE_RESPONSE
        self._add(conn)

    def _host_connected(self, conn: Connection) -> None:
        """The guest accepted a host-initiated connection: ``OK <port>`` to the host, then data flows."""
        conn.state = ESTABLISHED
        self._clear_deadline(conn)
        msg = f"OK {conn.local_port}\n".encode()
        try:
            sent = conn.sock.send(msg, socket.MSG_NOSIGNAL)
        except OSError as exc:
            log.debug("%s: %r: cannot acknowledge to the host: %s", self.name, conn, exc)
            sent = -1
        if sent != len(msg):
            self._reset(conn, "cannot write OK to the host")

    def _guest_data(self, conn: Connection, chain: DescriptorChain, length: int) -> None:
        if conn.state != ESTABLISHED or conn.peer_shut & P.SHUTDOWN_SEND or conn.sock is None:
            self._reset(conn, f"data in state {conn.state} (guest shutdown {conn.peer_shut})")
            return
        if not length:
            return
        if conn.tx_len + length > BUF_ALLOC:
            self.stats["credit_overrun"] += 1
            self._reset(conn, f"the guest sent {conn.tx_len + length - BUF_ALLOC} bytes past its credit")
            return
        memory = self.ctx.memory
        conn.tx_cnt = (conn.tx_cnt + length) & P.U32
        sent = 0
        if not conn.tx_chunks:
            try:
                sent = self.datapath.send_from_chain(memory, chain, conn.sock, P.HDR_SIZE, length)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._reset(conn, f"host write failed: {exc}")
                return
            conn.fwd_cnt = (conn.fwd_cnt + sent) & P.U32
        if sent < length:
            conn.tx_chunks.append(self.datapath.copy_from_chain(memory, chain, P.HDR_SIZE + sent, length - sent))
            conn.tx_len += length - sent
        self.stats["tx_bytes"] += length
        self._check_credit_update(conn)

    def _guest_shutdown(self, conn: Connection, flags: int) -> None:
        conn.peer_shut |= flags & P.SHUTDOWN_BOTH
        if conn.peer_shut == P.SHUTDOWN_BOTH:
            if conn.tx_len and conn.sock is not None:
                self._set_deadline(conn, CLOSE_TIMEOUT)  # RST once the host has the rest (_flush_tx)
            else:
                self._reset(conn, "closed by the guest")  # the RST Linux waits for; the host sees EOF
            return
        if conn.peer_shut & P.SHUTDOWN_SEND and not conn.tx_len:
            self._shut_host_write(conn)

    def _shut_host_write(self, conn: Connection) -> None:
        if conn.sock is not None and not conn.wr_shut:
            conn.wr_shut = True
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _check_credit_update(self, conn: Connection) -> None:
        """Owe the guest a CREDIT_UPDATE once the free space it knows of runs low and we have freed more."""
        if conn.fwd_cnt == conn.last_fwd_sent:
            return
        seen_used = min((conn.tx_cnt - conn.last_fwd_sent) & P.U32, BUF_ALLOC)
        if BUF_ALLOC - seen_used < CREDIT_UPDATE_BELOW:
            conn.owe |= OWE_CREDIT_UPDATE

    # ----- rx: packets to the guest -----
    def _process_rx(self) -> None:
        ctx = self.ctx
        if ctx is None or self.broken is not None:
            return
        queue, memory = ctx.queues[RX], ctx.memory
        if not queue.ready:
            return
        used = irq = False
        while self._rst_queue or self._next_ready() is not None:
            if self._native is not None and not self._rst_queue and self._bulk_rx(self._rx_ready[0]):
                done = self._native_rx(queue, memory)
                irq |= done.interrupt
                if done.stop == N.STOP_EMPTY:
                    break  # C re-armed the ring: the guest kicks when it posts more buffers
                if done.stop not in (N.STOP_EOF, N.STOP_ERROR):
                    continue
                # The end of the stream or an error: the per-packet path below tells the guest.
            chain = queue.pop(memory)
            if chain is None:
                if queue.rearm(memory):
                    continue
                break  # the guest kicks when it posts more buffers
            queue.add_used(memory, chain.head, self._fill_rx(chain))
            used = True
        if (used and queue.needs_interrupt(memory)) or irq:
            self._signal_used()

    def _bulk_rx(self, conn: Connection) -> bool:
        """Whether the connection's next packets are plain stream data, for the native engine."""
        return (not conn.owe & (OWE_RESPONSE | OWE_REQUEST) and not conn.prefix and conn.readable != NOT_READABLE
                and self._wants_data(conn) and self._credit(conn) > 0)

    def _native_rx(self, queue, memory) -> "N.RxResult":
        """A burst of the front connection's host bytes into rx buffers, in C; the connection takes its turn."""
        conn = self._rx_ready[0]
        hdr = P.pack(P.HOST_CID, self.guest_cid, conn.local_port, conn.peer_port, P.OP_RW,
                     buf_alloc=BUF_ALLOC, fwd_cnt=conn.fwd_cnt)
        done = self._native.rx_burst(memory, queue, conn.sock.fileno(), hdr, self._credit(conn))
        if done.too_small:
            self.stats["rx_buffer_too_small"] += done.too_small
        if done.packets:
            self.stats["rx_native_packets"] += done.packets
            conn.rx_cnt = (conn.rx_cnt + done.bytes) & P.U32
            self.stats["rx_bytes"] += done.bytes
            conn.owe &= ~OWE_CREDIT_UPDATE  # every header carried fwd_cnt
            conn.last_fwd_sent = conn.fwd_cnt
        if done.stop in (N.STOP_EOF, N.STOP_ERROR):
            conn.readable = READABLE  # the per-packet path reads the end (or the error) itself
            return done
        if done.stop == N.STOP_AGAIN:
            conn.readable = NOT_READABLE
        self._rx_ready.popleft()
        conn.queued = False
        self._refresh(conn)  # back of the queue if it has more: connections take turns
        return done

    def _next_ready(self) -> Optional[Connection]:
        """The first connection in the ready queue that has a packet to give, dropping the others."""
        ready = self._rx_ready
        while ready:
            conn = ready[0]
            if not conn.dead and self._has_rx_work(conn, probe=True):
                return conn
            ready.popleft()
            conn.queued = False
            if not conn.dead:
                self._update_interest(conn)
        return None

    def _fill_rx(self, chain: DescriptorChain) -> int:
        """Put the next packet into an rx buffer; return the bytes written (0: the buffer went unused)."""
        if chain.writable_len < P.HDR_SIZE:
            self.stats["rx_buffer_too_small"] += 1
            return 0
        memory = self.ctx.memory
        if self._rst_queue:
            local_port, peer_port = self._rst_queue.popleft()
            hdr = P.pack(P.HOST_CID, self.guest_cid, local_port, peer_port, P.OP_RST)
            return self.datapath.write_into_chain(memory, chain, 0, hdr)
        conn = self._rx_ready.popleft()  # _next_ready() just vouched for it
        conn.queued = False
        written = self._conn_packet(conn, chain)
        if not conn.dead:
            self._refresh(conn)  # back of the queue if it has more: connections take turns
        return written

    def _conn_packet(self, conn: Connection, chain: DescriptorChain) -> int:
        """One packet from *conn* into *chain*: control first, then data, then credit information."""
        op, length, flags = None, 0, 0
        owe = conn.owe
        if owe & OWE_RESPONSE:
            conn.owe &= ~OWE_RESPONSE
            conn.state = ESTABLISHED
            op = P.OP_RESPONSE
        elif owe & OWE_REQUEST:
            conn.owe &= ~OWE_REQUEST
            conn.request_sent = True
            self._set_deadline(conn, REQUEST_TIMEOUT)
            op = P.OP_REQUEST
        else:
            room = min(chain.writable_len - P.HDR_SIZE, P.MAX_PKT_PAYLOAD, self._credit(conn))
            if room > 0 and self._wants_data(conn) and (conn.prefix or conn.readable):
                op, length, flags = self._read_host(conn, chain, room)
            if op is None and conn.owe & OWE_CREDIT_REQUEST:
                conn.owe &= ~OWE_CREDIT_REQUEST
                op = P.OP_CREDIT_REQUEST
            if op is None and conn.owe & OWE_CREDIT_UPDATE:
                op = P.OP_CREDIT_UPDATE
            if op is None:
                return 0
        conn.owe &= ~OWE_CREDIT_UPDATE  # every header carries fwd_cnt
        conn.last_fwd_sent = conn.fwd_cnt
        hdr = P.pack(P.HOST_CID, self.guest_cid, conn.local_port, conn.peer_port, op, length=length,
                     flags=flags, buf_alloc=BUF_ALLOC, fwd_cnt=conn.fwd_cnt)
        self.datapath.write_into_chain(self.ctx.memory, chain, 0, hdr)
        return P.HDR_SIZE + length

    def _read_host(self, conn: Connection, chain: DescriptorChain, room: int):
        """Host bytes (or the end of them) for the guest: ``(op, length, flags)``, op None when none came."""
        memory = self.ctx.memory
        if conn.prefix:
            data, conn.prefix = conn.prefix[:room], conn.prefix[room:]
            self.datapath.write_into_chain(memory, chain, P.HDR_SIZE, data)
            conn.rx_cnt = (conn.rx_cnt + len(data)) & P.U32
            self.stats["rx_bytes"] += len(data)
            return P.OP_RW, len(data), 0
        try:
            got = self.datapath.recv_into_chain(memory, chain, conn.sock, P.HDR_SIZE, room)
        except BlockingIOError:
            conn.readable = NOT_READABLE
            return None, 0, 0
        except OSError as exc:
            log.debug("%s: %r: ends with RST: host read failed: %s", self.name, conn, exc)
            self._remove(conn)
            return P.OP_RST, 0, 0
        if got:
            conn.rx_cnt = (conn.rx_cnt + got) & P.U32
            conn.readable = MAYBE_READABLE if got == room else NOT_READABLE
            self.stats["rx_bytes"] += got
            return P.OP_RW, got, 0
        # End of the host's stream: it sends nothing more; gone altogether if both directions are shut.
        conn.host_eof = True
        conn.readable = NOT_READABLE
        if not conn.host_gone and _hangup_events(conn.sock) & EPOLLHUP:
            conn.host_gone = True
        if conn.host_gone:
            self._enter_closing(conn)
            return P.OP_SHUTDOWN, 0, P.SHUTDOWN_BOTH
        return P.OP_SHUTDOWN, 0, P.SHUTDOWN_SEND

    def _enter_closing(self, conn: Connection) -> None:
        """The host is gone: close its stream and give the guest a while to answer our SHUTDOWN with RST."""
        conn.state = CLOSING
        self._detach_socket(conn)
        conn.tx_chunks.clear()
        conn.tx_len = 0
        self._set_deadline(conn, CLOSE_TIMEOUT)

    # ----- per-connection bookkeeping -----
    @staticmethod
    def _credit(conn: Connection) -> int:
        """Bytes the guest has room for: its buf_alloc less what we sent that it has not consumed."""
        in_flight = (conn.rx_cnt - conn.peer_fwd_cnt) & P.U32
        return conn.peer_buf_alloc - in_flight if in_flight < conn.peer_buf_alloc else 0

    @staticmethod
    def _wants_data(conn: Connection) -> bool:
        """Whether host bytes may flow to the guest on this connection now (credit aside)."""
        return (conn.state == ESTABLISHED and not conn.host_eof and not conn.peer_shut & P.SHUTDOWN_RCV
                and conn.sock is not None)

    def _has_rx_work(self, conn: Connection, probe: bool) -> bool:
        if conn.owe:
            return True
        if not (self._wants_data(conn) and (conn.prefix or conn.readable)) or not self._credit(conn):
            return False
        if probe and conn.readable == MAYBE_READABLE and not conn.prefix:
            # Only pop an rx buffer for bytes that are really there.
            try:
                conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                conn.readable = NOT_READABLE
                return False
            except OSError:
                pass  # the read itself reports it
            conn.readable = READABLE
        return True

    def _refresh(self, conn: Connection) -> None:
        """After any change: ask for credit if stalled, fix the epoll interest, queue for rx if there is work."""
        if conn.dead:
            return
        if (self._wants_data(conn) and (conn.prefix or conn.readable) and not self._credit(conn)
                and not conn.credit_requested):
            conn.owe |= OWE_CREDIT_REQUEST
            conn.credit_requested = True
        self._update_interest(conn)
        if not conn.queued and self._has_rx_work(conn, probe=False):
            conn.queued = True
            self._rx_ready.append(conn)

    def _update_interest(self, conn: Connection) -> None:
        """Poll for input only when the guest can take it (credit, not already readable); for output while buffered."""
        if not conn.registered or self._loop is None:
            return
        events = 0
        if (self._wants_data(conn) and not conn.prefix and conn.readable == NOT_READABLE
                and self._credit(conn)):
            events |= EPOLLIN
        if conn.tx_len:
            events |= EPOLLOUT
        if events != conn.events:
            self._loop.modify(conn.sock, events)
            conn.events = events

    def _add(self, conn: Connection, *, registered: bool = False) -> None:
        self._conns[conn.key] = conn
        if registered:
            self._loop.modify(conn.sock, 0, self._callback(self._on_conn_event, conn))
        else:
            self._loop.add(conn.sock, self._callback(self._on_conn_event, conn), 0)
        conn.registered = True
        conn.events = 0
        self._refresh(conn)

    def _detach_socket(self, conn: Connection) -> None:
        if conn.registered:
            conn.registered = False
            if self._loop is not None:
                try:
                    self._loop.remove(conn.sock)
                except (KeyError, OSError):
                    pass
        if conn.sock is not None:
            conn.sock.close()
            conn.sock = None

    def _remove(self, conn: Connection) -> None:
        """Forget *conn* and close its Unix stream (no packet to the guest)."""
        if conn.dead:
            return
        conn.dead = True
        self._detach_socket(conn)
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        if conn.host_initiated:
            self._host_ports.discard(conn.local_port)
        self._timed.discard(conn)
        conn.tx_chunks.clear()
        conn.tx_len = 0
        conn.prefix = b""

    def _reset(self, conn: Connection, why: str) -> None:
        """End *conn* with RST to the guest (unless the guest never heard of it) and close its Unix stream."""
        log.debug("%s: %r: ends with RST: %s", self.name, conn, why)
        told = not (conn.state == LOCAL_INIT and not conn.request_sent)
        self._remove(conn)
        if told:
            self._queue_rst(conn.local_port, conn.peer_port)

    def _refused(self, why: str) -> None:
        """A connection refused for a limit: counted always, logged the first time (a guest can repeat it)."""
        self.stats["refused_limit"] += 1
        (log.warning if self.stats["refused_limit"] == 1 else log.debug)("%s: %s", self.name, why)

    def _queue_rst(self, local_port: int, peer_port: int) -> None:
        if len(self._rst_queue) >= MAX_PENDING_RST:
            self.stats["rst_dropped"] += 1
            return
        self._rst_queue.append((local_port, peer_port))

    # ----- host events -----
    def _on_conn_event(self, conn: Connection, events: int) -> None:
        if conn.dead:
            return
        if events & (EPOLLERR | EPOLLHUP):
            # Ask the socket itself: an event fetched for an fd that was closed and reused for this
            # connection within the same batch (see vmmkit.epoll) must not end it.
            events = (events & ~(EPOLLERR | EPOLLHUP)) | _hangup_events(conn.sock)
        if events & EPOLLERR:
            self._reset(conn, "host socket error (closed with our bytes unread?)")
        elif events & EPOLLHUP:
            # Both directions of the Unix stream are shut; the kernel reports that for as long as
            # the fd is polled, so stop polling it and read what is left.
            conn.host_gone = True
            self._detach_from_loop(conn)
            if conn.state == LOCAL_INIT:
                self._reset(conn, "the host closed before the guest answered")
            elif conn.tx_len:
                self._reset(conn, f"the host closed with {conn.tx_len} guest bytes not taken")
            elif not conn.host_eof:
                conn.readable = READABLE
        else:
            if events & EPOLLIN:
                conn.readable = READABLE
            if events & EPOLLOUT:
                self._flush_tx(conn)
        if not conn.dead:
            self._refresh(conn)
        self._process_rx()

    def _detach_from_loop(self, conn: Connection) -> None:
        if conn.registered:
            conn.registered = False
            conn.events = 0
            try:
                self._loop.remove(conn.sock)
            except (KeyError, OSError):
                pass

    def _flush_tx(self, conn: Connection) -> None:
        """Write buffered guest bytes to the host as far as it takes them."""
        chunks = conn.tx_chunks
        while chunks:
            batch = list(itertools.islice(chunks, 64))
            try:
                n = conn.sock.sendmsg(batch, (), socket.MSG_NOSIGNAL)
            except BlockingIOError:
                break
            except OSError as exc:
                self._reset(conn, f"host write failed: {exc}")
                return
            conn.fwd_cnt = (conn.fwd_cnt + n) & P.U32
            conn.tx_len -= n
            full = n < sum(len(b) for b in batch)
            while n:
                head = chunks[0]
                if len(head) <= n:
                    n -= len(head)
                    chunks.popleft()
                else:
                    chunks[0] = head[n:]
                    n = 0
            if full:
                break
        if not chunks:
            if conn.peer_shut == P.SHUTDOWN_BOTH:
                self._reset(conn, "closed by the guest")
                return
            if conn.peer_shut & P.SHUTDOWN_SEND:
                self._shut_host_write(conn)
        self._check_credit_update(conn)

    def _on_listener(self, _events: int) -> None:
        """New host connections on ``uds_path``: read their CONNECT line next."""
        for _ in range(64):
            try:
                sock, _addr = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                # Out of fds, say: stop polling the listener for a tick instead of spinning on it.
                log.warning("%s: cannot accept a host connection on %s: %s", self.name, self.uds_path, exc)
                self._loop.remove(self._listener)
                self._accept_paused = True
                self._timer.arm(TICK)
                return
            if len(self._handshakes) >= MAX_HANDSHAKES or len(self._conns) >= MAX_CONNECTIONS:
                self._refused(f"{len(self._conns)} connections and {len(self._handshakes)} CONNECT lines "
                              f"pending; closing a new host connection")
                sock.close()
                continue
            sock.setblocking(False)
            hs = _Handshake(sock)
            self._handshakes[sock.fileno()] = hs
            self._loop.add(sock, self._callback(self._on_handshake, hs), EPOLLIN)

    def _on_handshake(self, hs: _Handshake, _events: int) -> None:
        try:
            data = hs.sock.recv(MAX_CONNECT_LINE - len(hs.buf))
        except BlockingIOError:
            return
        except OSError:
            self._close_handshake(hs)
            return
        if not data:
            self._close_handshake(hs)  # gone before saying where to
            return
        hs.buf += data
        newline = hs.buf.find(b"\n")
        if newline < 0:
            if len(hs.buf) >= MAX_CONNECT_LINE:
                self.stats["bad_connect"] += 1
                log.debug("%s: host CONNECT line longer than %d bytes; closed", self.name, MAX_CONNECT_LINE)
                self._close_handshake(hs)
            return
        port = parse_connect(hs.buf[:newline])
        if port is None:
            self.stats["bad_connect"] += 1
            log.debug("%s: malformed host CONNECT line %r; closed", self.name, hs.buf[:newline])
            self._close_handshake(hs)
            return
        del self._handshakes[hs.sock.fileno()]
        if len(self._conns) >= MAX_CONNECTIONS:
            self._refused(f"{len(self._conns)} connections open; closing the host connection to port {port}")
            self._loop.remove(hs.sock)
            hs.sock.close()
            return
        conn = Connection(self._allocate_port(), port, hs.sock, LOCAL_INIT, host_initiated=True)
        conn.prefix = hs.buf[newline + 1:]
        conn.owe = OWE_REQUEST
        self._add(conn, registered=True)
        self._process_rx()

    def _close_handshake(self, hs: _Handshake) -> None:
        self._handshakes.pop(hs.sock.fileno(), None)
        if self._loop is not None:
            try:
                self._loop.remove(hs.sock)
            except (KeyError, OSError):
                pass
        hs.sock.close()

    def _allocate_port(self) -> int:
        while True:
            self._port_last = HOST_PORT_BASE + (self._port_last + 1 - HOST_PORT_BASE) % HOST_PORT_BASE
            if self._port_last not in self._host_ports:
                self._host_ports.add(self._port_last)
                return self._port_last

    # ----- deadlines -----
    def _set_deadline(self, conn: Connection, seconds: float) -> None:
        conn.deadline = time.monotonic() + seconds
        self._timed.add(conn)
        if not self._timer.armed:
            self._timer.arm(TICK)

    def _clear_deadline(self, conn: Connection) -> None:
        conn.deadline = None
        self._timed.discard(conn)

    def _on_timer(self, _events: int) -> None:
        self._timer.drain()
        if self._accept_paused:
            self._accept_paused = False
            self._loop.add(self._listener, self._callback(self._on_listener))
        now = time.monotonic()
        for conn in list(self._timed):
            if conn.dead or conn.deadline is None:
                self._timed.discard(conn)
            elif conn.deadline <= now:
                self.stats["timeouts"] += 1
                self._reset(conn, "timed out")
        if not self._timed:
            self._timer.disarm()
        self._process_rx()

    # ----- the event queue -----
    def _process_events(self) -> None:
        ctx = self.ctx
        queue, memory = ctx.queues[EVENT], ctx.memory
        if not queue.ready:
            return
        used = False
        while self._reset_event_pending:
            chain = queue.pop(memory)
            if chain is None:
                if queue.rearm(memory):
                    continue
                break
            written = chain.write(memory, 0, P.EVENT.pack(P.EVENT_TRANSPORT_RESET)) \
                if chain.writable_len >= P.EVENT.size else 0
            queue.add_used(memory, chain.head, written)
            used = True
            if written:
                self._reset_event_pending = False
        if used and queue.needs_interrupt(memory):
            self._signal_used()


def _hangup_events(sock: socket.socket) -> int:
    """EPOLLERR / EPOLLHUP as the socket has them now (HUP: both directions of the stream are shut)."""
    poller = select.poll()
    poller.register(sock, 0)
    revents = 0
    for _fd, ev in poller.poll(0):
        revents |= ev
    return (EPOLLERR if revents & select.POLLERR else 0) | (EPOLLHUP if revents & select.POLLHUP else 0)
