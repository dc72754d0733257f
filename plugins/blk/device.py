"""virtio-blk (virtio 1.x, 5.2): the request protocol over one queue.

Every request is checked before the disk is touched: the header must be
readable and whole, the status byte writable, data lengths whole sectors,
sector ranges inside the disk, discard segments well-formed. A bad request
gets VIRTIO_BLK_S_IOERR or S_UNSUPP in its status byte; a chain with no
room for a status byte at all breaks the protocol and the device asks for a
reset. A host I/O error is the guest's IOERR, never a VMM failure.

Two engines serve the queue. ``native`` (the default) runs the whole data
path in C with the GIL released and many requests in flight
(:mod:`.native`, ``native/virtio_blk.c``): a kick starts the I/O of every
posted request, and each request is answered as soon as its I/O finishes,
not when the slowest of its batch does. In a VM (the interrupt is an
irqfd) the worker's first wake enters a C serving loop
(``native/virtio_serve.c``) that waits for kicks and completions and raises
interrupts itself, so a busy disk costs no Python at all; it comes back to
Python for pause, reset and stop, which first wait for what is in flight. ``python`` is
:meth:`VirtioBlk.handle_chain` below: the readable reference the C path is
tested against, and a debugging switch. Both answer every request alike.
"""

from __future__ import annotations

import logging
import struct
import threading

from vmmkit.memory import GuestMemory
from vmmkit.virtio import VirtioDevice
from vmmkit.virtio.constants import ID_BLOCK
from vmmkit.virtio.queue import DescriptorChain, QueueError

from .disk import SECTOR, Disk
from .native import NativeBlk

log = logging.getLogger("vmmkit.blk")

# Feature bits (5.2.3).
F_SEG_MAX = 2
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_TOPOLOGY = 10
F_DISCARD = 13
F_WRITE_ZEROES = 14

# Request types and status values (5.2.6).
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

from . import ID_BYTES  # noqa: E402  (one definition, in the package)
WRITE_ZEROES_F_UNMAP = 1
QUEUE_SIZE = 256
MAX_DISCARD_SEG = 16
MAX_DISCARD_SECTORS = (1 << 30) // SECTOR  # 1 GiB per segment bounds the time one request can take

_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")

#: The data path engines (see the module docstring).
ENGINES = ("native", "python")


class BlkError(Exception):
    """A request the device answers with an error status."""

    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status = status


class VirtioBlk(VirtioDevice):
    """A virtio block device backed by a :class:`~plugins.blk.disk.Disk`.

    ``engine`` picks the data path: ``"native"`` (C, the default) or
    ``"python"`` (the reference). ``native_io`` picks the native engine's
    I/O executor (:data:`.native.IO_MODES`; ``"auto"`` is io_uring, else a
    thread pool). ``io_errors`` counts host I/O errors answered with IOERR.
    """

    device_id = ID_BLOCK
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, name: str, disk: Disk, serial: str = "", *, engine: str = "native",
                 native_io: str = "auto"):
        if engine not in ENGINES:
            raise ValueError(f"unknown virtio-blk engine {engine!r}; expected one of {', '.join(ENGINES)}")
        super().__init__(name)
        self.disk = disk
        self.serial = serial.encode()[:ID_BYTES]
        self.io_errors = 0
        self.engine = engine
        self._native_io = native_io
        self.native = self._new_native() if engine == "native" else None
        self._native_active = False

    def _new_native(self) -> NativeBlk:
        return NativeBlk(self.disk, self.serial, io=self._native_io, on_io_errors=self._host_io_errors)

    def _host_io_errors(self, count: int, why: str) -> None:
        """Count host I/O errors the guest saw as IOERR; log the first few."""
        before = self.io_errors
        self.io_errors += count
        if before < 5:
            log.warning("vmmkit: %s: host I/O error on %s: %s (the guest sees an I/O error)",
                        self.name, self.disk.path, why)

    # ----- lifecycle: the native engine's executor lives from activate to reset -----
    def activate(self, ctx) -> None:
        """Set up the native engine's I/O (if it is used), then start serving."""
        self._native_active = False
        if self.native is not None:
            if isinstance(ctx.memory, GuestMemory):
                self.native.open(depth=max([q.size for q in ctx.queues if q.ready] or [QUEUE_SIZE]))
                self._native_active = True
            else:
                log.warning("vmmkit: %s: guest memory is a %s, not a GuestMemory: using the Python engine",
                            self.name, type(ctx.memory).__name__)
        super().activate(ctx)
        if self._native_active:
            self._loop.on_pause = self._quiesce
            fd = self.native.eventfd
            if fd >= 0:
                self._loop.add(fd, self._on_io_done)

    def reset(self) -> None:
        """Stop serving; answer what is in flight, then free the native engine's executor."""
        worker = self._thread
        ctx = self.ctx
        super().reset()
        active, self._native_active = self._native_active, False
        if self.native is not None:
            if worker is not None and worker.is_alive() and worker is not threading.current_thread():
                # Still inside C after the join timed out: its executor and
                # memory pins must outlive it, so they are never freed.
                log.error("vmmkit: %s: the device thread did not stop; abandoning its I/O executor", self.name)
                self.native.abandon()
                self.native = self._new_native()
                return
            if active and ctx is not None:
                # The worker is gone; requests it started may still be running.
                # The driver is still waiting on the reset, so they are answered.
                try:
                    self.native.drain(ctx.memory, ctx.queues[0])
                except QueueError as exc:
                    log.debug("%s: requests in flight at reset could not be answered: %s", self.name, exc)
            if active:
                log.debug("%s: native engine stopped; %s", self.name, self.native.stats())
            self.native.close()

    def state(self):
        """No device-specific state; refuses while requests are in flight (pause first)."""
        if self.native is not None and self.native.inflight:
            raise RuntimeError(f"{self.name}: state() with {self.native.inflight} requests in flight; pause first")
        return super().state()

    def process_queue(self, index: int) -> None:
        """Serve queue *index*: in C for the native engine, else chain by chain in Python.

        The native engine starts the I/O of every posted request and answers
        what has finished; the rest is answered by :meth:`_on_io_done`.
        """
        if not self._native_active:
            super().process_queue(index)
            return
        ctx = self.ctx
        if self._loop is not None and self._loop.on_pause is None:
            self._loop.on_pause = self._quiesce
        if self._serve_in_c(ctx):
            return
        if self.native.process(ctx.memory, ctx.queues[index]):
            ctx.signal_used()

    def _serve_in_c(self, ctx) -> bool:
        """Serve in the C loop until the worker is needed (pause, kill); False when it cannot be used.

        It needs an irqfd interrupt and a worker loop to come back to.
        """
        if ctx.native_interrupt is None or self._loop is None or not ctx.notify_fds or ctx.notify_fds[0] is None:
            return False
        self.native.serve(ctx.memory, ctx.queues[0], ctx.notify_fds[0].fd, self._loop.control_fds(),
                          ctx.native_interrupt)
        return True

    def _on_io_done(self, _fd: int, _events: int) -> None:
        """The executor's eventfd fired: answer what finished, take more chains if some wait for a slot."""
        ctx = self.ctx
        if ctx is None or not self._native_active:
            return
        queue = ctx.queues[0]
        try:
            if self._serve_in_c(ctx):
                return
            irq, again = self.native.complete(ctx.memory, queue)
            if again and self.broken is None:
                irq |= self.native.process(ctx.memory, queue)
        except QueueError as exc:
            self.fail(f"queue 0: {exc}")
            return
        if irq:
            ctx.signal_used()

    def _quiesce(self) -> None:
        """The worker's pause hook: wait for the requests in flight and answer them."""
        ctx = self.ctx
        if ctx is None or not self._native_active or not self.native.inflight:
            return
        try:
            irq, again = self.native.drain(ctx.memory, ctx.queues[0])
        except QueueError as exc:
            self.fail(f"queue 0: {exc}")
            return
        if irq:
            ctx.signal_used()
        if again and ctx.notify_fds and ctx.notify_fds[0] is not None:
            # Chains wait for the slots just freed and no completion will come
            # to fetch them: a kick, served after resume, takes them.
            ctx.notify_fds[0].signal()

    def device_features(self) -> int:
        """Sector-size, segment-limit and flush always; discard and zeroing unless read-only."""
        bits = (1 << F_SEG_MAX) | (1 << F_BLK_SIZE) | (1 << F_FLUSH) | (1 << F_TOPOLOGY)
        if self.disk.read_only:
            bits |= 1 << F_RO
        else:
            bits |= (1 << F_DISCARD) | (1 << F_WRITE_ZEROES)
        return bits

    def config_bytes(self) -> bytes:
        """virtio_blk_config: capacity, limits, topology, discard and write-zeroes limits."""
        return _CONFIG.pack(
            self.disk.sectors, 0, QUEUE_SIZE - 2, 0, 0, 0, SECTOR,
            3, 0, 8, 0,  # topology: 4 KiB physical blocks (2**3 sectors), 4 KiB minimum I/O
            0, 0, 1,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 8,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1)

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        """Serve one request; the last writable byte gets the status."""
        memory = self.ctx.memory
        data_in = chain.writable_len - 1  # bytes before the status byte
        if data_in < 0:
            raise QueueError(f"request at head {chain.head} has no writable status byte")
        try:
            written = self._serve(memory, chain, data_in)
            status = S_OK
        except BlkError as exc:
            log.debug("%s: request at head %d: %s", self.name, chain.head, exc)
            written, status = 0, exc.status
        except OSError as exc:
            self._host_io_errors(1, exc.strerror or str(exc))
            written, status = 0, S_IOERR
        chain.write(memory, data_in, bytes([status]))
        return written + 1

    def _serve(self, memory, chain: DescriptorChain, data_in: int) -> int:
        if chain.readable_len < _HEADER.size:
            raise BlkError(S_IOERR, f"header is {chain.readable_len} bytes, expected {_HEADER.size}")
        rtype, _, sector = _HEADER.unpack(chain.read(memory, 0, _HEADER.size))
        data_out = chain.readable_len - _HEADER.size
        if rtype == T_IN:
            offset = self._range(sector, data_in)
            n = self.disk.readv(chain.writable_views(memory, 0, data_in), offset)
            chain.mark_written(memory, 0, n)
            if n != data_in:
                raise BlkError(S_IOERR, f"short read at sector {sector}: the image shrank?")
            return n
        if rtype == T_OUT:
            if self.disk.read_only:
                raise BlkError(S_IOERR, "write to a read-only disk")
            offset = self._range(sector, data_out)
            n = self.disk.writev(chain.readable_views(memory, _HEADER.size, data_out), offset)
            if n != data_out:
                raise BlkError(S_IOERR, f"short write at sector {sector}")
            return 0
        if rtype == T_FLUSH:
            self.disk.flush()
            return 0
        if rtype == T_GET_ID:
            ident = self.serial + bytes(ID_BYTES - len(self.serial))
            return chain.write(memory, 0, ident[:min(ID_BYTES, data_in)])
        if rtype in (T_DISCARD, T_WRITE_ZEROES):
            self._discard_or_zero(memory, chain, rtype, data_out)
            return 0
        raise BlkError(S_UNSUPP, f"request type {rtype}")

    def _range(self, sector: int, length: int) -> int:
        """The byte offset of a data transfer, after checking it is whole sectors inside the disk."""
        if length % SECTOR:
            raise BlkError(S_IOERR, f"data length {length} is not a multiple of {SECTOR}")
        if sector > self.disk.sectors or length // SECTOR > self.disk.sectors - sector:
            raise BlkError(S_IOERR, f"sectors {sector}+{length // SECTOR} are past the end of the disk "
                                    f"({self.disk.sectors} sectors)")
        return sector * SECTOR

    def _discard_or_zero(self, memory, chain: DescriptorChain, rtype: int, data_out: int) -> None:
        if self.disk.read_only:
            raise BlkError(S_IOERR, "discard or write-zeroes on a read-only disk")
        if data_out == 0 or data_out % _SEGMENT.size or data_out // _SEGMENT.size > MAX_DISCARD_SEG:
            raise BlkError(S_UNSUPP, f"{data_out} bytes of segments (expected 1..{MAX_DISCARD_SEG} of 16)")
        raw = chain.read(memory, _HEADER.size, data_out)
        segments = [_SEGMENT.unpack_from(raw, i) for i in range(0, data_out, _SEGMENT.size)]
        for sector, count, flags in segments:  # check them all before acting on any
            if count > MAX_DISCARD_SECTORS:
                raise BlkError(S_IOERR, f"segment of {count} sectors exceeds the limit {MAX_DISCARD_SECTORS}")
            self._range(sector, count * SECTOR)
            allowed = WRITE_ZEROES_F_UNMAP if rtype == T_WRITE_ZEROES else 0
            if flags & ~allowed:
                raise BlkError(S_UNSUPP, f"segment flags {flags:#x}")
        for sector, count, flags in segments:
            if rtype == T_DISCARD:
                self.disk.discard(sector * SECTOR, count * SECTOR)
            else:
                self.disk.write_zeroes(sector * SECTOR, count * SECTOR, bool(flags & WRITE_ZEROES_F_UNMAP))

    def close(self) -> None:
        """Stop (freeing the native engine's executor) and close the image."""
        self.reset()
        self.disk.close()
