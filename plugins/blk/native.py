"""The native engine of virtio-blk: the glue between :class:`VirtioBlk` and ``native/virtio_blk.c``.

The C code serves a whole queue per call, GIL released: it walks and checks
the chains exactly as :mod:`vmmkit.virtio.queue` does, runs the I/O, writes
status bytes and used entries, re-arms ``avail_event`` and decides whether
an interrupt is due. Python keeps the control plane:

* the C view of guest memory (a table of regions) is rebuilt whenever the
  :class:`~vmmkit.memory.GuestMemory` publishes a new region table
  (hotplug), checked at the start of every call;
* the :class:`~vmmkit.virtio.queue.Virtqueue` state is copied in before each
  call and out after it, so snapshots, the transport and the Python engine
  all see one queue state;
* the I/O executor (an io_uring, or a pool of threads where io_uring is
  missing) is created when the device is activated and freed at reset;
* a protocol violation comes back as :class:`~vmmkit.virtio.queue.QueueError`
  with the same message the Python engine gives, and the interrupt itself is
  raised by the caller (``ctx.signal_used()``), so InterruptStatus has one
  owner.
"""

from __future__ import annotations

import logging
import mmap
import os
from typing import Any, Callable, Dict, List, Optional

from vmmkit._native import ffi, lib
from vmmkit.virtio.queue import QueueError

log = logging.getLogger("vmmkit.blk")

#: I/O executors: ``auto`` is io_uring, else the thread pool.
IO_MODES = ("auto", "uring", "threads", "sync")
#: Workers of the fallback pool: enough to keep a few requests in flight on a
#: disk without io_uring, few enough not to matter on a small host.
POOL_THREADS = 4
#: The O_DIRECT bounce buffer: misaligned transfers go through it a chunk at a time.
BOUNCE_BYTES = 1 << 20

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
    was answered IOERR for. One device thread calls :meth:`process` at a
    time; :meth:`open` and :meth:`close` happen while no call runs.
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
        self._mem = ffi.new("struct vmm_mem *")
        self._table: Any = None     # the GuestMemory._table the C table was built from
        self._pins: List[Any] = []  # keeps the region mappings and bitmaps alive for C
        self._memory: Any = None
        self._errors_seen = 0

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
        self._io, self.io_kind = ffi.NULL, "sync"
        return "sync"

    def close(self) -> None:
        """Free the executor and forget guest memory (after the device thread stopped)."""
        io, self._io = self._io, ffi.NULL
        if io != ffi.NULL:
            lib.vmm_blk_io_free(io)  # joins the pool's threads, if any
        self.io_kind = None
        self._forget_memory()

    def abandon(self) -> None:
        """Keep everything alive forever: the device thread is stuck inside C."""
        _abandoned.append(self)

    # ----- serving -----
    def process(self, memory, queue) -> bool:
        """Serve every chain posted on *queue*; return whether the driver wants an interrupt.

        Raises :class:`QueueError` when the driver broke the protocol; the
        chains taken before the bad one have been answered by then.
        """
        self._sync_memory(memory)
        vq = self._vq
        vq.desc_addr, vq.avail_addr, vq.used_addr = queue.desc_addr, queue.avail_addr, queue.used_addr
        vq.size = queue.size
        vq.next_avail, vq.next_used, vq.signalled_used = queue.next_avail, queue.next_used, queue.signalled_used
        vq.event_idx, vq.indirect = bool(queue.event_idx), bool(queue.indirect)
        self._blk.fd = self.disk.fd
        rc = lib.vmm_blk_process(self._mem, vq, self._blk, self._io, self._err, len(self._err))
        queue.next_avail, queue.next_used, queue.signalled_used = vq.next_avail, vq.next_used, vq.signalled_used
        errors = self._blk.io_errors
        if errors != self._errors_seen and self.on_io_errors is not None:
            self.on_io_errors(errors - self._errors_seen, os.strerror(self._blk.last_errno))
        self._errors_seen = errors
        if rc < 0:
            raise QueueError(ffi.string(self._err).decode(errors="replace"))
        return rc == 1

    @property
    def mem_align(self) -> int:
        """O_DIRECT's buffer alignment, when known: guest buffers not aligned to it go
        through the bounce buffer without first trying (0: the kernel's EINVAL decides)."""
        return self._blk.mem_align

    @mem_align.setter
    def mem_align(self, value: int) -> None:
        self._blk.mem_align = value

    def stats(self) -> Dict[str, int]:
        """Counters: requests answered, the largest batch of I/O started at once, bounced transfers, I/O errors."""
        b = self._blk
        return {"requests": b.requests, "max_batch": b.max_batch, "bounced": b.bounced, "io_errors": b.io_errors}

    # ----- guest memory -----
    def _sync_memory(self, memory) -> None:
        """Rebuild the C region table if the memory published a new one since the last call.

        Each region's mapping is pinned with a buffer export for as long as
        the table refers to it, so even a region removed while C runs (which
        the pause rule forbids) stays mapped until the next rebuild.
        """
        table = memory._table
        if table is self._table and memory is self._memory:
            return
        pins: List[Any] = []
        entries = []
        for r in table[1]:
            mm = r.mm
            if mm is None:
                continue  # closed under us: it is not guest RAM any more
            try:
                host = ffi.from_buffer("uint8_t[]", mm)
            except (ValueError, TypeError):
                continue
            pins += [host, r.dirty_ptr]
            entries.append((r, host))
        regions = ffi.new("struct vmm_region[]", max(1, len(entries)))
        for i, (r, host) in enumerate(entries):
            c = regions[i]
            c.gpa, c.size, c.host = r.gpa, r.size, host
            c.dirty, c.dirty_len = r.dirty_ptr, len(r.dirty_bitmap)
        pins.append(regions)
        self._mem.regions, self._mem.nregions = regions, len(entries)
        self._mem.logging = memory.log_flag
        self._pins, self._table, self._memory = pins, table, memory

    def _forget_memory(self) -> None:
        self._mem.regions, self._mem.nregions, self._mem.logging = ffi.NULL, 0, ffi.NULL
        self._pins, self._table, self._memory = [], None, None
