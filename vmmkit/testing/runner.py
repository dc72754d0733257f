"""Running `vmmkit run` from a test the way a user does: a TOML file and a subprocess."""

from __future__ import annotations

import subprocess
import sys
from typing import Optional

from .kvm_debugfs import emulation_livelock

VMMKIT = [sys.executable, "-m", "vmmkit"]


class GuestTimeout(subprocess.TimeoutExpired):
    """`vmmkit run` did not end in time; ``livelock`` says whether its vCPU was caught in KVM's emulator.

    The message carries that finding, so that the pytest plugin runs a
    module whose guest livelocked in the lab again, as it does a crash.
    """

    def __init__(self, cmd, timeout: float, output: bytes, stderr: bytes, livelock: Optional[str]) -> None:
        super().__init__(cmd, timeout, output, stderr)
        self.livelock = livelock

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} ({self.livelock})" if self.livelock else text


class VmmkitRunner:
    """Writes vm.toml into a directory and runs `vmmkit run` on it."""

    def __init__(self, directory):
        self.directory = directory

    def config(self, text: str) -> str:
        """Write *text* as vm.toml; return its path."""
        path = self.directory / "vm.toml"
        path.write_text(text)
        return str(path)

    def exec(self, toml: str, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`vmmkit run vm.toml --exec command` on the default guest (:func:`run_exec`)."""
        return run_exec(self.config(toml), command, timeout)


def run_exec(config: str, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`vmmkit run CONFIG --exec COMMAND`; stdout and stderr captured as bytes.

    Raises :class:`GuestTimeout` (a ``subprocess.TimeoutExpired``) when it
    has not ended after *timeout* seconds; the VMM is killed.
    """
    proc = subprocess.Popen(VMMKIT + ["run", config, "--exec", command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        livelock = emulation_livelock(proc.pid)
        proc.kill()
        out, err = proc.communicate()
        raise GuestTimeout(proc.args, timeout, out, err, livelock) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
