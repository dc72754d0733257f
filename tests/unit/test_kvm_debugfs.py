"""vmmkit.testing.kvm_debugfs over a stand-in debugfs directory: counters, and the emulation-livelock sign."""

import pytest

from vmmkit.testing import kvm_debugfs


@pytest.fixture
def fake_kvm(tmp_path, monkeypatch):
    """A debugfs kvm directory with one VM of process 4242; returns a function that sets its counters."""
    vm = tmp_path / "4242-11"
    vm.mkdir()
    monkeypatch.setattr(kvm_debugfs, "KVM_DIR", str(tmp_path))

    def put(**values):
        for name, value in values.items():
            (vm / name).write_text(f"{value}\n")
    put(exits=100, insn_emulation=10, pf_guest=0)
    return put


def growing(monkeypatch, put, **after):
    """Have the sampled second end with the counters at *after*."""
    monkeypatch.setattr(kvm_debugfs.time, "sleep", lambda _s: put(**after))


def test_counters_are_read_and_summed_and_missing_ones_are_zero(fake_kvm, tmp_path):
    other = tmp_path / "4242-12"
    other.mkdir()
    (other / "exits").write_text("5\n")
    assert kvm_debugfs.counters(4242, ["exits", "insn_emulation", "no_such"]) == \
        {"exits": 105, "insn_emulation": 10, "no_such": 0}
    with pytest.raises(RuntimeError, match="no KVM VM of process 1"):
        kvm_debugfs.counters(1, ["exits"])


def test_a_vcpu_faulting_in_the_emulator_again_and_again_is_a_livelock(fake_kvm, monkeypatch):
    growing(monkeypatch, fake_kvm, exits=40100, insn_emulation=40010, pf_guest=39990)
    found = kvm_debugfs.emulation_livelock(4242)
    assert found is not None and kvm_debugfs.EMULATION_LIVELOCK in found
    assert "40000 instructions" in found and "39990 page faults" in found


@pytest.mark.parametrize("after", [
    dict(exits=40100, insn_emulation=40010, pf_guest=0),   # a guest busy with MMIO: emulation, no faults
    dict(exits=150, insn_emulation=20, pf_guest=10),       # a few emulations: not a livelock
    dict(exits=100, insn_emulation=10, pf_guest=0),        # an idle guest
])
def test_a_guest_running_or_waiting_is_not_a_livelock(fake_kvm, monkeypatch, after):
    growing(monkeypatch, fake_kvm, **after)
    assert kvm_debugfs.emulation_livelock(4242) is None


def test_no_vm_for_the_process_is_not_a_livelock(fake_kvm, monkeypatch):
    monkeypatch.setattr(kvm_debugfs.time, "sleep", lambda _s: None)
    assert kvm_debugfs.emulation_livelock(1) is None


def test_the_pytest_plugin_reruns_a_livelocked_guest_but_not_a_plain_hang(fake_kvm, monkeypatch):
    from vmmkit.testing.pytest_plugin import _lab_crash
    growing(monkeypatch, fake_kvm, exits=40100, insn_emulation=40010, pf_guest=39990)
    assert _lab_crash("no bytes for 20s on a stream; " + kvm_debugfs.emulation_livelock(4242))
    assert not _lab_crash("no bytes for 300s on a stream")


def test_a_mount_that_cannot_run_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(kvm_debugfs, "KVM_DIR", str(tmp_path / "absent"))

    def no_mount(*args, **kwargs):
        raise FileNotFoundError("mount")
    monkeypatch.setattr(kvm_debugfs.subprocess, "run", no_mount)
    assert "cannot mount debugfs" in kvm_debugfs.unavailable()
    assert kvm_debugfs.emulation_livelock(4242) is None
