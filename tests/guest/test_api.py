"""The control API on a real guest: `vmmkit run --api-sock` driven by `vmmkit ctl`, as a user would."""

import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest
import schemathesis

from api_unix import unix_session
from vmmkit.boot import layout
from vmmkit.virtio.constants import MMIO_WINDOW

pytestmark = pytest.mark.guest

VMMKIT = [sys.executable, "-m", "vmmkit"]
COUNTER = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.2; done"
BOOT_TIMEOUT = 300  # the lab is an emulated machine: booting takes a while
API_YAML = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "docs", "api.yaml")


class RunningVm:
    """`vmmkit run` in the background; its stdout collected line by line with arrival times."""

    # One vCPU: 2-vCPU guests sometimes hang or crash the emulated lab (docs/lab.md); pausing
    # several vCPUs is covered by tests/unit/test_api_vm_pause.py.
    def __init__(self, tmp_path, config_text="[machine]\nvcpus = 1\n", exec_command=None, sock=None):
        self.config = str(tmp_path / "vm.toml")
        with open(self.config, "w") as f:
            f.write(config_text)
        self.sock = sock or str(tmp_path / "api.sock")
        argv = VMMKIT + ["run", self.config, "--api-sock", self.sock]
        if exec_command is not None:
            argv += ["--exec", exec_command]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines = []  # (time.monotonic(), line)
        self.stderr = b""
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_stdout(self):
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip("\r\n")))
                self._cond.notify_all()

    def _read_stderr(self):
        self.stderr = self.proc.stderr.read()

    def wait_for(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate([line for _, line in self.lines]):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"never saw {what}; exit status {self.proc.poll()}; output tail: "
                                         f"{[line for _, line in self.lines[-20:]]}; stderr: {self.stderr[-2000:]!r}")
                self._cond.wait(min(left, 1.0))

    def ctl(self, *args, check=True, timeout=120):
        proc = subprocess.run(VMMKIT + ["ctl", "--api-sock", self.sock, *args], capture_output=True, text=True,
                              timeout=timeout)
        if check:
            assert proc.returncode == 0, f"ctl {args}: {proc.returncode} {proc.stdout} {proc.stderr}"
        return proc

    def wait(self, timeout=180):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"vmmkit did not exit; output tail: {self.lines[-20:]}")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def running():
    vms = []

    def start(*args, **kwargs):
        vm = RunningVm(*args, **kwargs)
        vms.append(vm)
        return vm
    yield start
    for vm in vms:
        vm.kill()


def counter_values(lines):
    return [int(line) for line in lines if line.strip().isdigit()]


def test_pause_stops_the_guest_and_resume_continues_where_it_stopped(tmp_path, running):
    vm = running(tmp_path, exec_command=COUNTER)
    vm.wait_for(lambda lines: len(counter_values(lines)) >= 3, BOOT_TIMEOUT, "the counter running")
    mode = stat.S_IMODE(os.stat(vm.sock).st_mode)
    assert mode == 0o600, oct(mode)

    info = json.loads(vm.ctl("info", "--json").stdout)
    assert info["state"] == "running"
    assert info["vcpus"] == 1 and info["config"]["machine"]["vcpus"] == 1
    assert info["memory"] == 512 << 20
    assert info["config"]["api"]["socket"] == vm.sock
    assert info["config"]["source"] == vm.config

    assert vm.ctl("pause").stdout.strip() == "paused"
    time.sleep(1.0)  # lines already written before the pause reach our reader
    before = counter_values(line for _, line in vm.lines)
    time.sleep(5.0)  # ~25 counter ticks if the guest were running
    after = counter_values(line for _, line in vm.lines)
    assert after == before, f"the counter moved while paused: {before[-3:]} -> {after[-3:]}"
    assert json.loads(vm.ctl("info", "--json").stdout)["state"] == "paused"
    # Pausing again is harmless; the power button needs a running guest.
    assert vm.ctl("pause").stdout.strip() == "paused"
    refused = vm.ctl("shutdown", check=False)
    assert refused.returncode == 1 and "paused" in refused.stderr, refused

    assert vm.ctl("resume").stdout.strip() == "running"
    vm.wait_for(lambda lines: len(counter_values(lines)) >= len(after) + 3, 60, "the counter after resume")
    values = counter_values(line for _, line in vm.lines)
    # Continues from the next value: nothing lost, nothing repeated.
    assert values == list(range(len(values))), values

    # Quick pause/resume cycles (both vCPUs park and leave each time): the guest goes on undisturbed.
    with unix_session(vm.sock) as session:
        for _ in range(10):
            assert session.put("http://localhost/vm/pause").json() == {"state": "paused"}
            assert session.put("http://localhost/vm/resume").json() == {"state": "running"}
    seen = len(counter_values(line for _, line in vm.lines))
    vm.wait_for(lambda lines: len(counter_values(lines)) >= seen + 3, 60, "the counter after pause cycles")
    values = counter_values(line for _, line in vm.lines)
    assert values == list(range(len(values))), values

    # Graceful shutdown under --exec: the guest's acpid ends the command (SIGTERM), /init reports its status.
    assert "power button pressed" in vm.ctl("shutdown").stdout
    assert vm.wait() == 128 + 15, vm.stderr
    assert not os.path.exists(vm.sock)


def test_shutdown_powers_the_guest_off_through_its_own_shutdown_path(tmp_path, running):
    vm = running(tmp_path, config_text="[machine]\nvcpus = 1\n")
    vm.wait_for(lambda lines: any("type 'poweroff'" in line for line in lines), BOOT_TIMEOUT, "the guest's shell")
    proc = vm.ctl("shutdown", "--json")
    assert json.loads(proc.stdout) == {"state": "running"}
    # The guest powers off by itself (ACPI S5 from its own `poweroff -f`): vmmkit's status 0.
    assert vm.wait() == 0, vm.stderr
    assert not os.path.exists(vm.sock)
    gone = vm.ctl("info", check=False)
    assert gone.returncode == 1 and "no API socket" in gone.stderr


def test_errors_and_immediate_stop(tmp_path, running):
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    vm = running(tmp_path, config_text='[machine]\nvcpus = 1\n\n[[device]]\nkind = "blk"\npath = "disk.img"\n'
                 'id = "data"\n')
    vm.wait_for(lambda lines: any("type 'poweroff'" in line for line in lines), BOOT_TIMEOUT, "the guest's shell")

    # The live answers conform to docs/api.yaml; the device is where the DSDT put it.
    schema = schemathesis.openapi.from_path(API_YAML)
    with unix_session(vm.sock) as session:
        for method, path, status in [("GET", "/vm", 200), ("PUT", "/vm/pause", 200), ("PUT", "/vm/shutdown", 409),
                                     ("GET", "/vm", 200), ("PUT", "/vm/resume", 200)]:
            response = session.request(method, "http://localhost" + path)
            assert response.status_code == status, response.text
            schema[path][method].validate_response(response)
        info = session.get("http://localhost/vm").json()
    assert info["devices"] == [{"id": "data", "kind": "blk", "transport": "virtio-mmio", "virtio_id": 2,
                                "mmio_base": layout.virtio_mmio_addr(0), "mmio_size": MMIO_WINDOW, "gsi": 5}]
    assert info["config"]["devices"][0]["options"]["path"] == str(tmp_path / "disk.img")

    # A second VM on the same socket is refused before it boots.
    second = subprocess.run(VMMKIT + ["run", vm.config, "--api-sock", vm.sock], capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    assert second.returncode == 2, second
    assert "in use" in second.stderr and "Linux version" not in second.stdout

    bad = vm.ctl("call", "GET", "/nope", check=False)
    assert bad.returncode == 1 and "no such endpoint" in bad.stderr
    wrong = vm.ctl("call", "POST", "/vm/pause", check=False)
    assert wrong.returncode == 1 and "not allowed" in wrong.stderr
    assert vm.ctl("resume").stdout.strip() == "running"  # resuming a running VM does nothing

    # Pause, then stop without resuming: the stop ends a paused VM at once.
    assert vm.ctl("pause").stdout.strip() == "paused"
    assert vm.ctl("stop", "--json").returncode == 0
    assert vm.wait() == 0, vm.stderr
    assert not os.path.exists(vm.sock)
    assert "type 'poweroff'" in "\n".join(line for _, line in vm.lines)


def test_stale_socket_is_replaced(tmp_path, running):
    import socket as socketlib
    sock_path = str(tmp_path / "stale.sock")
    stale = socketlib.socket(socketlib.AF_UNIX)
    stale.bind(sock_path)
    stale.close()  # the file stays, nobody listens: as after a crash
    vm = running(tmp_path, config_text="[machine]\nvcpus = 1\n", exec_command="echo ready; sleep 600",
                 sock=sock_path)
    vm.wait_for(lambda lines: "ready" in lines, BOOT_TIMEOUT, "the command")
    assert json.loads(vm.ctl("info", "--json").stdout)["state"] == "running"
    vm.ctl("stop")
    # --exec: the command never reported a status.
    assert vm.wait() == 125
    assert not os.path.exists(sock_path)
