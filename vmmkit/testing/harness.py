"""A virtio device on a test bench: fake guest memory, the virtio-MMIO transport and a guest-side driver.

For plugin authors' unit tests (and vmmkit's own)::

    def test_fills_buffers(virtio_harness):
        bench = virtio_harness(MyDevice("dev0"))
        written, (data,) = bench.request([], [64])
        assert written == 64

The device runs exactly as in a VM (its own worker thread, woken by the
queue's eventfd) but the "guest" is :mod:`vmmkit.testing.virtio_driver`
writing rings into a :class:`~vmmkit.memory.GuestMemory`, so a test can also
hand the device hostile rings through ``bench.queues[i]`` (``write_desc``,
``publish``, ``set_avail_idx``) and check it answers with NEEDS_RESET.
"""

from __future__ import annotations

import time

from ..kvm.vm import EventFd
from ..memory import GuestMemory
from ..virtio.constants import STATUS_DEVICE_NEEDS_RESET
from ..virtio.mmio import VirtioMmioTransport
from .virtio_driver import GuestAllocator, MmioDriver

DRIVER_AREA = 0x10000  # rings and buffers are allocated from here up


class VirtioHarness:
    """One device behind a transport, initialised by a Linux-like driver."""

    def __init__(self, device, *, memory_size: int = 16 << 20, event_idx: bool = False, indirect: bool = False,
                 accept: int | None = None, queue_size: int | None = None, irqfd: bool = False):
        self.device = device
        self.memory = GuestMemory.create(memory_size)
        self.interrupts = 0
        # irqfd: the interrupt is an eventfd, as in a VM, so a device that serves in C
        # (DeviceContext.native_interrupt) raises it there; those are not counted.
        self._irqfd = EventFd() if irqfd else None
        self.transport = VirtioMmioTransport(device, self.memory, self._irq,
                                             irq_fd=self._irqfd.fd if irqfd else None)
        self.alloc = GuestAllocator(DRIVER_AREA, memory_size)
        self.driver = MmioDriver(self.transport, self.memory, self.alloc)
        self.queues = self.driver.init(accept=accept, queues=len(device.queue_sizes), queue_size=queue_size,
                                       event_idx=event_idx, indirect=indirect)

    def _irq(self) -> None:
        self.interrupts += 1
        if self._irqfd is not None:
            self._irqfd.signal()

    def request(self, out_bufs, in_lens, *, queue: int = 0, indirect: bool = False, timeout: float = 10.0):
        """Post one chain, kick, wait for the device to return it: ``(written, [writable buffers' bytes])``."""
        q = self.queues[queue]
        head = q.add_chain(list(out_bufs), list(in_lens), indirect=indirect)
        self.driver.notify(queue)
        for used_head, written in self.wait_used(queue, 1, timeout=timeout):
            if used_head == head:
                return written, q.in_buffers(head)
        raise AssertionError(f"the device returned another chain than head {head}")

    def wait_used(self, queue: int, count: int, *, timeout: float = 10.0) -> list:
        """Wait until the device has returned *count* chains on *queue*; return their (head, written)."""
        got: list = []
        deadline = time.monotonic() + timeout  # a hang guard, not a performance check
        while len(got) < count:
            got += self.queues[queue].get_used()
            if len(got) >= count:
                break
            if self.needs_reset:
                raise AssertionError("the device asked for a reset (DEVICE_NEEDS_RESET) instead of answering")
            if time.monotonic() > deadline:
                raise AssertionError(f"the device returned {len(got)} of {count} chains within {timeout}s")
            time.sleep(0.001)
        return got

    @property
    def needs_reset(self) -> bool:
        """Whether the device set DEVICE_NEEDS_RESET (what it must do for a broken ring)."""
        return bool(self.driver.status() & STATUS_DEVICE_NEEDS_RESET)

    def config(self, offset: int, size: int) -> bytes:
        """Read the device's config space as the driver does."""
        return self.driver.config_read(offset, size)

    def close(self) -> None:
        """Stop the device's worker and free the memory."""
        self.transport.close()
        close = getattr(self.device, "close", None)
        if close is not None:
            close()
        self.memory.close()
        if self._irqfd is not None:
            self._irqfd.close()

    def __enter__(self) -> "VirtioHarness":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
