"""vmmkit.testing.qemu.run_qemu_exec keeps its timeout when the guest hangs without a word."""

import sys
import time

from vmmkit.testing import qemu
from vmmkit.testing.pytest_plugin import QEMU_GUEST_HUNG, _lab_crash, qemu_guest_hung


def test_a_silent_hung_guest_is_killed_at_the_timeout(monkeypatch):
    # A "QEMU" that prints nothing and never ends: reading its output alone would wait for ever.
    monkeypatch.setattr(qemu, "qemu_command", lambda command, **kw: [sys.executable, "-c",
                                                                      "import time; time.sleep(60)"])
    started = time.monotonic()
    result = qemu.run_qemu_exec("true", timeout=0.5)
    assert time.monotonic() - started < 20
    assert result.vmm_returncode not in (0, None)  # killed
    assert result.status is None and result.output == b""
    assert result.timed_out


def test_a_hung_qemu_guest_fails_in_words_the_lab_session_reruns(monkeypatch):
    monkeypatch.setattr(qemu, "qemu_command", lambda command, **kw: [sys.executable, "-c",
                                                                      "import time; time.sleep(60)"])
    message = qemu_guest_hung(qemu.run_qemu_exec("true", timeout=0.5))
    assert message is not None and QEMU_GUEST_HUNG in message and _lab_crash(message)


def test_a_qemu_guest_that_ends_is_not_hung(monkeypatch):
    monkeypatch.setattr(qemu, "qemu_command", lambda command, **kw: [sys.executable, "-c", "print('done')"])
    result = qemu.run_qemu_exec("true", timeout=30)
    assert not result.timed_out and result.vmm_returncode == 0
    assert qemu_guest_hung(result) is None


def test_a_hung_guest_says_when_its_vcpu_was_livelocked(monkeypatch):
    monkeypatch.setattr(qemu, "qemu_command", lambda command, **kw: [sys.executable, "-c",
                                                                      "import time; time.sleep(60)"])
    looked = []
    monkeypatch.setattr(qemu, "emulation_livelock", lambda pid: looked.append(pid) or "caught in the emulator")
    result = qemu.run_qemu_exec("true", timeout=0.5)
    assert looked and result.livelock == "caught in the emulator"  # looked at before the kill
    assert "(caught in the emulator)" in qemu_guest_hung(result)
