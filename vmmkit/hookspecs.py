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
    """Every vCPU and device worker has stopped touching guest memory."""


@hookspec
def vmmkit_vm_resumed(vm):
    """The VM runs again after a pause."""


@hookspec
def vmmkit_vm_stopping(vm, reason):
    """The VM is about to stop (``reason``: "poweroff", "reboot", "error", "signal"); release host resources."""


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
    """Contribute control-API routes: return a list of ``(method, path, handler)``."""


@hookspec
def vmmkit_save_state(vm):
    """Return this plugin's state for a snapshot as ``{key: attrs instance}`` (or None)."""


@hookspec
def vmmkit_restore_state(vm, state):
    """Restore what vmmkit_save_state returned, into a freshly built VM."""
