"""vmmkit-virtio-rng: the ``virtio-rng`` device kind, written only against vmmkit's public API.

    [[device]]
    kind = "virtio-rng"
    source = "/dev/urandom"     # any readable file or character device
    max_bytes = 4096            # per request, at most (a guest asks for 32..4096 at a time)

The guest sees it as /dev/hwrng (driver virtio_rng).
"""

import attrs

from vmmkit.hookspecs import hookimpl
from vmmkit.plugins import DeviceKind
from vmmkit.schema import Path, in_range, spec

from .device import VirtioRng

__all__ = ["RngSpec", "VirtioRng"]


@spec
class RngSpec:
    """One ``kind = "virtio-rng"`` table."""

    source: Path = attrs.field(default="/dev/urandom", metadata={"must_exist": True})
    max_bytes: int = attrs.field(default=4096, validator=in_range(1, 1 << 20))


def create(vm, device_spec):
    """Make the device and put it on the VM's virtio-MMIO bus."""
    opts = device_spec.options
    device = VirtioRng(device_spec.id, source=opts.source, max_bytes=opts.max_bytes)
    vm.add_virtio_device(device)
    return device


@hookimpl
def vmmkit_device_kinds():
    """Declare the ``virtio-rng`` kind."""
    return [DeviceKind("virtio-rng", RngSpec, create, "virtio entropy source (/dev/hwrng in the guest)")]
