"""QEMU's microvm as the peer: boots the default guest with a command, the way vmmkit does.

Used by tests (proof that the lab and the guest work) and by benchmarks (the
ratio vmmkit/QEMU on the same guest in the same run).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time

import attrs

from ..guest import build
from ..guest.execcmd import exec_param, exec_stream
from ..lab.run import drive_options, qemu_escape
from ..vm import BASE_CMDLINE, EXEC_CMDLINE
from .kvm_debugfs import emulation_livelock
from .pipes import read_until

@attrs.frozen
class ExecResult:
    """What a guest command gave back."""

    status: int | None      # the command's exit status (None: the guest never reported one)
    output: bytes           # the command's output, exactly
    console: bytes          # everything else the console carried (kernel messages), for diagnostics
    seconds: float          # wall time from VMM process start to its exit
    vmm_returncode: int
    timed_out: bool = False  # the guest was still running at the timeout, and was killed
    livelock: str | None = None  # at the timeout: its vCPU was caught in KVM's emulator (kvm_debugfs)


def qemu_binary() -> str:
    """qemu-system-x86_64's path (the bare name when it is not on PATH, so the error comes from exec)."""
    return shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"


def disk_aio(path: str, cache: str = "none") -> str:
    """The best ``aio=`` QEMU accepts here for a -drive on *path* with *cache*: io_uring, else threads."""
    modes = [(cache, "io_uring"), (cache, "threads")]
    return drive_options(qemu_binary(), path, modes=modes)[1]


def disk_args(path: str, *, cache: str = "none", aio: str | None = None, drive_id: str = "d0",
              read_only: bool = False) -> list[str]:
    """QEMU arguments for a raw image *path* as a virtio-blk disk on microvm's virtio-mmio bus.

    *aio* defaults to what `disk_aio` finds works here.
    """
    aio = aio or disk_aio(path, cache)
    drive = f"id={drive_id},file={qemu_escape(path)},format=raw,if=none,cache={cache},aio={aio}"
    if read_only:
        drive += ",readonly=on"
    return ["-drive", drive, "-device", f"virtio-blk-device,drive={drive_id}"]


def qemu_command(command: str, *, vcpus: int = 1, memory: str = "512M", kernel: str | None = None,
                 initrd: str | None = None, extra_cmdline: str = "", extra_args: list[str] = ()) -> list[str]:
    """The qemu-system-x86_64 command line for microvm with the default guest and *command*.

    The kernel gets exactly the arguments vmmkit gives it for --exec, so both
    VMMs boot the guest the same way. *extra_args* (devices such as
    `disk_args`) go at the end.
    """
    files = build.show()
    qemu = qemu_binary()
    cmdline = " ".join(p for p in (BASE_CMDLINE, EXEC_CMDLINE, extra_cmdline, exec_param(command)) if p)
    return [qemu, "-M", "microvm,acpi=on", "-enable-kvm", "-cpu", "host", "-smp", str(vcpus), "-m", memory,
            "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-kernel", kernel or files.kernel, "-initrd", initrd or files.initrd,
            "-append", cmdline, *extra_args]


def run_qemu_exec(command: str, *, timeout: float = 300, tee=None, **kw) -> ExecResult:
    """Boot the default guest under QEMU microvm with KVM, run *command*, return its result.

    *tee*, when given, also gets the command's output as it arrives (its
    ``write``); its ``pid`` attribute is set to QEMU's process id first.
    """
    args = qemu_command(command, **kw)
    out = io.BytesIO()
    stream = exec_stream(out if tee is None else _Tee(out, tee))
    started = time.monotonic()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if tee is not None:
        tee.pid = proc.pid
    try:
        deadline = started + timeout
        timed_out, livelock = False, None
        if not read_until(proc.stdout, deadline, stream.feed):
            timed_out = True
            livelock = emulation_livelock(proc.pid)
            proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stream.close()
    return ExecResult(stream.status, out.getvalue(), bytes(stream.log), time.monotonic() - started, proc.returncode,
                      timed_out, livelock)


class _Tee:
    """Writes to two sinks."""

    def __init__(self, first, second) -> None:
        self.first, self.second = first, second

    def write(self, data: bytes) -> int:
        self.first.write(data)
        self.second.write(data)
        return len(data)

    def flush(self) -> None:
        for sink in (self.first, self.second):
            if hasattr(sink, "flush"):
                sink.flush()
