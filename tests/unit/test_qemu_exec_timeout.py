"""vmmkit.testing.qemu.run_qemu_exec keeps its timeout when the guest hangs without a word."""

import sys
import time

from vmmkit.testing import qemu


def test_a_silent_hung_guest_is_killed_at_the_timeout(monkeypatch):
    # A "QEMU" that prints nothing and never ends: reading its output alone would wait for ever.
    monkeypatch.setattr(qemu, "qemu_command", lambda command, **kw: [sys.executable, "-c",
                                                                      "import time; time.sleep(60)"])
    started = time.monotonic()
    result = qemu.run_qemu_exec("true", timeout=0.5)
    assert time.monotonic() - started < 20
    assert result.vmm_returncode not in (0, None)  # killed
    assert result.status is None and result.output == b""
