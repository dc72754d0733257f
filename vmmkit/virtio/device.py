"""The transport-independent virtio device interface, and the worker that serves its queues.

A device says what it is (ID, features, config space, queue sizes) and how
it handles a request (:meth:`VirtioDevice.handle_chain`, or a whole queue in
:meth:`VirtioDevice.process_queue`). A transport (virtio-MMIO today) does the
negotiation and hands the device a :class:`DeviceContext` when the driver
sets DRIVER_OK; the device serves its queues from its own worker thread
(role ``device``), woken by the queues' notification eventfds, which KVM
signals directly (ioeventfd) so that a guest kick costs no exit to Python.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, List, Optional

import attrs

from .. import threads
from ..epoll import EventLoop
from .queue import DescriptorChain, QueueError, Virtqueue

log = logging.getLogger("vmmkit.virtio")


@attrs.frozen
class NativeInterrupt:
    """How C code raises a device's used-buffer interrupt without Python.

    ``isr``: the transport's InterruptStatus (a cffi ``uint32_t *``; set bit 0
    with an atomic OR, ``vmm_isr_or``). ``fd``: the irqfd eventfd to write 1
    to afterwards. ``activity``: the VM's
    :class:`~vmmkit.kvm.stats.VcpuActivity` when known, so that C can tell a
    busy guest (an interrupt may wait) from a waiting one. See
    ``native/virtio_serve.c``.
    """

    isr: Any
    fd: int
    activity: Any = None


@attrs.define(eq=False)
class DeviceContext:
    """What an activated device works with.

    ``memory``: guest memory. ``queues``: the device's virtqueues, set up and
    checked. ``features``: the feature bits the driver accepted.
    ``notify_fds``: per queue, an eventfd that becomes readable when the
    driver kicks that queue (None for a queue the driver did not enable). ``signal_used()`` / ``signal_config()`` raise
    the used-buffer / config-change interrupt. ``needs_reset(why)`` marks
    the device DEVICE_NEEDS_RESET (the driver broke the protocol).
    ``native_interrupt``: when the transport's interrupt is an irqfd, how C
    raises the used-buffer interrupt itself (None otherwise: use
    ``signal_used``).
    """

    memory: Any
    queues: List[Virtqueue]
    features: int
    notify_fds: List[Any]
    signal_used: Callable[[], None]
    signal_config: Callable[[], None]
    needs_reset: Callable[[str], None]
    native_interrupt: Optional[NativeInterrupt] = None

    def has(self, bit: int) -> bool:
        """Whether feature *bit* was negotiated."""
        return bool(self.features >> bit & 1)


class VirtioDevice:
    """Base class for virtio devices.

    Subclasses set ``device_id`` and ``queue_sizes`` and override
    :meth:`device_features`, :meth:`config_bytes` (or :meth:`read_config`),
    and :meth:`handle_chain` or :meth:`process_queue`. ``name`` names the
    worker thread (``device:<name>``) and log lines. :meth:`state` /
    :meth:`restore` carry device-specific runtime state (contract 1); queues
    and negotiation belong to the transport.
    """

    device_id: int = 0
    queue_sizes: tuple = (256,)

    def __init__(self, name: str):
        self.name = name
        self.ctx: Optional[DeviceContext] = None
        self.broken: Optional[str] = None
        self._loop: Optional[EventLoop] = None
        self._thread = None

    # ----- what the driver sees -----
    def device_features(self) -> int:
        """Device-specific feature bits offered (the transport adds the ring and version bits)."""
        return 0

    def config_bytes(self) -> bytes:
        """The device's whole config space, little-endian as the spec lays it out."""
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        """Bytes of config space; reads past its end return zeros."""
        data = self.config_bytes()[offset:offset + size]
        return data + bytes(size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to config space; ignored unless a device has writable fields."""

    # ----- lifecycle -----
    def activate(self, ctx: DeviceContext) -> None:
        """Start serving: called by the transport when the driver sets DRIVER_OK."""
        self.ctx = ctx
        self.broken = None
        self._loop = EventLoop(f"device:{self.name}", on_error=self._worker_error)
        for index, fd in enumerate(ctx.notify_fds):
            if fd is not None:
                self._loop.add(fd, lambda _fd, _ev, i=index: self._on_notify(i))
        self._thread = threads.start_thread(threads.ROLE_DEVICE, f"device:{self.name}", self._loop.run)
        # A driver may have kicked before DRIVER_OK took effect: look once.
        for fd in ctx.notify_fds:
            if fd is not None:
                fd.signal()

    def reset(self) -> None:
        """Stop serving and forget the driver (device reset, or the VM stopping)."""
        if self._loop is not None:
            self._loop.kill()
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(timeout=10)
            self._loop.close()
        self._loop = self._thread = None
        self.ctx = None

    def pause(self) -> bool:
        """Stop touching guest memory and queues until :meth:`resume` (contract 3)."""
        return self._loop.pause(timeout=10) if self._loop is not None else True

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        if self._loop is not None:
            self._loop.resume()

    # ----- serving -----
    def _on_notify(self, index: int) -> None:
        self.ctx.notify_fds[index].drain()
        if self.broken is not None:
            return
        try:
            self.process_queue(index)
        except QueueError as exc:
            self.fail(f"queue {index}: {exc}")

    def fail(self, why: str) -> None:
        """The driver broke the protocol: stop serving and ask for a reset."""
        self.broken = why
        log.warning("vmmkit: %s: %s; the device needs a reset", self.name, why)
        if self.ctx is not None:
            self.ctx.needs_reset(why)

    def _worker_error(self, exc: BaseException) -> None:
        # A device bug must not leave the guest waiting forever without a word.
        log.error("vmmkit: %s: worker failed: %s: %s", self.name, type(exc).__name__, exc, exc_info=exc)
        self.fail(f"internal error: {type(exc).__name__}: {exc}")

    def process_queue(self, index: int) -> None:
        """Serve every chain posted on queue *index*, then interrupt if the driver wants it."""
        ctx = self.ctx
        queue, memory = ctx.queues[index], ctx.memory
        while True:
            while (chain := queue.pop(memory)) is not None:
                written = self.handle_chain(index, chain)
                queue.add_used(memory, chain.head, written)
            if not queue.rearm(memory):
                break
        if queue.needs_interrupt(memory):
            ctx.signal_used()

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        """Serve one request; return the number of bytes written into its writable buffers."""
        raise NotImplementedError(f"{type(self).__name__} must implement handle_chain or process_queue")

    # ----- snapshots -----
    def state(self) -> Any:
        """Device-specific runtime state (None when it has none)."""
        return None

    def restore(self, state: Any) -> None:
        """Take what :meth:`state` returned."""
