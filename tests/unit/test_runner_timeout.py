"""vmmkit.testing.runner: a `vmmkit run --exec` that does not end says whether its vCPU livelocked."""

import subprocess
import sys

import pytest

from vmmkit.testing import runner
from vmmkit.testing.kvm_debugfs import EMULATION_LIVELOCK
from vmmkit.testing.pytest_plugin import _lab_crash

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]  # takes the rest of argv and ignores it


@pytest.mark.parametrize("livelock", [f"{EMULATION_LIVELOCK}: in 1s ...", None])
def test_a_run_past_its_timeout_is_killed_and_says_why(tmp_path, monkeypatch, livelock):
    monkeypatch.setattr(runner, "VMMKIT", SLEEPER)
    looked = []
    monkeypatch.setattr(runner, "emulation_livelock", lambda pid: looked.append(pid) or livelock)
    with pytest.raises(subprocess.TimeoutExpired) as caught:  # what callers already catch
        runner.VmmkitRunner(tmp_path).exec("", "true", timeout=0.5)
    exc = caught.value
    assert isinstance(exc, runner.GuestTimeout) and looked
    assert exc.livelock == livelock
    assert _lab_crash(str(exc)) == (livelock is not None)


def test_a_run_that_ends_gives_its_output(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "VMMKIT", [sys.executable, "-c", "import sys; print('out'); sys.exit(3)"])
    proc = runner.VmmkitRunner(tmp_path).exec("[machine]\n", "true")
    assert (proc.returncode, proc.stdout) == (3, b"out\n")
    assert (tmp_path / "vm.toml").read_text() == "[machine]\n"
