"""Vm.pause/resume/stop with fake vCPUs: vCPU threads park after completing their in-flight exit.

The fake vCPU behaves like KVM_RUN: with immediate_exit set it first
completes a pending MMIO read (KVM's complete_userspace_io) and then returns
EINTR; otherwise it "runs the guest" for a moment and exits, every third
time with an MMIO read that the VMM must answer before the next run.
"""

import signal
import threading
import time
import types

import pytest

from vmmkit._native import lib
from vmmkit.bus import Bus
from vmmkit.config import VmSpec
from vmmkit.errors import VmmkitError
from vmmkit.hookspecs import hookimpl
from vmmkit.plugins import Plugins
from vmmkit.vm import KICK_SIGNAL, Vm, VmStateError

MMIO_BASE = 0xD0000000


class FakeVcpu:
    def __init__(self, index):
        self.index = index
        self.run_map = bytearray(4096)
        self.immediate = False
        self.runs = 0
        self.mmio_issued = 0
        self.mmio_completed = []
        self.pending_mmio = False
        self.mmio_data = None
        self.lock = threading.Lock()

    def run(self):
        if self.pending_mmio:
            # KVM completes the exit userspace answered before anything else, even with immediate_exit.
            assert self.mmio_data is not None, "KVM_RUN again before the MMIO read was answered"
            self.mmio_completed.append(self.mmio_data)
            self.pending_mmio, self.mmio_data = False, None
        if self.immediate:
            self.immediate = False
            return None  # EINTR
        time.sleep(0.0005)  # the guest runs
        self.runs += 1
        if self.runs % 3 == 0:
            self.pending_mmio = True
            self.mmio_issued += 1
            return types.SimpleNamespace(reason=lib.KVM_EXIT_MMIO, mmio_is_write=False,
                                         mmio_phys_addr=MMIO_BASE, mmio_len=4)
        return types.SimpleNamespace(reason=lib.KVM_EXIT_HLT)

    def request_exit(self):
        self.immediate = True

    def set_mmio_data(self, data):
        self.mmio_data = data

    def mmio_write_data(self):
        return b""


class Register:
    bus_lock = False

    def bus_read(self, offset, size):
        return b"\x2a" * size

    def bus_write(self, offset, data):
        pass


class FakeDevice:
    def __init__(self, name, pause_ok=True):
        self.name = name
        self.device_id = 2
        self.pause_ok = pause_ok
        self.events = []

    def pause(self):
        self.events.append("pause")
        return self.pause_ok

    def resume(self):
        self.events.append("resume")

    def reset(self):
        self.events.append("reset")


class FakeTransport:
    def __init__(self, device):
        self.device = device

    def close(self):
        pass


class HookRecorder:
    def __init__(self):
        self.events = []

    @hookimpl
    def vmmkit_vm_paused(self, vm):
        self.events.append(("paused", vm.state))

    @hookimpl
    def vmmkit_vm_resumed(self, vm):
        self.events.append(("resumed", vm.state))

    @hookimpl
    def vmmkit_vm_stopping(self, vm, reason):
        self.events.append(("stopping", reason))


@pytest.fixture
def machine():
    """A Vm with two fake vCPUs and two fake devices, run() in the main thread by the test."""
    recorder = HookRecorder()
    plugins = Plugins(entry_points=False, extra=[("recorder", recorder)])
    vm = Vm(VmSpec.build(machine={"vcpus": 2}), plugins=plugins, progress=lambda m: None)
    vm.vcpus = [FakeVcpu(0), FakeVcpu(1)]
    vm.pio_bus = Bus("pio")
    vm.mmio_bus = Bus("mmio")
    vm.mmio_bus.insert(Register(), MMIO_BASE, 0x100, "reg")
    vm.virtio_transports = [FakeTransport(FakeDevice("a")), FakeTransport(FakeDevice("b"))]
    vm.power_button = types.SimpleNamespace(trigger=lambda: recorder.events.append(("button",)))
    vm._built = True
    vm.recorder = recorder
    old = signal.getsignal(KICK_SIGNAL)
    yield vm
    signal.signal(KICK_SIGNAL, old)
    vm.close()


def run_with(vm, control):
    """vm.run() here (the main thread, like vmmkit run); *control(vm)* in another thread."""
    errors = []

    def wrapped():
        try:
            deadline = time.monotonic() + 5
            while vm.state != "running" and time.monotonic() < deadline:
                time.sleep(0.005)
            control(vm)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            vm.request_stop("stop")
    t = threading.Thread(target=wrapped)
    t.start()
    status = vm.run()
    t.join(10)
    if errors:
        raise errors[0]
    return status


def progress(vm):
    return [v.runs for v in vm.vcpus]


def wait_progress(vm, minimum=20):
    start = progress(vm)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if all(b - a >= minimum for a, b in zip(start, progress(vm))):
            return
        time.sleep(0.005)
    raise AssertionError(f"the vCPUs do not run: {start} -> {progress(vm)}")


def test_pause_parks_every_vcpu_after_completing_its_exit_and_resume_continues(machine):
    def control(vm):
        wait_progress(vm)
        vm.pause()
        assert vm.state == "paused"
        frozen = progress(vm)
        time.sleep(0.3)
        assert progress(vm) == frozen, "a vCPU ran while paused"
        for v in vm.vcpus:
            assert not v.pending_mmio, "a pause left an MMIO read unanswered"
            assert v.mmio_completed == [b"\x2a" * 4] * v.mmio_issued
        assert [t.device.events for t in vm.virtio_transports] == [["pause"], ["pause"]]
        vm.pause()  # again: nothing happens
        assert [t.device.events for t in vm.virtio_transports] == [["pause"], ["pause"]]
        vm.resume()
        assert vm.state == "running"
        wait_progress(vm)
        assert [t.device.events for t in vm.virtio_transports] == [["pause", "resume"], ["pause", "resume"]]
        vm.resume()  # running already: nothing happens
        # Many quick cycles: no lost wakeup, no vCPU left parked.
        for _ in range(20):
            vm.pause()
            vm.resume()
        wait_progress(vm)

    assert run_with(machine, control) == 0
    assert machine.state == "stopped"
    assert machine.stop_reason == "stop"
    assert machine.recorder.events[:2] == [("paused", "paused"), ("resumed", "running")]
    assert machine.recorder.events[-1] == ("stopping", "stop")


def test_stop_while_paused_ends_the_vm(machine):
    def control(vm):
        wait_progress(vm, 5)
        vm.pause()
        vm.stop()
    assert run_with(machine, control) == 0
    assert machine.state == "stopped"
    with pytest.raises(VmStateError, match="stopped"):
        machine.pause()
    with pytest.raises(VmStateError, match="stopped"):
        machine.resume()
    with pytest.raises(VmStateError, match="stopped"):
        machine.press_power_button()


def test_power_button_only_on_a_running_vm(machine):
    def control(vm):
        vm.press_power_button()
        assert vm.shutdown_requested_at is not None
        vm.pause()
        with pytest.raises(VmStateError, match="paused"):
            vm.press_power_button()
        vm.resume()
    run_with(machine, control)
    assert machine.recorder.events.count(("button",)) == 1


def test_a_device_that_does_not_pause_leaves_the_vm_running(machine):
    machine.virtio_transports[1].device.pause_ok = False

    def control(vm):
        wait_progress(vm, 5)
        with pytest.raises(VmmkitError, match="pause failed: device virtio-b"):
            vm.pause()
        assert vm.state == "running"
        assert vm.virtio_transports[0].device.events == ["pause", "resume"]
        wait_progress(vm, 5)  # the vCPUs were released
    run_with(machine, control)
    assert not any(e[0] == "paused" for e in machine.recorder.events)


def test_state_before_start():
    vm = Vm(VmSpec.build(), plugins=Plugins(entry_points=False), progress=lambda m: None)
    try:
        assert vm.state == "starting"
        with pytest.raises(VmStateError, match="starting"):
            vm.pause()
    finally:
        vm.close()
