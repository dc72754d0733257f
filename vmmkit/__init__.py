"""vmmkit: a KVM virtual machine monitor in Python, built as a small core plus plugins.

The parts for assembling a VMM in Python (see examples/custom_vmm.py)::

    from vmmkit import Plugins, Vm, VmSpec

    plugins = Plugins()
    spec = VmSpec.build(machine={"vcpus": 1, "memory": "512M"},
                        devices=[{"kind": "blk", "path": "disk.img"}],
                        device_kinds=plugins.device_schemas())
    with Vm(spec, plugins=plugins) as vm:
        status = vm.run()

They are imported on first use, so that ``import vmmkit`` stays cheap.
"""

__version__ = "0.1.0"

_LAZY = {
    "Vm": ("vmmkit.vm", "Vm"),
    "VmSpec": ("vmmkit.config", "VmSpec"),
    "load_config": ("vmmkit.config", "load_config"),
    "Plugins": ("vmmkit.plugins", "Plugins"),
    "DeviceKind": ("vmmkit.plugins", "DeviceKind"),
    "Feature": ("vmmkit.plugins", "Feature"),
    "hookimpl": ("vmmkit.hookspecs", "hookimpl"),
    "VmmkitError": ("vmmkit.errors", "VmmkitError"),
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'vmmkit' has no attribute {name!r}")
    import importlib
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
