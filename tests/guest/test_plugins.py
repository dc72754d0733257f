"""Plugins on a real guest: a pip-installed third-party device, a broken plugin, a VMM assembled in Python."""

import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.guest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_killing_the_group(argv, *, timeout, **kw):
    """subprocess.run in a session of its own: on timeout its whole group goes, and what it printed is kept.

    (run() kills only the child, then waits for ever on pipes its children still hold.)
    """
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(argv)} did not end within {timeout}s; its output:\n{out}\n{err}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_third_party_rng_plugin_serves_hwrng_in_the_guest(rng_plugin):
    # The example's own guest test, run the way its author runs it (vmmkit's fixtures do the booting).
    proc = run_killing_the_group([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "guest",
                                  "tests"], cwd=rng_plugin, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


def test_a_broken_plugin_does_not_stop_a_vm_that_does_not_use_it(vmmkit_run, tmp_path):
    site = tmp_path / "site"
    info = site / "vmmkit_broken-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vmmkit-broken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[vmmkit]\nbroken = vmmkit_broken_plugin\n")
    (site / "vmmkit_broken_plugin.py").write_text("raise ImportError('this plugin needs libfoo')\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-m", "vmmkit", "run", vmmkit_run.config(""), "--exec", "echo alive"],
                          capture_output=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"alive\n"
    assert b"broken" in proc.stderr and b"needs libfoo" in proc.stderr


def test_the_custom_vmm_example_boots_a_guest():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "custom_vmm.py")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "the guest said: scratch" in proc.stdout
    assert "the disk starts with: 'hello from the guest" in proc.stdout
    assert "stopped (exec-done)" in proc.stderr
