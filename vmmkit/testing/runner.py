"""Running `vmmkit run` from a test the way a user does: a TOML file and a subprocess."""

from __future__ import annotations

import subprocess
import sys

VMMKIT = [sys.executable, "-m", "vmmkit"]


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
        """`vmmkit run vm.toml --exec command` on the default guest; stdout and stderr captured as bytes."""
        return subprocess.run(VMMKIT + ["run", self.config(toml), "--exec", command], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout)
