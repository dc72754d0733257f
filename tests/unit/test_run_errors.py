"""`vmmkit run` refuses bad input with one clear line and a non-zero status, before touching KVM."""

import subprocess
import sys

import pytest

from vmmkit.hostkvm import kvm_status

VMMKIT = [sys.executable, "-m", "vmmkit"]


def run(tmp_path, text, *extra):
    path = tmp_path / "vm.toml"
    path.write_text(text)
    proc = subprocess.run(VMMKIT + ["run", str(path), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=60)
    return proc, str(path)


@pytest.mark.parametrize("text,expected", [
    ("[machine]\nvcpu = 2\n", ["[machine] unknown key 'vcpu'", "known keys: halt_poll_ns, memory, memory_file, on_reboot, shared, vcpus", "did you mean 'vcpus'"]),
    ("[machine]\nmemory = \"lots\"\n", ["[machine] memory", "expected a size", "'lots'"]),
    ("[machine]\nvcpus = 0\n", ["[machine] vcpus", "from 1 to 255", "0"]),
    ("[machine]\nvcpus = \"two\"\n", ["[machine] vcpus", "'two'"]),
    ("[machin]\nvcpus = 2\n", ["unknown table [machin]", "did you mean [machine]"]),
    ("[machine\n", ["invalid TOML", "line 1"]),
    ("[[device]]\nkind = \"nope\"\n", ["unknown device kind 'nope'"]),
    ("[boot]\nkernel = \"missing-bzImage\"\n", ["[boot] kernel", "missing-bzImage"]),
])
def test_bad_config_is_one_clear_error(tmp_path, text, expected):
    proc, path = run(tmp_path, text)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"vmmkit: error: {path}")
    for part in expected:
        assert part in proc.stderr, (part, proc.stderr)
    assert "Traceback" not in proc.stderr


def test_a_file_that_is_not_a_kernel(tmp_path):
    (tmp_path / "notakernel").write_bytes(b"#!/bin/sh\necho hi\n" * 100)
    proc, _ = run(tmp_path, '[boot]\nkernel = "notakernel"\n')
    assert proc.returncode == 2
    assert "notakernel" in proc.stderr and "not a Linux kernel" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_more_memory_than_the_host_has(tmp_path):
    proc, _ = run(tmp_path, '[machine]\nmemory = "64T"\n')
    assert proc.returncode == 2
    assert "cannot allocate" in proc.stderr and "guest memory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_file(tmp_path):
    proc = subprocess.run(VMMKIT + ["run", str(tmp_path / "nope.toml")], stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 2
    assert "nope.toml" in proc.stderr and "Traceback" not in proc.stderr


def fake_root(tmp_path, *, pvm=False, flags="fpu sse2"):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    if pvm:
        (tmp_path / "sys" / "module" / "kvm_pvm").mkdir(parents=True)
    dev = tmp_path / "kvm"
    dev.write_text("")
    return str(tmp_path), str(dev)


def test_pvm_host_is_named_and_points_at_the_lab(tmp_path):
    root, dev = fake_root(tmp_path, pvm=True, flags="fpu vmx")
    status = kvm_status(dev, root=root)
    assert not status.usable and status.kind == "pvm"
    assert "PVM" in status.reason and "vmmkit lab" in status.reason


def test_host_without_virtualization_flags(tmp_path):
    root, dev = fake_root(tmp_path, flags="fpu sse2")
    status = kvm_status(dev, root=root)
    assert not status.usable and status.kind == "no-virt"


def test_hardware_kvm_is_usable(tmp_path):
    root, dev = fake_root(tmp_path, flags="fpu svm")
    assert kvm_status(dev, root=root).usable


def test_missing_dev_kvm(tmp_path):
    root, _ = fake_root(tmp_path, flags="fpu vmx")
    status = kvm_status(str(tmp_path / "absent"), root=root)
    assert status.kind == "missing" and "does not exist" in status.reason
