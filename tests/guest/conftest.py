"""Helpers for guest tests: run `vmmkit run` as a user does, on a TOML file written by the test."""

import subprocess
import sys

import pytest

VMMKIT = [sys.executable, "-m", "vmmkit"]


class VmmkitRunner:
    """Writes vm.toml into the test's directory and runs `vmmkit run` on it."""

    def __init__(self, directory):
        self.directory = directory

    def config(self, text: str) -> str:
        path = self.directory / "vm.toml"
        path.write_text(text)
        return str(path)

    def exec(self, toml: str, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`vmmkit run vm.toml --exec command`, output captured."""
        return subprocess.run(VMMKIT + ["run", self.config(toml), "--exec", command], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout)


@pytest.fixture
def vmmkit(tmp_path):
    """A VmmkitRunner working in the test's temporary directory."""
    return VmmkitRunner(tmp_path)
