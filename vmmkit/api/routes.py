"""The core control-API routes (docs/api.yaml is their contract).

``GET /vm`` describes the VM, ``GET /vm/inspect`` a paused VM's vCPUs and
virtqueues; ``PUT /vm/pause``, ``/vm/resume``,
``/vm/shutdown`` (the ACPI power button) and ``/vm/stop`` (at once) change
its state. Handlers take ``(vm, request)``; the VM is anything with the
:class:`vmmkit.vm.Vm` lifecycle surface (``state``, ``spec``,
``device_info()``, ``pause()``, ``resume()``, ``press_power_button()``,
``stop()``, ``shutdown_requested_at``), which lets tests use a fake.
"""

from __future__ import annotations

import enum
import os

import attrs

from ..errors import VmmkitError
from ..vm import VmStateError
from .http import Request
from .server import ApiError, Route

#: The API's version, reported by GET /vm (and docs/api.yaml info.version).
API_VERSION = "1.0.0"


def _serialize(_inst, _field, value):
    """attrs.asdict value serializer: whatever JSON cannot hold becomes a string."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return str(value)


def config_json(spec) -> dict:
    """A VmSpec as JSON: every section, device and feature table, as loaded (paths absolute)."""
    return _jsonable(attrs.asdict(spec, value_serializer=_serialize))


def vm_info(vm) -> dict:
    """The body of GET /vm."""
    spec = vm.spec
    return {
        "state": vm.state,
        "vcpus": spec.machine.vcpus,
        "memory": spec.machine.memory,
        "devices": vm.device_info(),
        "config": config_json(spec),
        "shutdown_requested_at": vm.shutdown_requested_at,
        "pid": os.getpid(),
        "api_version": API_VERSION,
    }


def _no_body(request: Request) -> None:
    """The action routes take no body: empty, or the empty JSON object ``{}``."""
    if not request.body:
        return
    body = request.json()
    if not isinstance(body, dict) or body:
        raise ApiError(400, f"{request.method} {request.path} takes no request body (send none, or {{}})")


def _lifecycle(call, vm) -> None:
    try:
        call()
    except VmStateError as exc:
        raise ApiError(409, str(exc)) from None  # the VM's state does not allow it
    except VmmkitError as exc:
        raise ApiError(500, str(exc)) from None  # a vCPU or device did not stop: the VM was left running


def get_vm(vm, request: Request):
    _no_body(request)
    return vm_info(vm)


def get_inspect(vm, request: Request):
    _no_body(request)
    try:
        return vm.inspect()
    except VmStateError as exc:
        raise ApiError(409, str(exc)) from None


def put_pause(vm, request: Request):
    _no_body(request)
    _lifecycle(vm.pause, vm)
    return {"state": vm.state}


def put_resume(vm, request: Request):
    _no_body(request)
    _lifecycle(vm.resume, vm)
    return {"state": vm.state}


def put_shutdown(vm, request: Request):
    _no_body(request)
    _lifecycle(vm.press_power_button, vm)
    return 202, {"state": vm.state}


def put_stop(vm, request: Request):
    _no_body(request)
    vm.stop()
    return 202, {"state": vm.state}


CORE_ROUTES = (
    Route("GET", "/vm", get_vm, "the VM's state, configuration and devices"),
    Route("GET", "/vm/inspect", get_inspect, "a paused VM's vCPUs and virtqueues, for debugging a hung guest"),
    Route("PUT", "/vm/pause", put_pause, "stop every vCPU and device worker"),
    Route("PUT", "/vm/resume", put_resume, "continue a paused VM"),
    Route("PUT", "/vm/shutdown", put_shutdown, "press the ACPI power button (graceful)"),
    Route("PUT", "/vm/stop", put_stop, "stop the VM at once"),
)
