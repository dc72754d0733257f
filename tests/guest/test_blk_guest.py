"""virtio-blk on the real default guest: what the guest writes is on the host disk, and the reverse."""

import ast
import hashlib
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.guest

MiB = 1 << 20


def image(tmp_path, name="disk.img", size=64 * MiB, fill=None):
    path = tmp_path / name
    with open(path, "wb") as f:
        if fill is not None:
            f.write(fill)
        f.truncate(size)
    return str(path)


def sha256(path, offset=0, length=None):
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length) if length is not None else f.read()).hexdigest()


def blk(path, **options):
    lines = ["[[device]]", 'kind = "blk"', f'path = "{path}"']
    for key, value in options.items():
        lines.append(f"{key} = {value!r}".replace("'", '"') if isinstance(value, str) else
                     f"{key} = {str(value).lower()}")
    return "\n".join(lines) + "\n"


def test_native_engine_serves_the_guest_from_its_c_loop(tmp_path):
    # In a VM the native engine serves in C (native/virtio_serve.c) and raises the interrupts
    # there, and the vCPU answers InterruptStatus/ACK in C; the counters logged at exit show it.
    # Then eight readers at once, each of its own MiB: requests overlap, and the loop may hold
    # an interrupt back for more completions (in the lab, where they take milliseconds). A lost
    # interrupt would leave a reader waiting; a wrong answer would change a hash.
    data = os.urandom(8 * MiB)
    disk = image(tmp_path, fill=data)
    config = tmp_path / "vm.toml"
    config.write_text(blk(disk))
    log = tmp_path / "blk.log"
    wrapper = ("import logging, sys; from vmmkit.cli import main; h = logging.FileHandler(sys.argv.pop(1)); "
               "[(logging.getLogger(n).addHandler(h), logging.getLogger(n).setLevel(logging.DEBUG)) "
               "for n in ('vmmkit.blk', 'vmmkit.vm')]; sys.exit(main())")
    readers = ("for i in 0 1 2 3 4 5 6 7; do (dd if=/dev/vda bs=4k skip=$((i*256)) count=256 iflag=direct "
               "2>/dev/null | sha256sum >/tmp/h$i) & done; wait; cat /tmp/h0 /tmp/h1 /tmp/h2 /tmp/h3 /tmp/h4 "
               "/tmp/h5 /tmp/h6 /tmp/h7")
    proc = subprocess.run([sys.executable, "-c", wrapper, str(log), "run", str(config), "--exec",
                           "dd if=/dev/vda of=/dev/null bs=4k count=3000 iflag=direct 2>/dev/null && echo read; "
                           + readers],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode().split()
    assert out[0] == "read", out
    assert [w for w in out[1:] if w != "-"] == [hashlib.sha256(data[i * MiB:(i + 1) * MiB]).hexdigest()
                                                for i in range(8)]
    lines = [line for line in log.read_text().splitlines() if "native engine stopped" in line]
    assert lines, log.read_text()
    stats = ast.literal_eval(lines[-1].split("; ", 1)[1])
    assert stats["requests"] >= 3000 + 8 * 256
    assert stats["max_inflight"] >= 2  # the readers' requests overlapped
    assert stats["serve_interrupts"] > 0
    assert stats["inflight"] == 0
    # The guest reads and acknowledges InterruptStatus for each interrupt: the vCPU answers in C.
    fast = [line for line in log.read_text().splitlines() if "answered in C" in line]
    assert fast and int(fast[-1].rsplit(": ", 1)[1]) > 0, log.read_text()


@pytest.mark.parametrize("engine", ["native", "python"])
def test_guest_writes_reach_the_host_and_host_data_reaches_the_guest(vmmkit_run, tmp_path, engine):
    host_data = os.urandom(4 * MiB)
    disk = image(tmp_path, fill=bytes(16 * MiB) + host_data)
    # The guest writes 8 MiB of a pattern the host can recompute, then reads back
    # what the host put at 16 MiB; direct I/O so the guest's page cache cannot answer.
    proc = vmmkit_run.exec(blk(disk, engine=engine), "cat /sys/block/vda/size; "
                       "yes vmmkit-pattern | head -c 8388608 | dd of=/dev/vda bs=1M oflag=direct 2>/dev/null; "
                       "dd if=/dev/vda bs=1M skip=16 count=4 iflag=direct 2>/dev/null | sha256sum")
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().split("\n")
    assert lines[0] == str(64 * MiB // 512)
    assert lines[1].split()[0] == hashlib.sha256(host_data).hexdigest()
    pattern = (b"vmmkit-pattern\n" * (8 * MiB // 15 + 1))[:8 * MiB]
    assert sha256(disk, 0, 8 * MiB) == hashlib.sha256(pattern).hexdigest()


def test_read_only_disk_refuses_guest_writes_and_stays_unchanged(vmmkit_run, tmp_path):
    disk = image(tmp_path, fill=os.urandom(MiB))
    before = sha256(disk)
    proc = vmmkit_run.exec(blk(disk, read_only=True), "cat /sys/block/vda/ro; "
                       "if echo x | dd of=/dev/vda bs=512 count=1 conv=sync oflag=direct 2>/dev/null; "
                       "then echo write-ok; else echo write-failed; fi")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split() == ["1", "write-failed"]
    assert sha256(disk) == before


def test_discard_from_the_guest_frees_host_blocks(vmmkit_run, tmp_path):
    disk = image(tmp_path, size=32 * MiB, fill=os.urandom(32 * MiB))
    allocated_before = os.stat(disk).st_blocks * 512
    proc = vmmkit_run.exec(blk(disk), "blkdiscard /dev/vda && echo discarded")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "discarded" in proc.stdout.decode()
    assert allocated_before >= 32 * MiB
    assert os.stat(disk).st_blocks * 512 < allocated_before // 4
    with open(disk, "rb") as f:
        assert f.read(MiB) == bytes(MiB)


def test_two_disks_with_serials_and_sizes(vmmkit_run, tmp_path):
    first = image(tmp_path, "a.img", 8 * MiB)
    second = image(tmp_path, "b.img", 24 * MiB)
    config = blk(first, serial="data0") + blk(second, serial="scratch-disk")
    proc = vmmkit_run.exec(config, "for d in vda vdb; do echo $d $(cat /sys/block/$d/size) $(cat /sys/block/$d/serial) "
                               "$(cat /sys/block/$d/queue/scheduler); done; "
                               "echo second | dd of=/dev/vdb bs=512 conv=sync oflag=direct 2>/dev/null")
    assert proc.returncode == 0, proc.stderr.decode()
    lines = [line.split() for line in proc.stdout.decode().splitlines()]
    assert [line[:3] for line in lines] == [["vda", str(8 * MiB // 512), "data0"],
                                            ["vdb", str(24 * MiB // 512), "scratch-disk"]]
    # The default guest's init takes the I/O scheduler off its virtio disks (the selected one is in brackets).
    assert all("[none]" in line[3:] for line in lines), lines
    with open(second, "rb") as f:
        assert f.read(7) == b"second\n"
    with open(first, "rb") as f:
        assert f.read(MiB) == bytes(MiB)


@pytest.mark.parametrize("problem", ["missing", "odd-size"])
def test_bad_disk_images_are_refused_before_boot(vmmkit_run, tmp_path, problem):
    disk = str(tmp_path / "disk.img")
    if problem == "odd-size":
        with open(disk, "wb") as f:
            f.write(b"x" * 1000)
    proc = vmmkit_run.exec(blk(disk), "true", timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert disk in err
    assert ("not found" if problem == "missing" else "multiple of 512") in err
    assert "Linux version" not in proc.stdout.decode()


def test_boots_from_the_ext4_root_image(vmmkit_run, tmp_path):
    from vmmkit.guest import build as guest_build
    import shutil
    import subprocess

    rootfs = guest_build.show().rootfs
    assert rootfs, "the default guest has no rootfs.ext4"
    disk = str(tmp_path / "root.ext4")
    shutil.copyfile(rootfs, disk)
    config = blk(disk) + '[boot]\ncmdline = "root=/dev/vda"\n'
    proc = vmmkit_run.exec(config, "grep ' / ' /proc/mounts; test -e /etc/vmmkit/initramfs || echo on-disk; "
                               "echo written-in-the-guest > /root/note")
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode().splitlines()
    assert out[0].split()[:3] == ["/dev/vda", "/", "ext4"]
    assert out[1] == "on-disk"
    # The file the guest wrote is in the image after the VM stopped. The guest's sync may leave
    # its metadata in ext4's journal only (the checkpoint is lazy): replay it, as a mount would,
    # before debugfs (which reads the blocks as they are) looks.
    env = {"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"}
    fsck = subprocess.run(["e2fsck", "-fy", disk], capture_output=True, env=env)
    assert fsck.returncode in (0, 1), fsck.stdout.decode() + fsck.stderr.decode()  # 1: it replayed or fixed
    cat = subprocess.run(["debugfs", "-R", "cat /root/note", disk], capture_output=True, env=env)
    assert cat.stdout == b"written-in-the-guest\n", cat.stderr.decode()
