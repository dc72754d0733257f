"""The control API: HTTP/1.1 + JSON on a Unix socket (contract: docs/api.yaml).

``vmmkit run --api-sock PATH`` (or ``[api] socket`` in the TOML) serves it;
``vmmkit ctl --api-sock PATH ...`` is its command-line client. From Python::

    from vmmkit.api import open_api
    vm = Vm(spec, plugins=plugins)
    with open_api("/run/vm.sock", vm, plugins):
        vm.run()

Plugins add routes with the ``vmmkit_api_routes`` hook (see
:mod:`vmmkit.hookspecs`).
"""

from __future__ import annotations

from .http import Request
from .server import ApiError, ApiServer, ApiSocketError, Route, collect_routes
from .routes import API_VERSION, CORE_ROUTES

__all__ = ["ApiError", "ApiServer", "ApiSocketError", "Request", "Route", "API_VERSION", "CORE_ROUTES",
           "make_server", "open_api"]


def make_server(path: str, plugins=None, **limits) -> ApiServer:
    """An :class:`ApiServer` on *path* with the core routes and every plugin's (not serving yet).

    Raises :class:`ApiSocketError` when the socket cannot be created, and
    :class:`vmmkit.plugins.PluginError` when plugin routes are malformed or clash.
    """
    results = plugins.call("vmmkit_api_routes") if plugins is not None else []
    try:
        routes = collect_routes(CORE_ROUTES, results)
        seen = set()
        for route in routes:
            key = (route.method, route.path)
            if key in seen:
                raise ValueError(f"API route {route.method} {route.path} is defined twice")
            seen.add(key)
    except (TypeError, ValueError) as exc:
        from ..plugins import PluginError
        raise PluginError(f"a plugin's API routes: {exc}") from None
    return ApiServer(path, routes, **limits)


def open_api(path: str, vm, plugins=None, **limits) -> ApiServer:
    """Create the server for *vm* and start serving it; close it (a context manager) when the VM is done."""
    return make_server(path, plugins if plugins is not None else getattr(vm, "plugins", None), **limits).start(vm)
