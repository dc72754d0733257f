"""The benchmarks' reading of KVM's per-VM counters at the guest's marks (benchmarks/kvmstats.py)."""

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import blk  # noqa: E402
import kvmstats  # noqa: E402


class FakeCounters:
    """A reader that hands out growing counters and remembers which pid it was asked for."""

    def __init__(self):
        self.calls = []

    def __call__(self, pid):
        self.calls.append(pid)
        n = len(self.calls)
        return {k: n * 100 + i for i, k in enumerate(kvmstats.FIELDS)}


def test_marks_are_read_when_their_line_is_complete_and_forwarded():
    reader, sink = FakeCounters(), []

    class Sink:
        def write(self, data):
            sink.append(data)

    w = kvmstats.MarkWatcher(Sink(), pid=42, reader=reader)
    w.write(b"fio output\n@@kvm seq")
    assert reader.calls == []  # the line is not complete yet
    w.write(b"read-start 1 2 3\r\n@@kvm x-end\nplain @@kvm not-a-mark\n")
    assert reader.calls == [42, 42]
    assert set(w.marks) == {"seqread-start", "x-end"}
    assert w.marks["seqread-start"][1] == "1 2 3"
    assert b"".join(sink) == b"fio output\n@@kvm seqread-start 1 2 3\r\n@@kvm x-end\nplain @@kvm not-a-mark\n"


def test_no_reader_or_no_pid_passes_marks_over():
    w = kvmstats.MarkWatcher(reader=None, pid=1)
    w.write(b"@@kvm a-start\n")
    assert w.marks == {}
    reader = FakeCounters()
    w = kvmstats.MarkWatcher(reader=reader)
    w.write(b"@@kvm a-start\n")
    assert w.marks == {} and reader.calls == []


def test_job_counters_divide_the_deltas_by_the_disks_requests():
    before = dict.fromkeys(kvmstats.FIELDS, 1000)
    after = {k: 1000 + 300 * (i + 1) for i, k in enumerate(kvmstats.FIELDS)}
    w = kvmstats.MarkWatcher(reader=None)
    # /sys/block/vda/stat: reads completed is field 1, writes completed field 5.
    w.marks["randwrite-start"] = (before, "10 0 80 5 200 0 1600 9 0 4 4")
    w.marks["randwrite-end"] = (after, "10 0 80 5 500 0 4000 30 0 9 9")
    got = blk.job_counters(w)
    assert list(got) == ["randwrite"]  # jobs without both marks are left out
    assert got["randwrite"]["requests"] == 300
    assert got["randwrite"]["exits"] == pytest.approx(1.0)
    assert got["randwrite"]["mmio_exits"] == pytest.approx(2.0)


def test_the_guest_command_marks_every_job_and_fits_the_kernel_command_line():
    from vmmkit.guest.execcmd import exec_param
    cmd = blk.guest_command(8)
    for name, *_ in blk.JOBS:
        assert f"m {name}-start; j --name={name} " in cmd and f"m {name}-end" in cmd
    exec_param(cmd)  # raises when too long


def test_delta_subtracts_every_field():
    a = {k: 10 for k in kvmstats.FIELDS}
    b = {k: 3 for k in kvmstats.FIELDS}
    assert kvmstats.delta(a, b) == {k: 7 for k in kvmstats.FIELDS}


def test_thread_times_read_the_fields_after_a_name_with_spaces():
    # pid (comm) state, then fields 4..52; utime=14, stime=15, guest_time=43 (1-based).
    rest = [str(i) for i in range(4, 53)]
    rest[14 - 4], rest[15 - 4], rest[43 - 4] = "700", "50", "600"
    line = "1234 (CPU 0/KVM) R " + " ".join(rest)
    assert kvmstats.thread_times(line) == (750, 600)


def test_cpu_times_count_this_process_and_busy_shares():
    before = kvmstats.cpu_times(os.getpid())
    assert set(before) == set(kvmstats.CPU_FIELDS)
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn CPU in a thread that never runs guest code
        pass
    after = kvmstats.cpu_times(os.getpid())
    d = kvmstats.delta(after, before)
    assert d["guest_ms"] == 0 and d["vcpu_host_ms"] == 0
    assert d["vmm_ms"] >= 200 and d["wall_ms"] >= 250
    vcpu, others = kvmstats.busy(d)
    assert vcpu == 0 and 0.5 < others <= 1.5


def test_job_counters_give_the_cpu_shares_when_the_readings_have_them():
    cpu0 = {"wall_ms": 1000, "guest_ms": 0, "vcpu_host_ms": 0, "vmm_ms": 0}
    cpu1 = {"wall_ms": 3000, "guest_ms": 1500, "vcpu_host_ms": 300, "vmm_ms": 400}
    w = kvmstats.MarkWatcher(reader=None)
    w.marks["seqread-start"] = ({**dict.fromkeys(kvmstats.FIELDS, 0), **cpu0}, "0 0 0 0 0 0 0 0 0 0 0")
    w.marks["seqread-end"] = ({**dict.fromkeys(kvmstats.FIELDS, 0), **cpu1}, "100 0 0 0 0 0 0 0 0 0 0")
    got = blk.job_counters(w)["seqread"]
    assert got["vcpu_busy"] == pytest.approx(0.9) and got["vmm_busy"] == pytest.approx(0.2)
    assert got["guest_ms"] == pytest.approx(15.0) and got["wall_ms"] == pytest.approx(20.0)


def test_a_silent_hung_run_is_stopped_at_its_timeout():
    """A benchmark run whose guest hangs without a word is killed at the deadline, its output kept."""
    import subprocess
    proc = subprocess.Popen(["sh", "-c", "echo booted; exec sleep 60"], stdout=subprocess.PIPE)
    seen = bytearray()

    class Sink:
        def write(self, data):
            seen.extend(data)
            return len(data)

    out, timed_out = blk.read_output(proc, 1.0, Sink())
    assert timed_out and out == b"booted\n" and bytes(seen) == out
    assert proc.returncode == -9  # killed, not waited for


def test_a_run_that_ends_keeps_its_status():
    import subprocess
    proc = subprocess.Popen(["sh", "-c", "echo done; exit 3"], stdout=subprocess.PIPE)

    class Sink:
        def write(self, data):
            return len(data)

    out, timed_out = blk.read_output(proc, 30.0, Sink())
    assert not timed_out and out == b"done\n" and proc.returncode == 3
