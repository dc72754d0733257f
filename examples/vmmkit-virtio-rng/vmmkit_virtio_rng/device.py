"""The virtio entropy device (virtio 1.x, 5.4): one queue; the guest posts buffers, we fill them."""

import os

from vmmkit.virtio import DescriptorChain, VirtioDevice

VIRTIO_ID_RNG = 4


class VirtioRng(VirtioDevice):
    """Fills each device-writable buffer the guest posts with bytes from ``source``."""

    device_id = VIRTIO_ID_RNG
    queue_sizes = (64,)

    def __init__(self, name: str, source: str = "/dev/urandom", max_bytes: int = 4096):
        super().__init__(name)
        self.source = source
        self.max_bytes = max_bytes
        self._fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        self.bytes_served = 0

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        """Write random bytes into the request's writable buffers; return how many."""
        # The guest controls the buffer sizes: cap what one request can make us read.
        want = min(chain.writable_len, self.max_bytes)
        data = os.read(self._fd, want) if want else b""
        written = chain.write(self.ctx.memory, 0, data)
        self.bytes_served += written
        return written

    def close(self) -> None:
        """Stop serving and close the source."""
        self.reset()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
