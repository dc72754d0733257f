"""vmmkit.testing.qemu.run_qemu_exec keeps its timeout when the guest hangs without a word."""

import sys
import time

from vmmkit.testing import qemu
from vmmkit.testing.pytest_plugin import QEMU_GUEST_ENDED, QEMU_GUEST_HUNG, _lab_crash, qemu_guest_crashed


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
    message = qemu_guest_crashed(qemu.run_qemu_exec("true", timeout=0.5))
    assert message is not None and QEMU_GUEST_HUNG in message and _lab_crash(message)


def test_a_qemu_guest_that_reboots_before_its_command_ends_is_a_crash(monkeypatch):
    # A "QEMU" that prints a console line and exits 0, as QEMU does under -no-reboot when its
    # guest reboots: no status came back.
    monkeypatch.setattr(qemu, "qemu_command", lambda command, **kw: [sys.executable, "-c", "print('done')"])
    result = qemu.run_qemu_exec("true", timeout=30)
    assert not result.timed_out and result.vmm_returncode == 0 and result.status is None
    message = qemu_guest_crashed(result)
    assert message is not None and QEMU_GUEST_ENDED in message and _lab_crash(message)


def test_a_qemu_guest_whose_command_failed_is_not_a_crash():
    result = qemu.ExecResult(status=1, output=b"no\n", console=b"", seconds=9.0, vmm_returncode=0,
                             timed_out=False, livelock=None)
    assert qemu_guest_crashed(result) is None
    result = qemu.ExecResult(status=None, output=b"", console=b"", seconds=2.0, vmm_returncode=1,
                             timed_out=False, livelock=None)
    assert qemu_guest_crashed(result) is None  # QEMU itself failed (bad option, no KVM): not the guest


def test_a_hung_guest_says_when_its_vcpu_was_livelocked(monkeypatch):
    monkeypatch.setattr(qemu, "qemu_command", lambda command, **kw: [sys.executable, "-c",
                                                                      "import time; time.sleep(60)"])
    looked = []
    monkeypatch.setattr(qemu, "emulation_livelock", lambda pid: looked.append(pid) or "caught in the emulator")
    result = qemu.run_qemu_exec("true", timeout=0.5)
    assert looked and result.livelock == "caught in the emulator"  # looked at before the kill
    assert "(caught in the emulator)" in qemu_guest_crashed(result)
