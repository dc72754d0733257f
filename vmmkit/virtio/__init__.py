"""The virtio device framework: split virtqueues, the virtio-MMIO transport, and the device interface."""

from .device import DeviceContext, VirtioDevice
from .mmio import TransportState, VirtioMmioTransport
from .queue import DescriptorChain, QueueError, QueueState, Virtqueue

__all__ = ["DeviceContext", "DescriptorChain", "QueueError", "QueueState", "TransportState", "VirtioDevice",
           "VirtioMmioTransport", "Virtqueue"]
