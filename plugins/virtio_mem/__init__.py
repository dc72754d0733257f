"""The ``virtio-mem`` device kind: guest memory that grows and shrinks while the guest runs.

    [[device]]
    kind = "virtio-mem"
    region = "2G"         # hotplug region: a multiple of 128 MiB, reserved above RAM
    requested = "0"       # what the guest should plug at boot: a multiple of block_size
    block_size = "2M"     # the plug/unplug granule: a power of two from 4K to 128M

The region is guest address space above RAM and 4 GiB, aligned to Linux's
128 MiB memory blocks, mapped as one KVM memory slot (never in the e820 map,
so the guest only uses what its virtio_mem driver plugs). Resize at runtime
with ``PUT /vm/virtio-mem/resize`` or ``vmmkit ctl resize-memory 1G``; unplugged
blocks go back to the host. The kernel is told to online hot-added memory
by itself (``memhp_default_state=online_movable``, movable so that it can be
unplugged again). See docs/virtio_mem.md.
"""

from __future__ import annotations

import attrs

from vmmkit.hookspecs import hookimpl
from vmmkit.memory import HOTPLUG_ALIGN
from vmmkit.plugins import DeviceKind
from vmmkit.schema import MiB, Size, format_size, parse_size, size_multiple_of, spec

from .api import ROUTES, add_ctl_commands
from .device import LINUX_MEMORY_BLOCK, ResizeError, VirtioMem, VirtioMemState

__all__ = ["VirtioMemSpec", "VirtioMem", "VirtioMemState", "ResizeError", "KERNEL_ARGS"]

#: What the stock kernel needs to use plugged memory without a udev rule: online
#: hot-added memory blocks at once, in ZONE_MOVABLE so that they can be offlined
#: and unplugged again.
KERNEL_ARGS = ("memhp_default_state=online_movable",)


def size_or_zero(value) -> int:
    """A size that may also be zero (``0`` or ``"0"``): the requested size at boot."""
    if type(value) is int and value == 0 or isinstance(value, str) and value.strip() == "0":
        return 0
    return parse_size(value)


def _block_size(instance, attribute, value):
    if value & (value - 1) or not 4096 <= value <= LINUX_MEMORY_BLOCK:
        raise ValueError(f"expected a power of two from 4K to 128M, found {format_size(value)}")


def _requested(instance, attribute, value):
    if value % instance.block_size:
        raise ValueError(f"expected a multiple of block_size ({format_size(instance.block_size)}), "
                         f"found {format_size(value)}")
    if value > instance.region:
        raise ValueError(f"expected at most the region ({format_size(instance.region)}), "
                         f"found {format_size(value)}")


@spec
class VirtioMemSpec:
    """One ``kind = "virtio-mem"`` table."""

    region: Size = attrs.field(validator=size_multiple_of(HOTPLUG_ALIGN))
    block_size: Size = attrs.field(default=2 * MiB, validator=_block_size)
    requested: int = attrs.field(default=0, converter=size_or_zero, validator=_requested)


def create(vm, device_spec):
    """Reserve and map the hotplug region, register it with KVM, attach the device."""
    opts = device_spec.options
    memory = vm.memory
    base = memory.reserve_hotplug(opts.region, HOTPLUG_ALIGN)
    region = memory.add_region(base, opts.region)
    try:
        memory.register_region(vm.kvm_vm, region)
    except BaseException:
        memory.remove_region(base)
        raise
    device = VirtioMem(device_spec.id, addr=base, region_size=opts.region, block_size=opts.block_size,
                       requested_size=opts.requested)
    vm.add_virtio_device(device)
    for arg in KERNEL_ARGS:
        if arg not in vm.kernel_args:
            vm.kernel_args.append(arg)
    return device


@hookimpl
def vmmkit_device_kinds():
    """Declare the ``virtio-mem`` kind."""
    return [DeviceKind("virtio-mem", VirtioMemSpec, create,
                       "virtio-mem: guest memory plugged and unplugged at run time in blocks")]


@hookimpl
def vmmkit_api_routes():
    """``GET /vm/virtio-mem`` (sizes) and ``PUT /vm/virtio-mem/resize`` (the requested size)."""
    return list(ROUTES)


@hookimpl
def vmmkit_ctl_commands(subparsers):
    """``vmmkit ctl resize-memory SIZE`` and ``vmmkit ctl memory``."""
    add_ctl_commands(subparsers)
