"""The ``vsock`` device kind: virtio-vsock with Firecracker's hybrid Unix-socket backend.

    [[device]]
    kind = "vsock"
    guest_cid = 3                      # the guest's context ID (3 .. 2**32 - 2)
    uds_path = "/run/vm1/vsock.sock"   # host side: a Unix socket vmmkit creates (0600)
    engine = "loop"                    # a C serving loop carries busy connections (the default);
                                       # "native": C bursts between Python's events;
                                       # "python": the reference data path, for debugging

Host to guest: connect to ``uds_path``, write ``CONNECT <port>\\n``, read
``OK <host port>\\n``; the Unix stream is then joined to a guest connection
to ``<port>`` (closed at once if nothing listens there). Guest to host: a
guest connection to CID 2, port P is joined to a Unix connection to
``<uds_path>_<P>`` (refused when nobody listens there). This is Firecracker's
scheme, so its clients work unchanged.

``uds_path`` is created owner-only when the VM is built and removed when it
exits; a socket file left behind by a dead process is replaced, one a live
process still serves is an error. A guest has at most one vsock device.
"""

from __future__ import annotations

from typing import Literal

import attrs

from vmmkit.errors import VmmkitError
from vmmkit.hookspecs import hookimpl
from vmmkit.plugins import DeviceKind
from vmmkit.schema import Path, in_range, spec

from .packet import MAX_GUEST_CID, MIN_GUEST_CID

__all__ = ["VsockSpec", "VirtioVsock"]

#: sun_path holds 108 bytes with the terminating NUL (the host module checks the same).
MAX_UDS_PATH = 107


def __getattr__(name):
    if name == "VirtioVsock":
        from .device import VirtioVsock
        return VirtioVsock
    raise AttributeError(name)


def _uds_path(instance, attribute, value):
    if len(value.encode()) > MAX_UDS_PATH:
        raise ValueError(f"expected a Unix socket path of at most {MAX_UDS_PATH} bytes, "
                         f"found {len(value.encode())} bytes: {value!r}")


@spec
class VsockSpec:
    """One ``kind = "vsock"`` table."""

    guest_cid: int = attrs.field(validator=in_range(MIN_GUEST_CID, MAX_GUEST_CID))
    uds_path: Path = attrs.field(validator=_uds_path)
    engine: Literal["native", "python", "loop"] = "loop"


def create(vm, device_spec):
    """Bind ``uds_path`` and put a virtio-vsock device on the VM's virtio-MMIO bus."""
    from .device import VirtioVsock  # here, not at import: `vmmkit run` loads only what a VM uses
    opts = device_spec.options
    for other in vm.devices.values():
        if isinstance(other, VirtioVsock):
            raise VmmkitError(f"device {device_spec.id!r}: a VM has at most one vsock device "
                              f"({other.name!r} is one already)")
    device = VirtioVsock(device_spec.id, opts.guest_cid, opts.uds_path, engine=opts.engine)
    try:
        vm.add_virtio_device(device)
    except BaseException:
        device.close()
        raise
    return device


@hookimpl
def vmmkit_device_kinds():
    """Declare the ``vsock`` kind."""
    return [DeviceKind("vsock", VsockSpec, create, "virtio-vsock, host side on Unix sockets (Firecracker's scheme)")]
