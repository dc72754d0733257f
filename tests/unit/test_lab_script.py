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
