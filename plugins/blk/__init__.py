"""The ``blk`` device kind: a virtio block device on a raw image.

    [[device]]
    kind = "blk"
    path = "disk.img"      # a raw image (or a block device)
    read_only = false
    serial = "data0"       # answered to VIRTIO_BLK_T_GET_ID (at most 20 bytes)
    cache = "writeback"    # or "none" (O_DIRECT)
    engine = "native"      # or "python": a debugging/reference switch, see below

Disks appear in the guest as /dev/vda, /dev/vdb, ... in the order of the
``[[device]]`` tables.

``engine`` selects the data path. ``"native"`` (the default) serves requests
in C with the GIL released, many in flight at once through io_uring (or a
small pool of I/O threads where the kernel refuses io_uring). ``"python"``
serves them one by one in Python: the reference implementation the C path
is tested against, for debugging a guest's requests or the device itself.
Both give the guest the same answers; only speed differs.
"""

from __future__ import annotations

from typing import Literal

import attrs

from vmmkit.hookspecs import hookimpl
from vmmkit.plugins import DeviceKind
from vmmkit.schema import Path, spec

#: GET_ID answers at most this many bytes (the device module says the same; it is imported
#: only when a VM has a disk, to keep `vmmkit run` start-up small).
ID_BYTES = 20


def _serial_fits(instance, attribute, value):
    if len(value.encode()) > ID_BYTES:
        raise ValueError(f"expected at most {ID_BYTES} bytes, found {len(value.encode())}: {value!r}")


@spec
class BlkSpec:
    """One ``kind = "blk"`` table."""

    path: Path = attrs.field(metadata={"must_exist": True})
    read_only: bool = False
    serial: str = attrs.field(default="", validator=_serial_fits)
    cache: Literal["writeback", "none"] = "writeback"
    engine: Literal["native", "python"] = "native"


def create(vm, device_spec):
    """Open the image and put a virtio-blk device on the VM's virtio-MMIO bus."""
    from .device import VirtioBlk
    from .disk import Disk
    opts = device_spec.options
    disk = Disk(opts.path, read_only=opts.read_only, cache=opts.cache)
    device = VirtioBlk(device_spec.id, disk, serial=opts.serial, engine=opts.engine)
    vm.add_virtio_device(device)
    return device


@hookimpl
def vmmkit_device_kinds():
    """Declare the ``blk`` kind."""
    return [DeviceKind("blk", BlkSpec, create, "virtio block device on a raw image")]
