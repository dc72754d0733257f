"""What every native (C) virtio data path needs from the Python side: guest RAM and a queue as C structs.

The C code in ``native/`` sees guest memory as a table of ``struct vmm_region``
and a split virtqueue as ``struct vmm_vq``. :class:`NativeMemory` keeps the
table in step with :class:`~vmmkit.memory.GuestMemory` (rebuilt only when the
memory publishes a new region table, e.g. after hotplug), and
:func:`load_queue` / :func:`store_queue` copy a
:class:`~vmmkit.virtio.queue.Virtqueue`'s indices in and out around a call,
so the Python and C paths can take turns on the same queue.
:func:`setup_serve` fills what every C serving loop (``native/virtio_serve.c``)
waits on.
"""

from __future__ import annotations

from typing import Any, List

from vmmkit._native import ffi


class NativeMemory:
    """Guest RAM as a ``struct vmm_mem`` for C, kept in step with a :class:`GuestMemory`.

    Each region's mapping and dirty bitmap is pinned (a buffer export) for as
    long as the table refers to it, so even a region removed while C runs
    (which the pause rule forbids) stays mapped until the next rebuild.
    """

    def __init__(self) -> None:
        self.struct = ffi.new("struct vmm_mem *")
        self._table: Any = None
        self._memory: Any = None
        self._pins: List[Any] = []

    def sync(self, memory) -> List[Any]:
        """Point the struct at *memory*'s current regions; return the pins of the table it replaced ([] if none)."""
        table = memory._table
        if table is self._table and memory is self._memory:
            return []
        pins: List[Any] = []
        entries = []
        for r in table[1]:
            mm = r.mm
            if mm is None:
                continue  # closed under us: it is not guest RAM any more
            try:
                pin = ffi.from_buffer("uint8_t[]", mm)
            except (ValueError, TypeError):
                continue
            pins += [pin, r.dirty_ptr]
            entries.append((r, pin + r.mm_offset))
        regions = ffi.new("struct vmm_region[]", max(1, len(entries)))
        for i, (r, host) in enumerate(entries):
            c = regions[i]
            c.gpa, c.size, c.host = r.gpa, r.size, host
            c.dirty, c.dirty_len = r.dirty_ptr, len(r.dirty_bitmap)
        pins.append(regions)
        self.struct.regions, self.struct.nregions = regions, len(entries)
        self.struct.logging = memory.log_flag
        old, self._pins, self._table, self._memory = self._pins, pins, table, memory
        return old

    def forget(self) -> List[Any]:
        """Drop the table (the device was reset); return its pins."""
        old, self._pins, self._table, self._memory = self._pins, [], None, None
        self.struct.regions, self.struct.nregions, self.struct.logging = ffi.NULL, 0, ffi.NULL
        return old


def load_queue(vq, queue) -> None:
    """Copy a :class:`Virtqueue`'s rings and indices into ``struct vmm_vq`` *vq*."""
    vq.desc_addr, vq.avail_addr, vq.used_addr = queue.desc_addr, queue.avail_addr, queue.used_addr
    vq.size = queue.size
    vq.next_avail, vq.next_used, vq.signalled_used = queue.next_avail, queue.next_used, queue.signalled_used
    vq.event_idx, vq.indirect = bool(queue.event_idx), bool(queue.indirect)


def store_queue(vq, queue) -> None:
    """Copy the indices C advanced back into the :class:`Virtqueue`."""
    queue.next_avail, queue.next_used, queue.signalled_used = vq.next_avail, vq.next_used, vq.signalled_used


def setup_serve(srv, memory, kick_fd: int, control_fds, interrupt) -> None:
    """Fill ``struct vmm_serve`` *srv* for a C serving loop.

    *kick_fd*: the queue's notify eventfd; *control_fds*: the worker loop's
    kill and pause fds (readable: back to Python); *interrupt*: a
    :class:`~vmmkit.virtio.device.NativeInterrupt`. The loop watches
    *memory*'s region-table generation and returns when it changes; the
    caller sets ``srv.mem_gen`` before each call.
    """
    srv.kick_fd = kick_fd
    srv.stop_fd[0], srv.stop_fd[1] = control_fds
    srv.isr, srv.irq_fd = interrupt.isr, interrupt.fd
    activity = interrupt.activity
    if activity is not None and activity.known:
        srv.vcpu_fds, srv.nvcpus = activity.c_fds, len(activity)
        srv.blocking_off, srv.halts_off = activity.blocking_offset, activity.halts_offset
    else:
        srv.vcpu_fds, srv.nvcpus = ffi.NULL, 0
    srv.table_gen = memory.table_gen
