"""A fake VM with the lifecycle surface the API routes use, and a raw Unix-socket HTTP helper."""

import socket
import threading
import time

from vmmkit.config import VmSpec
from vmmkit.vm import VmStateError


class FakeVm:
    """State machine of a VM without KVM: what vmmkit.api.routes calls on a Vm."""

    def __init__(self, spec=None, devices=()):
        self.spec = spec or VmSpec.build(machine={"vcpus": 2, "memory": "1G"})
        self.state = "running"
        self.shutdown_requested_at = None
        self.calls = []
        self._devices = list(devices)
        self.pause_delay = 0.0

    def device_info(self):
        return list(self._devices)

    def pause(self):
        self.calls.append("pause")
        if self.state == "paused":
            return
        if self.state != "running":
            raise VmStateError(f"the VM is {self.state}: only a running VM can be paused")
        time.sleep(self.pause_delay)
        self.state = "paused"

    def resume(self):
        self.calls.append("resume")
        if self.state == "running":
            return
        if self.state != "paused":
            raise VmStateError(f"the VM is {self.state}: only a paused VM can be resumed")
        self.state = "running"

    def inspect(self):
        self.calls.append("inspect")
        if self.state != "paused":
            raise VmStateError(f"the VM is {self.state}: only a paused VM can be inspected (pause it first)")
        return {"vcpus": [{"index": 0, "rip": 0xFFFFFFFF81000000, "rsp": 0xFFFFC90000003F00, "rflags": 0x246,
                           "interrupts_enabled": True, "cs": 0x10, "cr0": 0x80050033, "cr2": 0, "cr3": 0x1000,
                           "cr4": 0x3606F0, "efer": 0xD01, "halted": True, "lapic_tpr": 0,
                           "lapic_irr": [], "lapic_isr": []}],
                "devices": [{"id": "blk0", "gsi": 5, "status": 15, "broken": False, "interrupt_status": 0,
                             "queues": [{"ready": True, "size": 256, "event_idx": True, "next_avail": 3,
                                         "next_used": 3, "signalled_used": 3, "avail_flags": 0, "avail_idx": 3,
                                         "used_event": 2, "used_idx": 3, "avail_event": 3, "kick_pending": False}]}]}

    def press_power_button(self):
        self.calls.append("shutdown")
        if self.state != "running":
            raise VmStateError(f"the VM is {self.state}: the power button works on a running VM")
        self.shutdown_requested_at = time.time()

    def stop(self):
        self.calls.append("stop")
        self.state = "stopping"


def raw(path, data: bytes, *, timeout=5.0, shut_write=False) -> bytes:
    """Send raw bytes on a new connection; return everything the server sends until it closes."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    try:
        s.sendall(data)
        if shut_write:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
    finally:
        s.close()


def parse_response(data: bytes):
    """(status, headers, body bytes) of the first response in *data*."""
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0"))
    return status, headers, rest[:length]


class Stopwatch:
    def __enter__(self):
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.monotonic() - self.start


def run_threads(n, target):
    errors = []

    def wrap(i):
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    ts = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    if errors:
        raise errors[0]
