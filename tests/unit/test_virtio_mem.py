"""Tests for virtio-mem (vmmkit_plugins.virtio_mem), no KVM.

The device runs on the virtio test bench (real guest memory, the real
virtio-MMIO transport, a Linux-like driver); its hotplug region is reserved
and mapped in the bench's memory the way the plugin does in a VM, so unplug
really gives memory back (checked through the data and the host mapping).
Requests are built by hand from the spec's layout, including the hostile
ones Linux's driver never sends.
"""

from __future__ import annotations

import json
import struct
import time

import pytest

from vmmkit.memory import GuestMemory
from vmmkit_plugins.virtio_mem import VirtioMemSpec, size_or_zero
from vmmkit_plugins.virtio_mem.device import ResizeError, VirtioMem, VirtioMemState

MiB = 1 << 20
GiB = 1 << 30
BASE = 4 * GiB          # where the bench's memory puts the first hotplug range
REGION = 512 * MiB
BLOCK = 2 * MiB
# Spelled out from the virtio spec (5.15) rather than imported from the code under test.
CONFIG = struct.Struct("<QH6xQQQQQ")
REQ = struct.Struct("<H6xQH6x")
RESP = struct.Struct("<H6xH")
PLUG, UNPLUG, UNPLUG_ALL, STATE = 0, 1, 2, 3
ACK, NACK, ERROR = 0, 1, 3  # (2 is BUSY, which this device never answers)
PLUGGED, UNPLUGGED, MIXED = 0, 1, 2
INT_CONFIG = 2


class Bench:
    """A virtio-mem device on the harness, with its region mapped like the plugin maps it."""

    def __init__(self, harness, requested=0, region=REGION, block=BLOCK):
        self.dev = VirtioMem("mem0", addr=BASE, region_size=region, block_size=block, requested_size=requested)
        self.h = harness(self.dev)
        mem = self.h.memory
        assert mem.reserve_hotplug(region) == BASE
        self.region = mem.add_region(BASE, region)

    def request(self, kind, addr=0, count=0, raw=None, in_len=RESP.size):
        written, (resp,) = self.h.request([raw if raw is not None else REQ.pack(kind, addr, count)], [in_len])
        assert written == RESP.size
        return RESP.unpack(resp)

    def plug(self, addr, count):
        return self.request(PLUG, addr, count)[0]

    def unplug(self, addr, count):
        return self.request(UNPLUG, addr, count)[0]

    def state(self, addr, count):
        return self.request(STATE, addr, count)

    def config(self):
        block, node, addr, region, usable, plugged, requested = CONFIG.unpack(self.h.config(0, CONFIG.size))
        return dict(block_size=block, node_id=node, addr=addr, region_size=region, usable_region_size=usable,
                    plugged_size=plugged, requested_size=requested)


@pytest.fixture
def bench(virtio_harness):
    return lambda **kw: Bench(virtio_harness, **kw)


def block(i):
    return BASE + i * BLOCK


def test_config_space_follows_the_spec_layout(bench):
    b = bench(requested=64 * MiB)
    assert b.h.transport.bus_read(0x008, 4) == (24).to_bytes(4, "little")  # DeviceID: virtio-mem
    cfg = b.config()
    assert cfg["block_size"] == BLOCK and cfg["addr"] == BASE and cfg["region_size"] == REGION
    assert cfg["requested_size"] == 64 * MiB and cfg["plugged_size"] == 0
    # The usable region covers the request plus room, in whole 128 MiB Linux memory blocks.
    assert cfg["usable_region_size"] == 384 * MiB
    assert cfg["usable_region_size"] % (128 * MiB) == 0


def test_plug_state_unplug(bench):
    b = bench(requested=16 * MiB)
    assert b.state(block(0), 8) == (ACK, UNPLUGGED)
    assert b.plug(block(0), 4) == ACK
    assert b.state(block(0), 4) == (ACK, PLUGGED)
    assert b.state(block(0), 8) == (ACK, MIXED)
    assert b.config()["plugged_size"] == 8 * MiB
    assert b.unplug(block(2), 2) == ACK
    assert b.state(block(0), 2) == (ACK, PLUGGED) and b.state(block(2), 2) == (ACK, UNPLUGGED)
    assert b.config()["plugged_size"] == 4 * MiB
    assert [b.dev.is_plugged(i) for i in range(5)] == [True, True, False, False, False]


def test_plug_beyond_the_requested_size_is_nacked(bench):
    b = bench(requested=4 * MiB)
    assert b.plug(block(0), 3) == NACK
    assert b.plug(block(0), 2) == ACK
    assert b.plug(block(2), 1) == NACK
    assert b.config()["plugged_size"] == 4 * MiB and not b.dev.is_plugged(2)


@pytest.mark.parametrize("addr,count,why", [
    (BASE + 4096, 1, "not block aligned"),
    (BASE + BLOCK // 2, 2, "not block aligned"),
    (BASE, 0, "empty"),
    (BASE - BLOCK, 1, "below the region"),
    (0, 1, "guest RAM, not the region"),
    (BASE + 384 * MiB, 1, "past the usable region (384M for 64M requested)"),
    (BASE + REGION, 1, "past the region"),
    (BASE + 382 * MiB, 2, "straddles the end of the usable region"),
    (BASE + 200 * MiB, 0xFFFF, "overflows the usable region"),
    ((1 << 64) - BLOCK, 0xFFFF, "wraps past 2**64"),
])
@pytest.mark.parametrize("kind", [PLUG, UNPLUG, STATE])
def test_hostile_ranges_get_error(bench, kind, addr, count, why):
    b = bench(requested=64 * MiB)
    assert b.config()["usable_region_size"] == 384 * MiB
    assert b.request(kind, addr, count)[0] == ERROR, why
    assert b.config()["plugged_size"] == 0
    assert not b.h.needs_reset


def test_the_usable_region_bounds_plugging(bench):
    b = bench(requested=64 * MiB)
    usable = b.config()["usable_region_size"]
    assert b.plug(BASE + usable - BLOCK, 1) == ACK
    assert b.plug(BASE + usable, 1) == ERROR
    assert b.plug(BASE + usable - BLOCK, 2) == ERROR


def test_plugging_plugged_and_unplugging_unplugged_blocks_is_an_error(bench):
    b = bench(requested=32 * MiB)
    assert b.plug(block(1), 2) == ACK
    assert b.plug(block(1), 1) == ERROR
    assert b.plug(block(0), 2) == ERROR  # half of it is plugged
    assert b.unplug(block(3), 1) == ERROR
    assert b.unplug(block(2), 2) == ERROR  # half of it is unplugged
    assert b.config()["plugged_size"] == 4 * MiB
    assert [b.dev.is_plugged(i) for i in range(4)] == [False, True, True, False]


def test_unplug_gives_the_memory_back_and_a_replugged_block_reads_zeros(bench):
    b = bench(requested=8 * MiB)
    mem = b.h.memory
    assert b.plug(block(0), 2) == ACK
    mem.write(block(0), b"\xa5" * (2 * BLOCK))
    assert b.unplug(block(1), 1) == ACK
    assert mem.read(block(0), BLOCK) == b"\xa5" * BLOCK  # the block still plugged keeps its data
    assert b.plug(block(1), 1) == ACK
    assert mem.read(block(1), BLOCK) == bytes(BLOCK)


def test_unplug_releases_host_pages(bench):
    b = bench(requested=8 * MiB)
    mem = b.h.memory
    assert b.plug(block(0), 4) == ACK
    mem.write(block(0), b"\x01" * (4 * BLOCK))
    touched = resident(b.region)
    assert touched >= 4 * BLOCK
    assert b.unplug(block(0), 4) == ACK
    assert resident(b.region) <= touched - 4 * BLOCK


def resident(region):
    """Bytes of the region's host mapping that are resident, from /proc/self/smaps."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0] if line else ""
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            if start <= region.host_addr < end:
                for follow in lines[i + 1:]:
                    if follow.startswith("Rss:"):
                        return int(follow.split()[1]) * 1024
    raise AssertionError("the region's mapping is not in /proc/self/smaps")


def test_unplug_all(bench):
    b = bench(requested=REGION)
    assert b.plug(block(0), 3) == ACK and b.plug(block(10), 5) == ACK and b.plug(block(255), 1) == ACK
    b.h.memory.write(block(10), b"x" * 100)
    b.dev.resize(0)
    assert b.request(UNPLUG_ALL)[0] == ACK
    cfg = b.config()
    assert cfg["plugged_size"] == 0
    assert b.h.memory.read(block(10), 100) == bytes(100)
    # With nothing plugged the usable region shrinks back to what the request needs.
    assert cfg["usable_region_size"] == 128 * MiB
    assert b.state(BASE, 64) == (ACK, UNPLUGGED)
    assert not any(b.dev.is_plugged(i) for i in range(256))
    assert b.request(UNPLUG_ALL)[0] == ACK  # nothing plugged: still fine


def test_unknown_and_short_requests_get_error(bench):
    b = bench(requested=8 * MiB)
    assert b.request(None, raw=struct.pack("<H22x", 7))[0] == ERROR
    assert b.request(None, raw=struct.pack("<H", PLUG))[0] == ERROR  # no range
    assert b.request(None, raw=b"\x00")[0] == ERROR
    assert b.config()["plugged_size"] == 0 and not b.h.needs_reset


def test_a_response_buffer_too_small_asks_for_a_reset(bench):
    b = bench(requested=8 * MiB)
    q = b.h.queues[0]
    q.add_chain([REQ.pack(PLUG, block(0), 1)], [4])
    b.h.driver.notify(0)
    deadline = time.monotonic() + 10  # a hang guard, not a performance check
    while not b.h.needs_reset:
        assert time.monotonic() < deadline, "the device neither answered nor asked for a reset"
        time.sleep(0.001)
    assert not b.dev.is_plugged(0)  # nothing happened without an answer


def test_resize_raises_a_config_change_and_grows_the_usable_region(bench):
    b = bench()
    before = b.h.interrupts
    b.h.driver.ack_interrupt(b.h.driver.interrupt_status())
    b.dev.resize(320 * MiB)
    assert b.h.interrupts == before + 1
    assert b.h.driver.interrupt_status() & INT_CONFIG
    cfg = b.config()
    assert cfg["requested_size"] == 320 * MiB and cfg["usable_region_size"] == REGION  # capped at the region
    b.h.driver.ack_interrupt(INT_CONFIG)
    b.dev.resize(320 * MiB)  # no change, no interrupt
    assert b.h.interrupts == before + 1
    b.dev.resize(0)
    assert b.config()["usable_region_size"] == REGION  # never shrinks while the driver may use it


@pytest.mark.parametrize("size,message", [
    (-2 * MiB, "cannot be negative"),
    (3 * MiB, "not a multiple of the block size 2M"),
    (REGION + BLOCK, "larger than the hotplug region (512M)"),
    ("1G", "whole number of bytes"),
    (True, "whole number of bytes"),
])
def test_bad_sizes_are_refused(bench, size, message):
    b = bench(requested=2 * MiB)
    with pytest.raises(ResizeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        b.dev.resize(size)
    assert b.config()["requested_size"] == 2 * MiB


def test_state_round_trip(bench, virtio_harness):
    b = bench(requested=64 * MiB)
    assert b.plug(block(0), 3) == ACK and b.plug(block(7), 2) == ACK
    state = b.dev.state()
    assert isinstance(state, VirtioMemState) and state.version == 1
    fresh = VirtioMem("mem0", addr=BASE, region_size=REGION, block_size=BLOCK)
    fresh.restore(state)
    assert fresh.state() == state
    assert fresh.status()["plugged_size"] == 10 * MiB
    assert [fresh.is_plugged(i) for i in range(10)] == [True] * 3 + [False] * 4 + [True] * 2 + [False]
    # And through the transport, as a snapshot would do it.
    tstate = b.h.transport.state()
    other = VirtioMem("mem0", addr=BASE, region_size=REGION, block_size=BLOCK)
    other_bench = virtio_harness(other)
    other_bench.transport.restore(tstate)
    assert other.state() == state


@pytest.mark.parametrize("change,message", [
    (dict(version=2), "version 2"),
    (dict(addr=BASE + 128 * MiB), "differs"),
    (dict(plugged=b"\xff" * 65), "does not fit"),
    (dict(requested_size=3 * MiB), "not a multiple"),
    (dict(usable_region_size=0), "inconsistent"),
])
def test_restore_refuses_foreign_states(bench, change, message):
    import attrs
    b = bench(requested=64 * MiB)
    assert b.plug(block(0), 1) == ACK
    bad = attrs.evolve(b.dev.state(), **change)
    with pytest.raises(ValueError, match=message):
        VirtioMem("mem0", addr=BASE, region_size=REGION, block_size=BLOCK).restore(bad)


# ----- memory manager -----

def test_reserve_hotplug_is_aligned_above_ram_and_4g_and_not_ram():
    with GuestMemory.create(64 * MiB) as mem:
        first = mem.reserve_hotplug(256 * MiB)
        second = mem.reserve_hotplug(128 * MiB, 1 * GiB)
        assert first == 4 * GiB and second == 5 * GiB
        assert mem.hotplug_base == first and mem.hotplug_size == second + 128 * MiB - first
        assert not mem.is_ram(first) and mem.size == 64 * MiB
        region = mem.add_region(second, 128 * MiB)
        assert region.kind == "hotplug" and mem.size == 64 * MiB  # boot RAM only
        with pytest.raises(Exception, match="not a positive multiple"):
            mem.reserve_hotplug(100)
        with pytest.raises(Exception, match="power of two"):
            mem.reserve_hotplug(4096, 3 * MiB)


def test_discard_is_dirty_tracked_and_punches_holes_in_shared_memory():
    with GuestMemory.create(64 * MiB, shared=True) as mem:
        base = mem.reserve_hotplug(128 * MiB)
        region = mem.add_region(base, 128 * MiB)
        mem.write(base, b"\x55" * (4 * MiB))
        import os
        assert os.fstat(region.fd).st_blocks * 512 >= 4 * MiB
        mem.start_dirty_log()
        mem.discard(base + 2 * MiB, 2 * MiB)
        assert mem.read(base + 2 * MiB, 4096) == bytes(4096)
        assert mem.read(base, 4096) == b"\x55" * 4096
        assert os.fstat(region.fd).st_blocks * 512 <= 2 * MiB + 64 * 1024  # the hole is really freed
        bitmap = int.from_bytes(mem.take_dirty_pages()[base], "little")
        assert bitmap == ((1 << 512) - 1) << 512  # exactly the 512 discarded pages
        with pytest.raises(Exception, match="not 4 KiB aligned"):
            mem.discard(base + 1, 4096)
        with pytest.raises(Exception, match="not in guest RAM"):
            mem.discard(base + 128 * MiB, 4096)


# ----- the TOML table -----

def load(tmp_path, text):
    from vmmkit.config import load_config
    path = tmp_path / "vm.toml"
    path.write_text(text)
    return load_config(path, device_kinds={"virtio-mem": VirtioMemSpec})


def test_table_defaults(tmp_path):
    spec = load(tmp_path, '[[device]]\nkind = "virtio-mem"\nregion = "1G"\n')
    opts = spec.devices[0].options
    assert (opts.region, opts.requested, opts.block_size) == (1 * GiB, 0, 2 * MiB)
    spec = load(tmp_path, '[[device]]\nkind = "virtio-mem"\nregion = "2G"\nrequested = "512M"\nblock_size = "4M"\n')
    opts = spec.devices[0].options
    assert (opts.region, opts.requested, opts.block_size) == (2 * GiB, 512 * MiB, 4 * MiB)
    assert size_or_zero(0) == 0 and size_or_zero("0") == 0


@pytest.mark.parametrize("body,message", [
    ('', "region: required key missing"),
    ('region = "100M"', "region: expected a multiple of 128M"),
    ('region = "0"', "region: expected"),
    ('region = "1G"\nrequested = "3M"', "requested: expected a multiple of block_size (2M), found 3M"),
    ('region = "1G"\nrequested = "2G"', "requested: expected at most the region (1G), found 2G"),
    ('region = "1G"\nrequested = -1', "requested: expected a positive size"),
    ('region = "1G"\nrequested = "lots"', "requested: expected"),
    ('region = "1G"\nblock_size = "3M"', "block_size: expected a power of two from 4K to 128M, found 3M"),
    ('region = "1G"\nblock_size = "1K"', "block_size: expected a power of two from 4K to 128M"),
    ('region = "1G"\nblock_size = "256M"', "block_size: expected a power of two from 4K to 128M"),
    ('region = "1G"\nsize = "1G"', "size"),
])
def test_table_mistakes_are_named(tmp_path, body, message):
    from vmmkit.schema import ConfigError
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f'[[device]]\nkind = "virtio-mem"\n{body}\n')
    assert message in str(info.value)


# ----- create() and the API -----

class FakeKvmVm:
    def __init__(self):
        self.slots = []

    def set_user_memory_region(self, slot, flags, gpa, size, host_addr):
        self.slots.append((slot, gpa, size))


class FakeVm:
    """What create() and the API handlers use of a Vm."""

    def __init__(self):
        self.memory = GuestMemory.create(256 * MiB)
        self.kvm_vm = FakeKvmVm()
        self.kernel_args = []
        self.devices = {}
        self.attached = []

    def add_virtio_device(self, device):
        self.attached.append(device)


def test_create_reserves_maps_and_registers_the_region_and_asks_for_onlining(tmp_path):
    from vmmkit_plugins.virtio_mem import create
    spec = load(tmp_path, '[[device]]\nkind = "virtio-mem"\nregion = "1G"\nrequested = "128M"\n'
                          '[[device]]\nkind = "virtio-mem"\nregion = "256M"\n')
    vm = FakeVm()
    try:
        a = create(vm, spec.devices[0])
        b = create(vm, spec.devices[1])
        assert vm.attached == [a, b]
        assert (a.addr, a.region_size, b.addr) == (4 * GiB, 1 * GiB, 5 * GiB)
        assert [s[1:] for s in vm.kvm_vm.slots] == [(4 * GiB, 1 * GiB), (5 * GiB, 256 * MiB)]
        assert vm.kernel_args == ["memhp_default_state=online_movable"]
        assert a.status()["requested_size"] == 128 * MiB
        assert vm.memory.size == 256 * MiB  # boot RAM, what the e820 map is built from
    finally:
        vm.memory.close()


class Req:
    def __init__(self, body):
        self.body = json.dumps(body).encode()
        self.method, self.path = "PUT", "/vm/virtio-mem/resize"

    def json(self):
        return json.loads(self.body)


def api_vm(*sizes):
    vm = FakeVm()
    for i, region in enumerate(sizes):
        vm.devices[f"mem{i}"] = VirtioMem(f"mem{i}", addr=BASE + i * GiB, region_size=region)
    vm.devices["blk0"] = object()
    return vm


@pytest.mark.parametrize("body,status,message", [
    ({"size": -1}, 400, "cannot be negative"),
    ({"size": "-1G"}, 400, "cannot be negative"),
    ({"size": "3M"}, 400, "not a multiple of the block size 2M"),
    ({"size": "2G"}, 400, "larger than the hotplug region (1G)"),
    ({"size": "12Q"}, 400, "unknown unit"),
    ({"size": 1.5}, 400, "number of bytes"),
    ({"size": True}, 400, "number of bytes"),
    ({}, 400, "\"size\""),
    ({"size": "1G", "extra": 1}, 400, "unknown key"),
    ({"size": "1G", "id": "nope"}, 404, "no virtio-mem device 'nope'"),
])
def test_api_refuses_bad_resizes_clearly(body, status, message):
    from vmmkit.api import ApiError
    from vmmkit_plugins.virtio_mem.api import put_resize
    vm = api_vm(1 * GiB)
    try:
        with pytest.raises(ApiError) as info:
            put_resize(vm, Req(body))
        assert info.value.status == status and message in str(info.value)
        assert vm.devices["mem0"].status()["requested_size"] == 0
    finally:
        vm.memory.close()


def test_api_resize_answers_what_is_plugged():
    from vmmkit_plugins.virtio_mem.api import get_status, put_resize
    vm = api_vm(1 * GiB)
    try:
        answer = put_resize(vm, Req({"size": "512M"}))
        assert answer["requested_size"] == 512 * MiB and answer["plugged_size"] == 0
        assert put_resize(vm, Req({"size": 0}))["requested_size"] == 0
        assert put_resize(vm, Req({"size": "0"}))["requested_size"] == 0
        assert get_status(vm, None) == {"devices": [vm.devices["mem0"].status()]}
    finally:
        vm.memory.close()


def test_api_with_several_or_no_devices():
    from vmmkit.api import ApiError
    from vmmkit_plugins.virtio_mem.api import put_resize
    vm = api_vm(1 * GiB, 128 * MiB)
    try:
        with pytest.raises(ApiError, match="2 virtio-mem devices"):
            put_resize(vm, Req({"size": "128M"}))
        assert put_resize(vm, Req({"size": "128M", "id": "mem1"}))["requested_size"] == 128 * MiB
    finally:
        vm.memory.close()
    vm = api_vm()
    try:
        with pytest.raises(ApiError) as info:
            put_resize(vm, Req({"size": "128M"}))
        assert info.value.status == 404 and "no virtio-mem device" in str(info.value)
    finally:
        vm.memory.close()


def test_routes_and_ctl_commands_are_contributed():
    import argparse
    from vmmkit.plugins import Plugins
    plugins = Plugins()
    assert "virtio-mem" in plugins.kinds
    routes = [r for result in plugins.pm.hook.vmmkit_api_routes() for r in result]
    assert ("PUT", "/vm/virtio-mem/resize") in [(m, p) for m, p, _ in routes]
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    plugins.call("vmmkit_ctl_commands", subparsers=sub)
    args = parser.parse_args(["resize-memory", "1G", "--wait", "5"])
    assert args.size == "1G" and args.wait == 5.0


def test_ctl_resize_memory_through_a_real_api_server(tmp_path, bench, capsys):
    """`vmmkit ctl resize-memory` against the real server; a thread plugs as the guest's driver would."""
    import threading
    from vmmkit.api import ApiServer, CORE_ROUTES
    from vmmkit.cli import main
    from vmmkit_plugins.virtio_mem.api import ROUTES
    b = bench()
    vm = api_vm()
    vm.devices = {"mem0": b.dev}
    path = str(tmp_path / "api.sock")
    try:
        with ApiServer(path, list(CORE_ROUTES) + list(ROUTES)).start(vm):
            assert main(["ctl", "--api-sock", path, "resize-memory", "8M"]) == 0
            out = capsys.readouterr().out
            assert out == "mem0: requested 8M, the guest has plugged 0 so far (region 512M)\n"

            def driver():
                for i in range(4):
                    assert b.plug(block(i), 1) == ACK
            t = threading.Thread(target=driver)
            t.start()
            assert main(["ctl", "--api-sock", path, "resize-memory", "8M", "--wait", "30", "--json"]) == 0
            t.join()
            assert json.loads(capsys.readouterr().out)["plugged_size"] == 8 * MiB
            assert main(["ctl", "--api-sock", path, "resize-memory", "7M"]) == 1
            assert "not a multiple of the block size 2M" in capsys.readouterr().err
            assert main(["ctl", "--api-sock", path, "memory"]) == 0
            assert "plugged 8M" in capsys.readouterr().out
            # Nobody unplugs: --wait gives up and says so.
            assert main(["ctl", "--api-sock", path, "resize-memory", "0", "--wait", "0.2"]) == 1
            assert "did not reach 0" in capsys.readouterr().out
    finally:
        vm.memory.close()


def test_kernel_args_from_devices_come_before_the_users_cmdline():
    from vmmkit.config import VmSpec
    from vmmkit.vm import Vm
    vm = Vm(VmSpec.build(machine={"vcpus": 1, "memory": "256M"}, boot={"cmdline": "memhp_default_state=offline"}))
    try:
        vm.kernel_args.append("memhp_default_state=online_movable")
        words = vm.kernel_cmdline().split()
        # The user's [boot] cmdline is later, so it wins (the kernel takes the last value).
        assert words.index("memhp_default_state=online_movable") < words.index("memhp_default_state=offline")
    finally:
        vm.close()
