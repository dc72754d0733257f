"""The virtio-MMIO transport, register layout version 2 (virtio 1.x, 4.2).

One :class:`VirtioMmioTransport` per device: a bus device covering a
0x1000-byte window. It runs the driver's side of the handshake (status
machine, feature negotiation, queue set-up, config space with a generation
counter, reset) and activates the device on DRIVER_OK. Queue notifications
arrive on per-queue eventfds: KVM signals them straight from the guest's
write to QueueNotify (ioeventfd, no exit to Python) when a KVM VM is given;
otherwise the transport signals them itself from the MMIO write.

Everything the driver writes is checked: out-of-order status changes,
features the device never offered, queue set-up after DRIVER_OK, bad queue
sizes or ring addresses. A driver that gets it wrong sees FEATURES_OK
refused or DEVICE_NEEDS_RESET, never a VMM failure.
"""

from __future__ import annotations

import logging
import select
import struct
import threading
from typing import Any, Callable, Optional, Tuple

import attrs

from .._native import ffi, lib
from ..kvm.vm import EventFd
from . import constants as C
from .device import DeviceContext, NativeInterrupt, VirtioDevice
from .queue import QueueError, QueueState, Virtqueue

log = logging.getLogger("vmmkit.virtio")

#: Ring features every device gets from the transport and queue code.
TRANSPORT_FEATURES = (1 << C.F_VERSION_1) | (1 << C.F_INDIRECT_DESC) | (1 << C.F_EVENT_IDX)


@attrs.frozen
class TransportState:
    """The transport's runtime state plus its device's (contract 1)."""

    version: int = 1
    status: int = 0
    driver_features: int = 0
    device_features_sel: int = 0
    driver_features_sel: int = 0
    queue_sel: int = 0
    interrupt_status: int = 0
    config_generation: int = 0
    queues: Tuple[QueueState, ...] = ()
    device: Any = None


class VirtioMmioTransport:
    """A virtio device behind a virtio-MMIO register window.

    ``irq``: a callable that injects one interrupt edge (an irqfd trigger).
    ``irq_fd``: the eventfd behind ``irq``, when it is one: then C code
    serving a queue may raise the used-buffer interrupt itself
    (:class:`~vmmkit.virtio.device.NativeInterrupt`). ``kvm_vm`` and
    ``base``: when given, queue notifications are wired as ioeventfds on
    ``base + QueueNotify``.

    InterruptStatus is a ``uint32_t`` in C memory, changed only with atomic
    operations (``vmm_isr_or`` / ``vmm_isr_and`` in ``native/kvm_native.c``),
    because a device's C serving loop sets its used-buffer bit, and a vCPU
    answers the driver's reads and acknowledgements, without the GIL or the
    transport's locks.
    """

    bus_lock = False  # the transport locks itself; the device thread shares its state

    def __init__(self, device: VirtioDevice, memory, irq: Callable[[], None], *,
                 irq_fd: Optional[int] = None, kvm_vm=None, base: Optional[int] = None):
        self.device = device
        self.memory = memory
        self._irq = irq
        self._isr = ffi.new("uint32_t *")
        self._native_irq = NativeInterrupt(self._isr, irq_fd, getattr(kvm_vm, "vcpu_activity", None)) \
            if irq_fd is not None else None
        # Register state belongs to the vCPU side. The device thread only raises
        # interrupts (atomic updates of InterruptStatus: no lock) and NEEDS_RESET
        # and config changes (under a lock of their own), so a reset that joins
        # the device thread can never wait on a lock that thread needs.
        self._lock = threading.RLock()
        self._int_lock = threading.Lock()
        self.queues = [Virtqueue(n) for n in device.queue_sizes]
        self.notify_fds = [EventFd() for _ in self.queues]
        self._ioeventfds = False
        if kvm_vm is not None and base is not None:
            for index, fd in enumerate(self.notify_fds):
                kvm_vm.ioeventfd(fd.fd, base + C.MMIO_QUEUE_NOTIFY, 4, datamatch=index)
            # The guest reads and acknowledges InterruptStatus on every interrupt: the vCPU answers in C.
            kvm_vm.fast_mmio.add(base + C.MMIO_INTERRUPT_STATUS, self._isr, kvm_vm.fast_mmio.READ32)
            kvm_vm.fast_mmio.add(base + C.MMIO_INTERRUPT_ACK, self._isr, kvm_vm.fast_mmio.ACK32)
            self._kvm_vm, self._base = kvm_vm, base
            self._ioeventfds = True
        self.offered = device.device_features() | TRANSPORT_FEATURES
        self._clear()

    def _clear(self) -> None:
        self.status = 0
        self.broken = False  # DEVICE_NEEDS_RESET, set from either side
        self.driver_features = 0
        self.device_features_sel = self.driver_features_sel = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        for q in self.queues:
            q.reset()

    # ----- bus interface -----
    def bus_read(self, offset: int, size: int) -> bytes:
        """A driver read from the window."""
        with self._lock:
            if offset >= C.MMIO_CONFIG:
                return self.device.read_config(offset - C.MMIO_CONFIG, size)
            if size != 4 or offset % 4:
                return bytes(size)  # registers are 32-bit only (4.2.2.2)
            return struct.pack("<I", self._read_register(offset) & 0xFFFFFFFF)

    def bus_write(self, offset: int, data: bytes) -> None:
        """A driver write to the window."""
        with self._lock:
            if offset >= C.MMIO_CONFIG:
                self.device.write_config(offset - C.MMIO_CONFIG, bytes(data))
                return
            if len(data) != 4 or offset % 4:
                return
            self._write_register(offset, struct.unpack("<I", data)[0])

    def _queue(self) -> Optional[Virtqueue]:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _read_register(self, offset: int) -> int:
        q = self._queue()
        if offset == C.MMIO_MAGIC_VALUE:
            return C.MMIO_MAGIC
        if offset == C.MMIO_VERSION:
            return C.MMIO_VERSION_MODERN
        if offset == C.MMIO_DEVICE_ID:
            return self.device.device_id
        if offset == C.MMIO_VENDOR_ID:
            return C.VENDOR_ID
        if offset == C.MMIO_DEVICE_FEATURES:
            return (self.offered >> (32 * self.device_features_sel)) if self.device_features_sel < 2 else 0
        if offset == C.MMIO_QUEUE_NUM_MAX:
            return q.max_size if q else 0
        if offset == C.MMIO_QUEUE_READY:
            return int(q.ready) if q else 0
        if offset == C.MMIO_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == C.MMIO_STATUS:
            return self.status | (C.STATUS_DEVICE_NEEDS_RESET if self.broken else 0)
        if offset == C.MMIO_CONFIG_GENERATION:
            return self.config_generation
        if offset in (C.MMIO_SHM_LEN_LOW, C.MMIO_SHM_LEN_HIGH, C.MMIO_SHM_BASE_LOW, C.MMIO_SHM_BASE_HIGH):
            return 0xFFFFFFFF  # no shared memory regions (4.2.2: length -1 means none)
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        if offset == C.MMIO_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == C.MMIO_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == C.MMIO_DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == C.MMIO_QUEUE_SEL:
            self.queue_sel = value
        elif offset == C.MMIO_QUEUE_NOTIFY:
            # Only reached without ioeventfd, or with a queue index no eventfd matches.
            if value < len(self.notify_fds) and self.status & C.STATUS_DRIVER_OK:
                self.notify_fds[value].signal()
        elif offset == C.MMIO_INTERRUPT_ACK:
            lib.vmm_isr_and(self._isr, ~value & 0xFFFFFFFF)
        elif offset == C.MMIO_STATUS:
            self._write_status(value)
        else:
            self._write_queue_register(offset, value)

    def _write_driver_features(self, value: int) -> None:
        # Features are settable between DRIVER and FEATURES_OK only (3.1.1).
        if self.status & C.STATUS_FEATURES_OK or not self.status & C.STATUS_DRIVER:
            return
        if self.driver_features_sel < 2:
            shift = 32 * self.driver_features_sel
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def _write_queue_register(self, offset: int, value: int) -> None:
        q = self._queue()
        # Queue set-up belongs between FEATURES_OK and DRIVER_OK; a ready queue's layout is fixed.
        if q is None or self.status & C.STATUS_DRIVER_OK or not self.status & C.STATUS_FEATURES_OK:
            return
        if offset == C.MMIO_QUEUE_READY:
            q.ready = bool(value & 1)
            return
        if q.ready:
            return
        if offset == C.MMIO_QUEUE_NUM:
            q.size = value
        elif offset in (C.MMIO_QUEUE_DESC_LOW, C.MMIO_QUEUE_DESC_HIGH):
            q.desc_addr = _set_half(q.desc_addr, offset == C.MMIO_QUEUE_DESC_HIGH, value)
        elif offset in (C.MMIO_QUEUE_DRIVER_LOW, C.MMIO_QUEUE_DRIVER_HIGH):
            q.avail_addr = _set_half(q.avail_addr, offset == C.MMIO_QUEUE_DRIVER_HIGH, value)
        elif offset in (C.MMIO_QUEUE_DEVICE_LOW, C.MMIO_QUEUE_DEVICE_HIGH):
            q.used_addr = _set_half(q.used_addr, offset == C.MMIO_QUEUE_DEVICE_HIGH, value)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        value &= ~C.STATUS_DEVICE_NEEDS_RESET  # the device's bit, not the driver's
        old = self.status
        if value & ~old & C.STATUS_FEATURES_OK:
            # The driver may only accept what was offered, and must speak virtio 1.
            if self.driver_features & ~self.offered or not self.driver_features >> C.F_VERSION_1 & 1:
                value &= ~C.STATUS_FEATURES_OK
        if old & ~value:
            return  # status bits are only ever added, until a reset
        self.status = value
        if value & ~old & C.STATUS_DRIVER_OK:
            self._activate()

    def _activate(self) -> None:
        if not self.status & C.STATUS_FEATURES_OK:
            self._needs_reset("DRIVER_OK without FEATURES_OK")
            return
        for q in self.queues:
            q.event_idx = bool(self.driver_features >> C.F_EVENT_IDX & 1)
            q.indirect = bool(self.driver_features >> C.F_INDIRECT_DESC & 1)
        active = [q for q in self.queues if q.ready]
        try:
            for index, q in enumerate(self.queues):
                if q.ready:
                    q.check(self.memory)
        except QueueError as exc:
            self._needs_reset(f"queue {index}: {exc}")
            return
        if not active:
            log.debug("%s: DRIVER_OK with no ready queue", self.device.name)
        self.device.activate(self._context())

    def _context(self) -> DeviceContext:
        return DeviceContext(memory=self.memory, queues=self.queues, features=self.driver_features,
                             notify_fds=[fd if q.ready else None for fd, q in zip(self.notify_fds, self.queues)],
                             signal_used=self.signal_used, signal_config=self.signal_config,
                             needs_reset=self._needs_reset, native_interrupt=self._native_irq)

    def reset(self) -> None:
        """Device reset (the driver wrote 0 to Status): stop the device and forget everything."""
        with self._lock:
            self.device.reset()
            for fd in self.notify_fds:
                fd.drain()
            with self._int_lock:
                self._clear()

    # ----- interrupts -----
    def signal_used(self) -> None:
        """Tell the driver that used buffers are waiting."""
        self._interrupt(C.INT_USED_BUFFER)

    def signal_config(self) -> None:
        """Tell the driver that config space changed (bumps ConfigGeneration)."""
        with self._int_lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        lib.vmm_isr_or(self._isr, C.INT_CONFIG_CHANGE)
        self._irq()

    def _interrupt(self, bit: int) -> None:
        lib.vmm_isr_or(self._isr, bit)
        self._irq()

    @property
    def interrupt_status(self) -> int:
        """InterruptStatus as the driver reads it."""
        return self._isr[0]

    @interrupt_status.setter
    def interrupt_status(self, value: int) -> None:
        # Only while no device thread runs (construction, reset, restore).
        self._isr[0] = value

    def _needs_reset(self, why: str) -> None:
        if self.broken:
            return
        log.warning("vmmkit: %s: %s; the device needs a reset", self.device.name, why)
        self.broken = True
        if self.status & C.STATUS_DRIVER_OK:
            self.signal_config()

    def inspect(self) -> dict:
        """Device status, InterruptStatus and each queue as both sides see it (:meth:`Virtqueue.inspect`).

        ``kick_pending`` says whether the queue's notify eventfd holds a kick
        the device has not taken yet: with chains posted past ``next_avail``,
        a kick pending points at a worker that does not wake, none at a kick
        that was never made or was taken without serving the ring.
        """
        with self._lock:
            queues = []
            for q, fd in zip(self.queues, self.notify_fds):
                seen = q.inspect(self.memory)
                seen["kick_pending"] = _readable(fd)
                queues.append(seen)
            return {"status": self.status, "broken": self.broken, "interrupt_status": self.interrupt_status,
                    "queues": queues}

    # ----- snapshots and teardown -----
    def state(self) -> TransportState:
        """The transport's and the device's runtime state."""
        with self._lock:
            return TransportState(status=self.status | (C.STATUS_DEVICE_NEEDS_RESET if self.broken else 0), driver_features=self.driver_features,
                                  device_features_sel=self.device_features_sel,
                                  driver_features_sel=self.driver_features_sel, queue_sel=self.queue_sel,
                                  interrupt_status=self.interrupt_status,
                                  config_generation=self.config_generation,
                                  queues=tuple(q.state() for q in self.queues), device=self.device.state())

    def restore(self, state: TransportState) -> None:
        """Rebuild from :meth:`state`; a device the driver had started is started again."""
        if state.version != 1:
            raise ValueError(f"virtio-MMIO transport state version {state.version} is not supported (expected 1)")
        if len(state.queues) != len(self.queues):
            raise ValueError(f"{self.device.name}: the saved state has {len(state.queues)} queues, "
                             f"the device has {len(self.queues)}")
        with self._lock:
            self.device.reset()
            self.status = state.status & ~C.STATUS_DEVICE_NEEDS_RESET
            self.broken = bool(state.status & C.STATUS_DEVICE_NEEDS_RESET)
            self.driver_features = state.driver_features
            self.device_features_sel, self.driver_features_sel = state.device_features_sel, state.driver_features_sel
            self.queue_sel, self.interrupt_status = state.queue_sel, state.interrupt_status
            self.config_generation = state.config_generation
            for q, qs in zip(self.queues, state.queues):
                q.restore(qs)
            self.device.restore(state.device)
            if self.status & C.STATUS_DRIVER_OK and not self.broken:
                for q in self.queues:
                    if q.ready:
                        q.check(self.memory)
                self.device.activate(self._context())

    def close(self) -> None:
        """Stop the device and release the eventfds."""
        self.device.reset()
        for index, fd in enumerate(self.notify_fds):
            if self._ioeventfds:
                try:
                    self._kvm_vm.ioeventfd(fd.fd, self._base + C.MMIO_QUEUE_NOTIFY, 4, datamatch=index, deassign=True)
                except Exception:  # the VM may already be gone; the fd goes either way
                    pass
            fd.close()


def _set_half(value: int, high: bool, half: int) -> int:
    if high:
        return (value & 0xFFFFFFFF) | (half << 32)
    return (value & ~0xFFFFFFFF) | half


def _readable(fd: EventFd) -> bool:
    """Whether *fd* is readable now, without reading it (a notify eventfd left undrained)."""
    if fd.fileno() < 0:
        return False
    poller = select.poll()
    poller.register(fd.fileno(), select.POLLIN)
    return bool(poller.poll(0))

