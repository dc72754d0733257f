"""QEMU microvm, inside the lab, boots the default guest and runs a command the way vmmkit does.

This proves the lab's KVM and the default guest before vmmkit's own VMM is
involved; the same helper is the peer in the benchmarks.
"""

import pytest

from vmmkit.testing import qemu
from vmmkit.testing.pytest_plugin import qemu_guest_crashed

pytestmark = pytest.mark.guest


def run_qemu_exec(command: str, **kw):
    """qemu.run_qemu_exec, failing (in words the lab session reruns) when QEMU's guest hung or rebooted."""
    result = qemu.run_qemu_exec(command, **kw)
    if crashed := qemu_guest_crashed(result):
        pytest.fail(crashed)
    return result


def test_qemu_boots_default_guest_and_runs_command():
    result = run_qemu_exec("echo 'hello \"quoted\" world'; uname -r; nproc; exit 7", vcpus=2)
    assert result.status == 7, result.console.decode(errors="replace")
    lines = result.output.decode().splitlines()
    assert lines[0] == 'hello "quoted" world'
    assert lines[1].endswith("-cloud-amd64")
    assert lines[2] == "2"


def test_guest_has_socat_with_its_libraries():
    result = run_qemu_exec("socat -V | head -1; echo ping | socat - SYSTEM:'cat'")
    assert result.status == 0, result.output + result.console
    out = result.output.decode()
    assert "socat by Gerhard Rieger" in out
    assert out.rstrip().endswith("ping")


def test_output_arrives_whole():
    # 24 KB of numbered lines (the lab's emulated serial path is slow): every
    # byte must come back, in order, unmodified, and the status after it.
    result = run_qemu_exec("seq 1 5000; printf 'no newline at the end'")
    assert result.status == 0
    assert result.output == ("".join(f"{i}\n" for i in range(1, 5001)) + "no newline at the end").encode()
