"""[machine] halt_poll_ns reaches KVM: the guest's halts end in polling, or never do.

The guest sleeps 200 µs at a time, so each of its vCPU's halts ends in a
timer wake-up soon after. KVM counts the halts that its polling ended
(``halt_successful_poll``, per VM in debugfs), which the test reads while the
guest still runs: a 2 ms window must catch some, a 0 window none. (Each halt
lasts a little over 200 µs, longer than the kvm module's default window of
200 µs: with the option ignored, the lab's KVM caught none.)
"""

import subprocess
import time

import pytest

from vmmkit.testing import kvm_debugfs
from vmmkit.testing.pipes import read_until
from vmmkit.testing.runner import VMMKIT

pytestmark = pytest.mark.guest

DONE = b"sleeps-done"


def successful_polls(vmm, toml: str) -> int:
    """Boot with *toml*, have the guest sleep 200 µs 400 times, and return KVM's count of polled halts."""
    command = f"i=0; while [ $i -lt 400 ]; do usleep 200; i=$((i+1)); done; echo {DONE.decode()}; sleep 60"
    proc = subprocess.Popen(VMMKIT + ["run", vmm.config(toml), "--exec", command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = bytearray()
        read_until(proc.stdout, time.monotonic() + 240, out.extend, done=lambda: DONE in out)
        if DONE not in out:
            proc.kill()
            pytest.fail(f"the guest did not finish its sleeps: {bytes(out[-2000:])!r}\n{proc.stderr.read()[-2000:]!r}")
        assert len(kvm_debugfs.vm_dirs(proc.pid)) == 1, "the VMM's one VM in debugfs"
        return kvm_debugfs.counters(proc.pid, ["halt_successful_poll"])["halt_successful_poll"]
    finally:
        proc.kill()
        proc.wait()


def test_halt_poll_window_reaches_kvm(vmmkit_run):
    if why := kvm_debugfs.unavailable():
        pytest.fail(f"KVM's per-VM counters cannot be read here: {why}")
    base = '[machine]\nvcpus = 1\nmemory = "256M"\n'
    polled = successful_polls(vmmkit_run, base + "halt_poll_ns = 2000000\n")
    assert polled > 0
    assert successful_polls(vmmkit_run, base + "halt_poll_ns = 0\n") == 0
