"""The lab's command script: it carries the caller's environment, except what only makes sense on the host."""

import os
import subprocess
import sys

from vmmkit.lab.run import write_script


def run_script(tmp_path, env):
    """Write the lab script for a Python one-liner that prints two variables, and run it here with sh."""
    script = tmp_path / "script.sh"
    probe = "import os; print(os.environ.get('PYTHONDONTWRITEBYTECODE'), os.environ.get('VMMKIT_TEST_VAR'))"
    write_script(str(script), [sys.executable, "-c", probe], str(tmp_path), env)
    out = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=True,
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    return out.stdout.split()


def test_the_callers_variables_reach_the_command(tmp_path):
    assert run_script(tmp_path, {"VMMKIT_TEST_VAR": "it's here"})[1:] == ["it's", "here"]


def test_python_may_write_bytecode_inside_the_lab(tmp_path):
    # Writes there land on a throw-away overlay, and without .pyc files every
    # Python start in the lab compiles its modules again.
    words = run_script(tmp_path, {"PYTHONDONTWRITEBYTECODE": "1", "VMMKIT_TEST_VAR": "x"})
    assert words == ["None", "x"]


def test_a_wedged_lab_is_stopped_once_its_kernel_reports_a_cpu_stuck_long_enough():
    from vmmkit.lab.run import WEDGE_SECONDS, WedgeWatch
    fed, kills = [], []
    w = WedgeWatch(fed.append, lambda: kills.append(1))
    w(b"[  365.48] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [kthreadd:2]\n")
    assert kills == [] and w.report is None  # a short stall: the lab may recover
    line = f"[  900.37] watchdog: BUG: soft lockup - CPU#0 stuck for {WEDGE_SECONDS + 10}s! [swapper/0:0]\n".encode()
    w(line[:30])
    w(line[30:])  # the report may come in pieces
    w(line)
    assert kills == [1]  # once
    assert w.report == f"soft lockup - CPU#0 stuck for {WEDGE_SECONDS + 10}s"
    assert b"".join(fed) == b"[  365.48] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [kthreadd:2]\n" + line + line


def test_a_lab_whose_progress_file_stops_changing_counts_as_stalled(tmp_path, monkeypatch):
    import time
    from vmmkit.lab import run
    monkeypatch.setattr(run, "STALL_POLL", 0.05)
    progress = tmp_path / "report.json"
    # Written three times, 0.2 s apart, then left alone: stalled 0.5 s after the last write.
    writer = subprocess.Popen([sys.executable, "-c",
                               f"import time\nfor i in range(3):\n    open({str(progress)!r}, 'w').write(str(i)); "
                               f"time.sleep(0.2)\ntime.sleep(30)"])
    try:
        started = time.monotonic()
        stalled = run._wait_watching(writer, 60, (str(progress), 0.5))
        assert stalled is not None and stalled >= 0.5
        assert time.monotonic() - started >= 0.9  # the writes kept it alive
        assert writer.poll() is None  # the caller stops the lab
    finally:
        writer.kill()
        writer.wait()


def test_a_lab_that_ends_or_times_out_is_not_stalled(tmp_path, monkeypatch):
    from vmmkit.lab import run
    monkeypatch.setattr(run, "STALL_POLL", 0.05)
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    assert run._wait_watching(done, 60, (str(tmp_path / "never-written"), 30)) is None
    assert done.poll() == 0
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert run._wait_watching(slow, 0.3, (str(tmp_path / "never-written"), 30)) is None
        assert slow.poll() is None  # timed out: the caller kills it
        assert run._wait_watching(slow, 0.3, None) is None
    finally:
        slow.kill()
        slow.wait()
