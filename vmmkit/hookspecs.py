"""The hooks a vmmkit plugin may implement.

A plugin is a module (or object) with functions decorated ``@vmmkit.hookimpl``
and named after these specs, registered in the ``vmmkit`` entry-point group::

    [project.entry-points.vmmkit]
    myplugin = "my_package.plugin"

Hooks receive keyword arguments; implement only the ones you need and take
only the arguments you use (pluggy passes what you name).
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("vmmkit")
hookimpl = pluggy.HookimplMarker("vmmkit")


@hookspec
def vmmkit_device_kinds():
    """Declare device kinds: return a list of :class:`vmmkit.plugins.DeviceKind`.

    Each names the ``kind`` used in a ``[[device]]`` table, the attrs class that
    validates the table's other keys (see :mod:`vmmkit.schema`), and a factory
    ``create(vm, spec)`` that returns the device.
    """


@hookspec
def vmmkit_features():
    """Declare feature tables: return a list of :class:`vmmkit.plugins.Feature`.

    A feature is a top-level TOML table (``[seccomp]``) validated by its attrs
    class; the plugin reads it from ``vm.spec.features[name]`` in the lifecycle hooks.
    """


@hookspec
def vmmkit_vm_setup_platform(vm):
    """Attach platform (non-virtio) devices: serial port, i8042, RTC, ACPI power registers.

    Called once while the VM is built, after guest memory and the in-kernel
    irqchip exist and before the vCPUs are created. Use ``vm.add_pio_device``,
    ``vm.add_mmio_device``, ``vm.irq_line(gsi)`` and ``vm.spec``.
    """


@hookspec
def vmmkit_vm_built(vm):
    """The VM is fully built (devices attached, kernel loaded), vCPUs not yet running."""


@hookspec
def vmmkit_vm_started(vm):
    """The vCPU threads are running."""


@hookspec
def vmmkit_vm_paused(vm):
    """Every vCPU and virtio device worker has stopped touching guest memory (``vm.pause()``).

    Called in the thread that paused the VM (an API thread for
    ``PUT /vm/pause``). A plugin with workers of its own that are not virtio
    devices (input forwarding, a host-side proxy) stops them here, before
    this returns, and restarts them in :func:`vmmkit_vm_resumed`.
    """


@hookspec
def vmmkit_vm_resumed(vm):
    """The VM runs again after a pause (devices resumed, vCPUs released)."""


@hookspec
def vmmkit_vm_stopping(vm, reason):
    """The VM is about to stop; release host resources.

    ``reason``: "poweroff", "reboot", "error", "signal", "exec-done" (the
    ``--exec`` command reported its status) or "stop" (``PUT /vm/stop``).
    """


@hookspec
def vmmkit_thread_start(role, name):
    """A vmmkit thread begins: ``role`` is "vcpu", "device", "api" or "main"; ``name`` is unique.

    Runs inside the new thread before its work; the seccomp plugin installs
    its filter here. Raising stops the thread from running.
    """


@hookspec
def vmmkit_cli_commands(subparsers):
    """Add CLI subcommands: call ``subparsers.add_parser(...)`` and ``set_defaults(func=...)``."""


@hookspec
def vmmkit_api_routes():
    """Contribute control-API routes: return a list of ``(method, path, handler)``.

    ``method`` is an upper-case HTTP method (``"GET"``, ``"PUT"``), ``path`` an
    exact path (no patterns; use a query string for arguments), conventionally
    under ``/vm/<plugin>/``. A path and method that another plugin or the core
    already serves stops vmmkit before the VM boots.

    ``handler(vm, request)`` runs in an API thread (role ``api``), one per
    client connection, concurrently with the vCPUs, the devices and other
    requests: guard what it shares. ``vm`` is the running
    :class:`vmmkit.vm.Vm`; ``request`` is a :class:`vmmkit.api.Request` with
    ``method``, ``path``, ``query`` (``{name: [values]}``), ``headers``
    (lower-case names), ``body`` (bytes, at most 64 KiB) and ``json()``
    (the parsed body or None; malformed JSON answers 400 by itself).

    Return a JSON-serializable value (sent with status 200) or a
    ``(status, value)`` pair. Raise :class:`vmmkit.api.ApiError(status,
    message)` for an error; the client gets ``{"error": message}``. Any other
    exception is a bug: the answer is 500 and it is logged. Keep handlers
    short (the client waits; the VM never does) and never let one wait for
    a vCPU that may be paused.

    Document the routes for your users the way ``docs/api.yaml`` documents
    the core's, and add ``vmmkit ctl`` commands for them with
    :func:`vmmkit_ctl_commands`; ``vmmkit ctl call METHOD PATH [JSON]``
    reaches any route without one.
    """


@hookspec
def vmmkit_ctl_commands(subparsers):
    """Add ``vmmkit ctl`` subcommands for this plugin's API routes.

    Call ``subparsers.add_parser(name, help=...)`` and
    ``set_defaults(ctl_func=func)``; vmmkit calls ``func(client, args)``
    where ``client`` is a :class:`vmmkit.api.client.ApiClient` on the
    ``--api-sock`` socket (``client.call(method, path, body)`` returns the
    parsed JSON or raises with the API's error message) and ``args.json``
    says whether ``--json`` was given. Return the exit status (0 for success).
    """


@hookspec
def vmmkit_save_state(vm):
    """Return this plugin's state for a snapshot as ``{key: attrs instance}`` (or None)."""


@hookspec
def vmmkit_restore_state(vm, state):
    """Restore what vmmkit_save_state returned, into a freshly built VM."""
