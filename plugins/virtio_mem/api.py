"""The control-API routes and ``vmmkit ctl`` commands of the virtio-mem plugin.

``GET /vm/virtio-mem`` answers ``{"devices": [sizes, ...]}``;
``PUT /vm/virtio-mem/resize`` with ``{"size": "1G"}`` (bytes as a number, or a
string with a K/M/G/T unit; ``"id"`` picks the device when a VM has several)
sets the requested size and answers the device's sizes, ``plugged_size``
being what the guest has plugged so far: the guest plugs in the background.
"""

from __future__ import annotations

import time

from vmmkit.api import ApiError
from vmmkit.schema import format_size, parse_size

from .device import ResizeError, VirtioMem


def _devices(vm) -> list:
    return [d for d in getattr(vm, "devices", {}).values() if isinstance(d, VirtioMem)]


def _parse(value) -> int:
    """A size from a request body: bytes (a number) or a string like "512M"; "0" is fine."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ApiError(400, f"\"size\" must be a number of bytes or a string such as \"512M\", "
                            f"found {value!r}")
    if isinstance(value, int) or value.strip().lstrip("-").isdigit():
        number = int(value)
        if number < 0:
            raise ApiError(400, f"the requested size cannot be negative (found {value!r})")
        return number
    if value.strip().startswith("-"):
        raise ApiError(400, f"the requested size cannot be negative (found {value!r})")
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ApiError(400, f"\"size\": {exc}") from None


def get_status(vm, request):
    """Every virtio-mem device's sizes."""
    return {"devices": [d.status() for d in _devices(vm)]}


def put_resize(vm, request):
    """Set the requested size of a virtio-mem device."""
    body = request.json()
    if not isinstance(body, dict) or "size" not in body:
        raise ApiError(400, "send a JSON object with \"size\" (e.g. {\"size\": \"1G\"}) "
                            "and, when the VM has several virtio-mem devices, \"id\"")
    unknown = sorted(set(body) - {"size", "id"})
    if unknown:
        raise ApiError(400, f"unknown key(s) {', '.join(unknown)}: expected \"size\" and optionally \"id\"")
    devices = _devices(vm)
    if not devices:
        raise ApiError(404, "this VM has no virtio-mem device (add a [[device]] kind = \"virtio-mem\" table)")
    dev_id = body.get("id")
    if dev_id is None:
        if len(devices) > 1:
            raise ApiError(400, f"this VM has {len(devices)} virtio-mem devices: say which with \"id\" "
                                f"({', '.join(d.name for d in devices)})")
        device = devices[0]
    else:
        matches = [d for d in devices if d.name == dev_id]
        if not matches:
            raise ApiError(404, f"no virtio-mem device {dev_id!r} (there is {', '.join(d.name for d in devices)})")
        device = matches[0]
    size = _parse(body["size"])
    try:
        device.resize(size)
    except ResizeError as exc:
        raise ApiError(400, str(exc)) from None
    return device.status()


ROUTES = (
    ("GET", "/vm/virtio-mem", get_status),
    ("PUT", "/vm/virtio-mem/resize", put_resize),
)


def _fmt(size: int) -> str:
    return format_size(size) if size else "0"


def _describe(status: dict) -> str:
    return (f"{status['id']}: requested {_fmt(status['requested_size'])}, the guest has plugged "
            f"{_fmt(status['plugged_size'])} so far (region {_fmt(status['region_size'])})")


def _ctl_resize(client, args) -> int:
    import json
    body = {"size": args.size}
    if args.id:
        body["id"] = args.id
    status = client.call("PUT", "/vm/virtio-mem/resize", body)
    done = True
    if args.wait:
        deadline = time.monotonic() + args.wait
        while status["plugged_size"] != status["requested_size"] and time.monotonic() < deadline:
            time.sleep(0.05)
            status = next(s for s in client.call("GET", "/vm/virtio-mem")["devices"] if s["id"] == status["id"])
        done = status["plugged_size"] == status["requested_size"]
    print(json.dumps(status, indent=2) if args.json else _describe(status))
    if not done:
        print(f"vmmkit: the guest did not reach {_fmt(status['requested_size'])} within {args.wait:g} s")
        return 1
    return 0


def _ctl_status(client, args) -> int:
    import json
    answer = client.call("GET", "/vm/virtio-mem")
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        for status in answer["devices"]:
            print(_describe(status))
        if not answer["devices"]:
            print("this VM has no virtio-mem device")
    return 0


def _common(p) -> None:
    # As on the core's commands: the ctl options may also follow the command name.
    import argparse
    p.add_argument("--api-sock", metavar="PATH", default=argparse.SUPPRESS,
                   help="the socket given to vmmkit run --api-sock")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON answer")
    p.add_argument("--timeout", type=float, metavar="SECONDS", default=argparse.SUPPRESS,
                   help="give up on an answer after this long (default 30)")


def add_ctl_commands(subparsers) -> None:
    """``resize-memory SIZE [--id ID] [--wait SECONDS]`` and ``memory``."""
    help_text = "set how much hotplug memory (virtio-mem) the guest should have plugged"
    p = subparsers.add_parser("resize-memory", help=help_text, description=help_text +
                              "; prints what the guest has plugged so far")
    p.add_argument("size", help="e.g. 1G, 512M, 0 (a multiple of the device's block size)")
    p.add_argument("--id", help="the virtio-mem device, when the VM has several")
    p.add_argument("--wait", type=float, metavar="SECONDS", default=0.0,
                   help="wait until the guest has plugged (or unplugged) that much; exit 1 if it did not")
    _common(p)
    p.set_defaults(ctl_func=_ctl_resize)
    help_text = "what each virtio-mem device has plugged"
    s = subparsers.add_parser("memory", help=help_text, description=help_text)
    _common(s)
    s.set_defaults(ctl_func=_ctl_status)
