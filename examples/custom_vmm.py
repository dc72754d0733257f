#!/usr/bin/env python3
"""A VMM assembled in Python, without a TOML file.

It builds the same VmSpec a TOML file would give (same checks, same error
messages), adds an inline plugin that needs no entry point, attaches a
scratch disk, runs one command in the default guest and reads what the guest
wrote to the disk from the host side.

    python examples/custom_vmm.py          # through `vmmkit lab --` on hosts without hardware KVM
"""

import io
import os
import sys
import tempfile
import time

from vmmkit import Plugins, Vm, VmSpec, hookimpl


class Stopwatch:
    """An inline plugin: any object with @hookimpl methods, registered with Plugins(extra=...)."""

    @hookimpl
    def vmmkit_vm_started(self, vm):
        self.started = time.monotonic()

    @hookimpl
    def vmmkit_vm_stopping(self, vm, reason):
        print(f"custom_vmm: the guest ran {time.monotonic() - self.started:.1f}s and stopped ({reason})",
              file=sys.stderr)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        disk = os.path.join(tmp, "scratch.img")
        with open(disk, "wb") as f:
            f.truncate(16 << 20)
        plugins = Plugins(extra=[("stopwatch", Stopwatch())])
        spec = VmSpec.build(
            machine={"vcpus": 1, "memory": "256M"},
            devices=[{"kind": "blk", "path": disk, "serial": "scratch"}],
            device_kinds=plugins.device_schemas(),
        )
        console = io.BytesIO()  # with exec_command, only the command's own output lands here
        with Vm(spec, plugins=plugins, exec_command="cat /sys/block/vda/serial; "
                "echo 'hello from the guest' | dd of=/dev/vda conv=sync 2>/dev/null", console=console) as vm:
            status = vm.run()
        print(f"custom_vmm: the command exited {status}; the guest said: {console.getvalue().decode().strip()}")
        with open(disk, "rb") as f:
            print(f"custom_vmm: the disk starts with: {f.read(20).decode(errors='replace')!r}")
        return status


if __name__ == "__main__":
    sys.exit(main())
