"""The native engine of virtio-blk: the glue between :class:`VirtioBlk` and ``native/virtio_blk.c``.

The C code serves the queue with the GIL released, in two halves:
:meth:`NativeBlk.submit` takes every posted chain (up to the executor's
request slots), checks it exactly as :mod:`vmmkit.virtio.queue` does and
starts its I/O without waiting; :meth:`NativeBlk.complete` answers whatever
has finished, in completion order (status bytes, used entries, used.idx),
and decides whether an interrupt is due. The executor signals
:attr:`NativeBlk.eventfd` when I/O finishes; the device's worker polls it.
Python keeps the control plane:

* the C view of guest memory (a table of regions) is rebuilt whenever the
  :class:`~vmmkit.memory.GuestMemory` publishes a new region table
  (hotplug), checked at the start of every call; the mappings of an old
  table stay pinned while requests that point into them are in flight;
* the :class:`~vmmkit.virtio.queue.Virtqueue` state is copied in before each
  call and out after it, so snapshots, the transport and the Python engine
  all see one queue state;
* the I/O executor (an io_uring, or a pool of threads where io_uring is
  missing) is created when the device is activated and freed at reset,
  after :meth:`NativeBlk.drain` answered what was in flight;
* a protocol violation comes back as :class:`~vmmkit.virtio.queue.QueueError`
  with the same message the Python engine gives, and the interrupt itself is
  raised by the caller (``ctx.signal_used()``), so InterruptStatus has one
  owner.

Calls are serialised by a lock, so a thread other than the device worker
(a test, the control plane at reset) may drain or complete safely.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from typing import Any, Callable, Dict, List, Optional

from vmmkit._native import ffi, lib
from vmmkit.virtio.native import NativeMemory, load_queue, setup_serve, store_queue
from vmmkit.virtio.queue import QueueError

log = logging.getLogger("vmmkit.blk")

#: I/O executors: ``auto`` is io_uring, else the thread pool.
IO_MODES = ("auto", "uring", "threads", "sync")
#: Workers of the fallback pool: enough to keep a few requests in flight on a
#: disk without io_uring, few enough not to matter on a small host.
POOL_THREADS = 4
#: The O_DIRECT bounce buffer: misaligned transfers go through it a chunk at a time.
BOUNCE_BYTES = 1 << 20
#: The C serving loop stops asking the guest for kicks while this many
#: requests are in flight: their completions wake it soon enough to find new
#: chains, and every kick costs the guest an exit. With fewer in flight, a new
#: request would wait for a whole I/O, so it asks again.
LAZY_KICK_INFLIGHT = 4
#: Interrupt coalescing in the C serving loop: while this many requests are in
#: flight, an interrupt may wait for more completions to go with it, up to the
#: average request latency >> COALESCE_SHIFT (so latency grows by at most a
#: sixteenth), never more than COALESCE_MAX_NS; shorter than COALESCE_FLOOR_NS
#: it is not worth a timer. Each interrupt costs the guest an injection, an
#: InterruptStatus read, an ACK and an EOI: on a guest whose CPU is the
#: bottleneck those exits are most of a small request's cost.
COALESCE_MIN_INFLIGHT = 4
COALESCE_SHIFT = 4
COALESCE_FLOOR_NS = 20_000
COALESCE_MAX_NS = 2_000_000
#: While no vCPU of the guest is halted (it is busy, not waiting on the disk), an
#: interrupt may wait with any request in flight, up to the average latency >>
#: BUSY_SHIFT (a half), capped as above; the loop looks at the vCPUs again at
#: least every BUSY_POLL_NS and raises it as soon as one halts. In the lab a half
#: took fewer exits per request than a quarter in every fio job (docs/benchmarks.md).
BUSY_SHIFT = 1
BUSY_POLL_NS = 200_000
#: While the guest is busy (as above), the loop asks for no kick with any
#: request in flight (not only LAZY_KICK_INFLIGHT): the completion brings it
#: back to the ring, and so does its look at the vCPUs every BUSY_POLL_NS,
#: which asks for kicks again as soon as one halts. A guest that keeps one or
#: two requests in flight (random I/O on a saturated vCPU) then posts most of
#: them without an exit.
BUSY_LAZY_KICK = True
#: While the guest is busy and streams (its last interrupt carried two or more
#: completions), an interrupt waits at least this long for more, even with
#: nothing left in flight: a disk faster than the guest finishes each request
#: before the next is posted, so the latency rule alone gave a busy guest one
#: interrupt per request or two. COALESCE_MAX_NS does not cap it: the hold
#: ends as soon as a vCPU halts (looked at every BUSY_POLL_NS), so only a
#: guest with no time to take its completions waits, and each interrupt costs
#: such a guest about four exits. A guest with one request at a time never
#: streams and keeps its interrupt at once. In the lab 8 ms took a third fewer
#: exits per 1 MiB write than 2 ms (docs/benchmarks.md).
BUSY_FLOOR_NS = 8_000_000

_KINDS = {"uring": lib.VMM_IO_URING, "threads": lib.VMM_IO_THREADS, "sync": lib.VMM_IO_SYNC}
_NAMES = {v: k for k, v in _KINDS.items()}

# Executors whose device thread could not be stopped: freeing them (or the
# memory pins) under a thread still inside C would be a use-after-free.
_abandoned: List["NativeBlk"] = []


def uring_available() -> bool:
    """Whether this build and this kernel give us an io_uring (seccomp or sysctls may refuse)."""
    err = ffi.new("int *")
    io = lib.vmm_blk_io_new(lib.VMM_IO_URING, 1, 0, err)
    if io == ffi.NULL:
        return False
    lib.vmm_blk_io_free(io)
    return True


class NativeBlk:
    """The C data path for one virtio-blk device.

    ``disk`` is the open :class:`~plugins.blk.disk.Disk`, ``serial`` the
    GET_ID answer (at most 20 bytes). ``io`` picks the executor (see
    :data:`IO_MODES`; the others are for tests and debugging).
    ``on_io_errors(count, strerror)`` hears about host I/O errors the guest
    was answered IOERR for. :meth:`open` and :meth:`close` happen while no
    other call runs; the others are serialised by a lock.
    """

    def __init__(self, disk, serial: bytes, *, io: str = "auto", threads: int = POOL_THREADS,
                 on_io_errors: Optional[Callable[[int, str], None]] = None):
        if io not in IO_MODES:
            raise ValueError(f"unknown native I/O mode {io!r}; expected one of {', '.join(IO_MODES)}")
        self.disk = disk
        self.io_mode = io
        self.threads = threads
        self.on_io_errors = on_io_errors
        #: The executor in use after :meth:`open`: "uring", "threads" or "sync".
        self.io_kind: Optional[str] = None
        self._io = ffi.NULL
        blk = self._blk = ffi.new("struct vmm_blk *")
        blk.fd = disk.fd
        blk.read_only = bool(disk.read_only)
        blk.direct = bool(disk.direct)
        blk.sectors = disk.sectors
        ffi.memmove(blk.serial, serial[:20], min(len(serial), 20))
        self._bounce = None
        if disk.direct:
            # mmap: page aligned, which is what O_DIRECT wants.
            self._bounce = mmap.mmap(-1, BOUNCE_BYTES)
            self._bounce_ptr = ffi.from_buffer("uint8_t[]", self._bounce)
            blk.bounce, blk.bounce_len = self._bounce_ptr, BOUNCE_BYTES
        self._vq = ffi.new("struct vmm_vq *")
        self._err = ffi.new("char[]", 512)
        self._nmem = NativeMemory()
        self._mem = self._nmem.struct
        self._retired: List[Any] = []  # pins of older tables that requests in flight may use
        self._lock = threading.Lock()
        self._errors_seen = 0
        # Its counters (wake-ups, interrupts, coalesced interrupts) run from the device's making; C
        # updates them as it goes, so they can be read while the loop runs.
        self._serve = ffi.new("struct vmm_serve *")

    # ----- lifecycle -----
    def open(self, depth: int) -> str:
        """Create the I/O executor for up to *depth* requests in flight; return its kind.

        ``auto`` tries io_uring and falls back to the thread pool when the
        kernel refuses (ENOSYS, EPERM under seccomp or
        ``kernel.io_uring_disabled``, ENOMEM under a low memlock limit). An
        explicit mode that cannot be had falls back to synchronous I/O with
        a warning rather than failing the guest's DRIVER_OK.
        """
        self.close()
        wanted = ["uring", "threads"] if self.io_mode == "auto" else [self.io_mode]
        err = ffi.new("int *")
        for mode in wanted:
            io = lib.vmm_blk_io_new(_KINDS[mode], depth, self.threads, err)
            if io != ffi.NULL:
                self._io, self.io_kind = io, mode
                return mode
            why = os.strerror(err[0])
            if self.io_mode == "auto":
                log.info("vmmkit: io_uring is not available (%s): virtio-blk uses a pool of %d I/O threads",
                         why, self.threads)
            else:
                log.warning("vmmkit: cannot set up %s I/O (%s): virtio-blk serves requests synchronously",
                            mode, why)
        io = lib.vmm_blk_io_new(lib.VMM_IO_SYNC, depth, 0, err)
        if io == ffi.NULL:
            raise MemoryError(f"cannot set up virtio-blk I/O: {os.strerror(err[0])}")
        self._io, self.io_kind = io, "sync"
        return "sync"

    def close(self) -> None:
        """Free the executor and forget guest memory (after the device thread stopped).

        Drain first (:meth:`drain`) to answer what is in flight; the C side
        still waits for running I/O rather than free memory under it.
        """
        with self._lock:
            io, self._io = self._io, ffi.NULL
            if io != ffi.NULL:
                lib.vmm_blk_io_free(io)  # waits for running I/O, joins the pool's threads
            self.io_kind = None
            self._forget_memory()

    def abandon(self) -> None:
        """Keep everything alive forever: the device thread is stuck inside C."""
        _abandoned.append(self)

    # ----- serving -----
    @property
    def eventfd(self) -> int:
        """The executor's completion eventfd (-1 when there is none: synchronous I/O or not open)."""
        return lib.vmm_blk_io_eventfd(self._io) if self._io != ffi.NULL else -1

    @property
    def inflight(self) -> int:
        """Requests taken from the queue and not answered yet."""
        return lib.vmm_blk_inflight(self._io) if self._io != ffi.NULL else 0

    def submit(self, memory, queue) -> None:
        """Take every chain posted on *queue* and start its I/O; answer nothing yet.

        Raises :class:`QueueError` when the driver broke the protocol; every
        I/O of the chains taken before the bad one has finished by then, and
        the next :meth:`complete` answers them.
        """
        with self._lock:
            self._call(lib.vmm_blk_submit, memory, queue)

    def complete(self, memory, queue) -> "tuple[bool, bool]":
        """Answer every request that has finished, without blocking.

        Returns ``(interrupt, resubmit)``: whether the driver wants an
        interrupt, and whether chains are waiting for a free request slot
        (call :meth:`submit` again).
        """
        with self._lock:
            rc = self._call(lib.vmm_blk_complete, memory, queue)
            return bool(rc & 1), bool(rc & 2)

    def process(self, memory, queue) -> bool:
        """Submit, then answer what has already finished (more may finish later:
        watch :attr:`eventfd`). Returns whether the driver wants an interrupt."""
        irq = False
        try:
            while True:
                self.submit(memory, queue)
                wants, again = self.complete(memory, queue)
                irq |= wants
                if not again:
                    return irq
        except QueueError:
            # The chains taken before the bad one are answered first, as the Python engine does.
            try:
                self.complete(memory, queue)
            except QueueError:
                pass  # the rings are gone: nobody can be answered; the first error says why
            raise

    def serve(self, memory, queue, kick_fd: int, control_fds, interrupt) -> None:
        """Serve *queue* in C until Python is needed: the whole busy path, GIL released.

        ``native/virtio_serve.c`` waits on *kick_fd* (the queue's notify
        eventfd) and the executor's eventfd, takes and answers requests,
        and raises the used-buffer interrupt through *interrupt* (a
        :class:`~vmmkit.virtio.device.NativeInterrupt`). It returns when one
        of *control_fds* (the worker loop's kill and pause fds) is readable;
        it comes back here and goes in again when guest memory's region table
        changed (the C view is rebuilt) or host I/O errors are to be reported.
        Raises :class:`QueueError` when the driver broke the ring (the chains
        taken before the bad one are answered).
        """
        with self._lock:
            if self._io == ffi.NULL:
                raise RuntimeError("the native virtio-blk engine is not open")
            s = self._serve
            setup_serve(s, memory, kick_fd, control_fds, interrupt)
            s.lazy_min = LAZY_KICK_INFLIGHT
            s.coalesce_min, s.coalesce_shift = COALESCE_MIN_INFLIGHT, COALESCE_SHIFT
            s.coalesce_floor_ns, s.coalesce_max_ns = COALESCE_FLOOR_NS, COALESCE_MAX_NS
            s.busy_shift, s.busy_poll_ns = BUSY_SHIFT, BUSY_POLL_NS
            s.busy_lazy = bool(BUSY_LAZY_KICK)
            s.busy_floor_ns = BUSY_FLOOR_NS
            while True:
                s.mem_gen = memory.table_gen[0]  # read before the view is built: a change after is seen
                rc = self._call(lib.vmm_blk_serve, memory, queue, s)
                if rc < 0 or s.stop != lib.VMM_SERVE_STOP_RECALL:
                    return

    def drain(self, memory, queue) -> "tuple[bool, bool]":
        """Wait for every request in flight and answer them; return ``(interrupt, resubmit)`` as :meth:`complete`.

        Afterwards nothing touches guest memory until the next :meth:`submit`
        (contract 3: the device's pause hook and reset call this).
        """
        with self._lock:
            if self._io == ffi.NULL:
                return False, False
            lib.vmm_blk_wait(self._io, self._blk)
            rc = self._call(lib.vmm_blk_complete, memory, queue)
            return bool(rc & 1), bool(rc & 2)

    def _call(self, fn, memory, queue, *extra) -> int:
        """Run one C call with the queue state copied in and out (lock held)."""
        if self._io == ffi.NULL:
            raise RuntimeError("the native virtio-blk engine is not open")
        self._sync_memory(memory)
        vq = self._vq
        load_queue(vq, queue)
        self._blk.fd = self.disk.fd
        rc = fn(self._mem, vq, self._blk, self._io, *extra, self._err, len(self._err))
        store_queue(vq, queue)
        errors = self._blk.io_errors
        if errors != self._errors_seen and self.on_io_errors is not None:
            self.on_io_errors(errors - self._errors_seen, os.strerror(self._blk.last_errno))
        self._errors_seen = errors
        if self._retired and not lib.vmm_blk_inflight(self._io):
            self._retired = []
        if rc < 0:
            raise QueueError(ffi.string(self._err).decode(errors="replace"))
        return rc

    @property
    def mem_align(self) -> int:
        """O_DIRECT's buffer alignment, when known: guest buffers not aligned to it go
        through the bounce buffer without first trying (0: the kernel's EINVAL decides)."""
        return self._blk.mem_align

    @mem_align.setter
    def mem_align(self, value: int) -> None:
        self._blk.mem_align = value

    def stats(self) -> Dict[str, int]:
        """Counters: requests answered, how many were in flight (most, and summed as each was taken),
        host iovecs per read or write, bounced transfers, I/O errors, and the serving loop's."""
        b = self._blk
        return {"requests": b.requests, "max_inflight": b.max_inflight, "bounced": b.bounced,
                "started": b.started, "inflight_sum": b.inflight_sum,
                "rw_requests": b.rw_requests, "rw_segments": b.rw_segments,
                "io_errors": b.io_errors, "inflight": self.inflight,
                "serve_wakeups": self._serve.wakeups, "serve_interrupts": self._serve.interrupts,
                "serve_coalesced": self._serve.coalesced, "serve_busy_held": self._serve.busy_held,
                "serve_busy_unarmed": self._serve.busy_unarmed}

    # ----- guest memory -----
    def _sync_memory(self, memory) -> None:
        """Bring the C region table up to date (see :class:`NativeMemory`)."""
        old = self._nmem.sync(memory)
        if old and self._io != ffi.NULL and lib.vmm_blk_inflight(self._io):
            self._retired.append(old)  # requests in flight still point into them

    def _forget_memory(self) -> None:
        self._nmem.forget()
        self._retired = []
