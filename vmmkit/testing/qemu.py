"""QEMU's microvm as the peer: boots the default guest with a command, the way vmmkit does.

Used by tests (proof that the lab and the guest work) and by benchmarks (the
ratio vmmkit/QEMU on the same guest in the same run).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time

import attrs

from ..guest import build
from ..guest.execcmd import exec_param, exec_stream
from ..vm import BASE_CMDLINE, EXEC_CMDLINE



@attrs.frozen
class ExecResult:
    """What a guest command gave back."""

    status: int | None      # the command's exit status (None: the guest never reported one)
    output: bytes           # the command's output, exactly
    console: bytes          # everything else the console carried (kernel messages), for diagnostics
    seconds: float          # wall time from VMM process start to its exit
    vmm_returncode: int


def qemu_command(command: str, *, vcpus: int = 1, memory: str = "512M", kernel: str | None = None,
                 initrd: str | None = None, extra_cmdline: str = "") -> list[str]:
    """The qemu-system-x86_64 command line for microvm with the default guest and *command*.

    The kernel gets exactly the arguments vmmkit gives it for --exec, so both
    VMMs boot the guest the same way.
    """
    files = build.show()
    qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    cmdline = " ".join(p for p in (BASE_CMDLINE, EXEC_CMDLINE, extra_cmdline, exec_param(command)) if p)
    return [qemu, "-M", "microvm,acpi=on", "-enable-kvm", "-cpu", "host", "-smp", str(vcpus), "-m", memory,
            "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-kernel", kernel or files.kernel, "-initrd", initrd or files.initrd,
            "-append", cmdline]


def run_qemu_exec(command: str, *, timeout: float = 300, **kw) -> ExecResult:
    """Boot the default guest under QEMU microvm with KVM, run *command*, return its result."""
    args = qemu_command(command, **kw)
    out = io.BytesIO()
    stream = exec_stream(out)
    started = time.monotonic()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = started + timeout
        while True:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            stream.feed(chunk)
            if time.monotonic() > deadline:
                proc.kill()
                break
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stream.close()
    return ExecResult(stream.status, out.getvalue(), bytes(stream.log), time.monotonic() - started, proc.returncode)
