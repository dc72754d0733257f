"""`vmmkit run` on the real default guest, as a user runs it (a subprocess of the CLI)."""

import os
import pty
import re
import select
import subprocess
import time

import pytest

from vmmkit.testing.runner import VMMKIT, run_exec

pytestmark = pytest.mark.guest


def write_config(tmp_path, text):
    path = tmp_path / "vm.toml"
    path.write_text(text)
    return str(path)


# 4 vCPUs on a 2-vCPU lab sometimes crash the lab's own kernel (docs/lab.md): the pytest
# plugin then reruns the test in a fresh lab.
@pytest.mark.parametrize("vcpus,memory_mib", [(1, 512), (2, 4608), (4, 512)])
def test_vcpus_and_memory_match_the_config(tmp_path, vcpus, memory_mib):
    config = write_config(tmp_path, f'[machine]\nvcpus = {vcpus}\nmemory = "{memory_mib}M"\n')
    proc = run_exec(config, "nproc; grep MemTotal /proc/meminfo; grep -c ^processor /proc/cpuinfo")
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == str(vcpus)
    assert lines[2] == str(vcpus)
    mem_total_kib = int(re.search(r"(\d+) kB", lines[1]).group(1))
    # The kernel keeps its own image and reserved areas out of MemTotal: a few percent.
    assert 0.90 * memory_mib * 1024 < mem_total_kib <= memory_mib * 1024


def test_exec_status_and_output_come_back_exactly(tmp_path):
    config = write_config(tmp_path, "[machine]\nvcpus = 1\n")
    proc = run_exec(config, "seq 1 3000; echo \"it's 'quoted'\" >&2; printf 'no newline'; exit 7")
    assert proc.returncode == 7, proc.stderr.decode()
    expected = "".join(f"{i}\n" for i in range(1, 3001)) + "it's 'quoted'\nno newline"
    assert proc.stdout.decode() == expected


def test_exec_exit_zero_and_acpi_is_used(tmp_path):
    config = write_config(tmp_path, "")
    proc = run_exec(config, "ls /sys/bus/platform/devices/ | grep -c LNRO || true; "
                            "cat /sys/firmware/acpi/tables/FACP >/dev/null && echo has-fadt")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "has-fadt" in proc.stdout.decode()


class Console:
    """vmmkit run on a pseudo-terminal, the way a person at a terminal uses it."""

    def __init__(self, config):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(VMMKIT + ["run", config], stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.buffer = b""

    def expect(self, pattern: bytes, timeout=240):
        deadline = time.monotonic() + timeout
        while pattern not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"never saw {pattern!r}; console tail:\n{self.buffer[-3000:].decode(errors='replace')}")
            if select.select([self.master], [], [], min(left, 1))[0]:
                try:
                    self.buffer += os.read(self.master, 65536)
                except OSError:
                    pass

    def send(self, text: bytes):
        for ch in text:
            os.write(self.master, bytes([ch]))
            time.sleep(0.02)

    def wait(self, timeout=120):
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if select.select([self.master], [], [], 1)[0]:
                try:
                    self.buffer += os.read(self.master, 65536)
                except OSError:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()


def test_boots_to_a_shell_and_poweroff_exits_zero(tmp_path):
    # One vCPU: SMP has its own test, and 2-vCPU guests are what sometimes crash the lab (docs/lab.md).
    console = Console(write_config(tmp_path, "[machine]\nvcpus = 1\n"))
    console.expect(b"Linux version")           # the kernel's own boot messages reach the console
    console.expect(b"type 'poweroff'")          # the default guest's init is running
    console.send(b"echo $((6*7))\r")             # keystrokes reach the guest
    console.expect(b"42")
    console.send(b"poweroff\r")
    assert console.wait() == 0


def test_guest_reboot_exits_with_the_documented_status(tmp_path):
    console = Console(write_config(tmp_path, ""))
    console.expect(b"type 'poweroff'")
    console.send(b"reboot\r")
    assert console.wait() == 3


@pytest.mark.parametrize("machine", ['shared = true', 'memory_file = "{tmp}"', 'memory_file = "{tmp}/ram"'])
def test_guest_ram_on_a_memfd_or_a_file(tmp_path, machine):
    config = write_config(tmp_path, f'[machine]\nvcpus = 1\nmemory = "256M"\n{machine.format(tmp=tmp_path)}\n')
    proc = run_exec(config, "grep MemTotal /proc/meminfo; echo written > /tmp/x && cat /tmp/x")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().splitlines()[-1] == "written"
    if machine.endswith('/ram"'):
        # The named file holds the guest's RAM (sparse: only what the guest touched takes room).
        assert os.path.getsize(tmp_path / "ram") == 256 << 20
