"""`vmmkit lab` itself: started from the host, as a user would."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.lab

VMMKIT = [sys.executable, "-m", "vmmkit"]


def lab(*argv, **kw):
    return subprocess.run(VMMKIT + ["lab", *kw.pop("opts", []), "--", *argv],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600, **kw)


def test_kvm_in_the_lab_is_real_and_creates_a_vm():
    # KVM_GET_API_VERSION answers 12 and KVM_CREATE_VM gives a VM fd, through vmmkit's own bindings.
    script = textwrap.dedent("""
        import os
        from vmmkit._native import lib
        fd = os.open("/dev/kvm", os.O_RDWR)
        print("api", lib.vmm_ioctl_val(fd, lib.KVM_GET_API_VERSION, 0))
        vm = lib.vmm_ioctl_val(fd, lib.KVM_CREATE_VM, 0)
        print("vm", vm > 0)
        print("svm", "svm" in open("/proc/cpuinfo").read())
    """)
    proc = lab(sys.executable, "-c", script)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split("\n")[:3] == ["api 12", "vm True", "svm True"]


def test_status_stdout_and_stderr_come_back_whole():
    proc = lab("sh", "-c", "seq 1 2000; echo to-stderr >&2; printf 'tail-without-newline'; exit 42")
    assert proc.returncode == 42
    expected = "".join(f"{i}\n" for i in range(1, 2001)) + "tail-without-newline"
    assert proc.stdout.decode() == expected
    assert "to-stderr\n" in proc.stderr.decode()


def test_environment_and_working_directory_follow_the_caller(tmp_path):
    env = dict(os.environ, VMMKIT_TEST_VALUE="it's \"quoted\" $HOME")
    proc = lab("sh", "-c", 'pwd; printf "%s\\n" "$VMMKIT_TEST_VALUE"; echo "$VMMKIT_IN_LAB"',
               cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().splitlines() == [str(tmp_path), "it's \"quoted\" $HOME", "1"]


def test_shared_directory_brings_files_back_and_the_rest_stays_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    untouched = tmp_path / "untouched.txt"
    untouched.write_text("host")
    proc = lab("sh", "-c", f"echo from-the-lab > {out}/result.txt; echo changed > {untouched}",
               opts=["--share", str(out)])
    assert proc.returncode == 0, proc.stderr.decode()
    assert (out / "result.txt").read_text() == "from-the-lab\n"
    assert untouched.read_text() == "host"  # the overlay absorbed the write


def test_bad_share_is_a_clear_error(tmp_path):
    proc = lab("true", opts=["--share", str(tmp_path / "missing")])
    assert proc.returncode != 0
    assert "not a directory" in proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()


def test_scratch_disk_is_a_real_ext4_that_takes_direct_io():
    # The overlay's tmpfs refuses O_DIRECT; the scratch disk is where direct I/O works.
    proc = lab("sh", "-c", "dd if=/dev/zero of=/scratch/f bs=1M count=8 oflag=direct && stat -f -c %T /scratch",
               opts=["--scratch", "256M"])
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == "ext2/ext3"  # stat -f names ext4 so
    assert "8388608 bytes" in proc.stderr.decode()  # dd's summary


def test_bad_scratch_size_is_a_clear_error():
    proc = lab("true", opts=["--scratch", "lots"])
    assert proc.returncode != 0
    assert "bad size" in proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()
