"""KVM's binary statistics files and the vCPU activity devices read from them (vmmkit/kvm/stats.py), no KVM."""

from __future__ import annotations

import os
import struct

import pytest

from vmmkit.kvm.stats import KvmStats, VcpuActivity

NAME_SIZE = 48


def stats_file(tmp_path, values: dict, name="vcpu-0"):
    """A file laid out as KVM_GET_STATS_FD's (header, descriptors, data); returns an fd open on it."""
    header_size, desc_size = 24, 16 + NAME_SIZE
    desc_off = header_size + NAME_SIZE
    data_off = desc_off + desc_size * len(values)
    out = bytearray(struct.pack("<6I", 0, NAME_SIZE, len(values), header_size, desc_off, data_off))
    out += name.encode().ljust(NAME_SIZE, b"\0")
    for i, key in enumerate(values):
        out += struct.pack("<IhHII", 0, 0, 1, 8 * i, 0) + key.encode().ljust(NAME_SIZE, b"\0")
    for value in values.values():
        out += struct.pack("<Q", value)
    path = tmp_path / f"{name}.stats"
    path.write_bytes(bytes(out))
    return os.open(path, os.O_RDWR)


def set_stat(stats: KvmStats, name: str, value: int) -> None:
    os.pwrite(stats.fd, struct.pack("<Q", value), stats.offsets[name])


def test_stats_are_found_by_name_and_read_live(tmp_path):
    stats = KvmStats(stats_file(tmp_path, {"halt_wakeup": 5, "blocking": 0, "halt_exits": 17}))
    try:
        assert stats.read("halt_exits") == 17 and stats.read("blocking") == 0
        set_stat(stats, "blocking", 1)
        assert stats.read("blocking") == 1
    finally:
        stats.close()


def test_a_malformed_header_is_refused(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(struct.pack("<6I", 0, 0, 3, 24, 72, 200))
    with pytest.raises(ValueError, match="implausible"):
        KvmStats(os.open(path, os.O_RDONLY))


def test_activity_collects_every_vcpu_and_their_blocking_flags(tmp_path):
    activity = VcpuActivity()
    assert not activity.known and len(activity) == 0
    for i in range(2):
        activity.add_stats(KvmStats(stats_file(tmp_path, {"blocking": i, "halt_exits": 3}, f"vcpu-{i}")))
    assert activity.known and len(activity) == 2
    assert activity.blocking() == [False, True]
    assert list(activity.c_fds) == [s.fd for s in activity._stats]
    assert activity.blocking_offset != activity.halts_offset
    activity.close()
    assert not activity.known


def test_activity_without_the_statistics_is_unknown_for_good(tmp_path):
    activity = VcpuActivity()
    activity.add_stats(KvmStats(stats_file(tmp_path, {"blocking": 0, "halt_exits": 0}, "vcpu-0")))
    activity.add_stats(KvmStats(stats_file(tmp_path, {"halt_exits": 0}, "vcpu-1")))  # an older kernel
    assert not activity.known and len(activity) == 0
    activity.add_stats(KvmStats(stats_file(tmp_path, {"blocking": 0, "halt_exits": 0}, "vcpu-2")))
    assert not activity.known


def test_activity_of_a_descriptor_that_is_no_kvm_fd_is_unknown(tmp_path):
    activity = VcpuActivity()
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        activity.add(fd)
    finally:
        os.close(fd)
    assert not activity.known
