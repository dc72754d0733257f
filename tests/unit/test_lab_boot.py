"""run_in_lab's boot watchdog: a lab machine that hangs before its init starts the command boots again.

A real lab hangs at boot too rarely to test with (once in many CI runs), so a
stand-in for QEMU plays the lab machine: it follows the lab's console protocol
(start marker, the command's output, the status file, end marker), or hangs
silently for the boots it is told to.
"""

import os
import sys
import types

import pytest

from vmmkit.lab import run as lab_run
from vmmkit.lab.init import END_MARKER, RUN_PARAM, START_MARKER

FAKE_QEMU = r"""#!{python}
import os, sys, time
state = {state!r}
with open(state) as f:
    hangs = int(f.read())
with open(state, "w") as f:
    f.write(str(hangs - 1))
with open(state + ".boots", "a") as f:
    f.write("boot\n")
if hangs > 0:
    time.sleep(3600)
append = sys.argv[sys.argv.index("-append") + 1]
rundir = [a.split("=", 1)[1] for a in append.split() if a.startswith({param!r} + "=")][0]
out = sys.stdout.buffer
out.write(b"lab kernel messages\n" + {start!r})
out.write(b"the command's output\n")
out.flush()
with open(os.path.join(rundir, "status"), "w") as f:
    f.write("3\n")
out.write({end!r})
out.flush()
"""


@pytest.fixture
def fake_lab(tmp_path, monkeypatch):
    """Returns start(hangs): the next boots of the stand-in QEMU hang *hangs* times, then it works."""
    state = tmp_path / "state"
    script = tmp_path / "qemu-system-x86_64"
    script.write_text(FAKE_QEMU.format(python=sys.executable, state=str(state), param=RUN_PARAM,
                                       start=START_MARKER.encode(), end=END_MARKER.encode()))
    script.chmod(0o755)
    monkeypatch.setattr(lab_run, "qemu_binary", lambda: str(script))
    monkeypatch.setattr(lab_run, "ensure_lab", lambda progress: types.SimpleNamespace(kernel="bz", initrd="rd"))
    monkeypatch.setattr(lab_run, "BOOT_SECONDS", 2.0)
    monkeypatch.setattr(lab_run, "BOOT_POLL", 0.05)

    def start(hangs: int):
        state.write_text(str(hangs))
        return lambda: len((tmp_path / "state.boots").read_text().splitlines())
    return start


def run(tmp_path, **kw):
    out, err = tmp_path / "out", tmp_path / "err"
    notes = []
    with open(out, "wb") as o, open(err, "wb") as e:
        status = lab_run.run_in_lab(["true"], stdout=o, stderr=e, progress=notes.append, **kw)
    return status, out.read_bytes(), err.read_bytes().decode(), notes


def test_a_lab_that_boots_runs_once(fake_lab, tmp_path):
    boots = fake_lab(0)
    status, out, err, notes = run(tmp_path)
    assert (status, out, boots(), notes) == (3, b"the command's output\n", 1, [])


def test_a_lab_hung_at_boot_boots_again_and_its_command_runs_once(fake_lab, tmp_path):
    boots = fake_lab(2)
    status, out, err, notes = run(tmp_path, timeout=60)
    assert status == 3
    assert out == b"the command's output\n"
    assert boots() == 3
    assert len(notes) == 2 and all("booting it again" in n for n in notes)


def test_a_lab_that_keeps_hanging_at_boot_fails_and_says_why(fake_lab, tmp_path):
    boots = fake_lab(99)
    status, out, err, notes = run(tmp_path)
    assert status == lab_run.LAB_FAILED
    assert out == b""
    assert boots() == 1 + lab_run.BOOT_RETRIES
    assert "did not start the command within 2s of booting, 3 times" in err


def test_a_timeout_shorter_than_the_boot_watch_is_a_timeout(fake_lab, tmp_path):
    boots = fake_lab(99)
    status, out, err, notes = run(tmp_path, timeout=0.5)
    assert status == lab_run.LAB_FAILED
    assert boots() == 1
    assert "timed out after" in err
    assert notes == []
