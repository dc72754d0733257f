"""`vmmkit guest build` and `guest show` on the host (the guest's insides are tested in the lab)."""

import json
import os
import subprocess
import sys

import pytest

from vmmkit.guest import build, rootfs
from vmmkit.guest.cpio import read_cpio

pytestmark = pytest.mark.lab

VMMKIT = [sys.executable, "-m", "vmmkit"]


def run(*args):
    return subprocess.run(VMMKIT + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=900)


def test_build_is_idempotent_and_show_reports_it():
    first = run("guest", "build", "--with", "socat")
    assert first.returncode == 0, first.stderr
    before = os.stat(build.show().initrd).st_mtime_ns
    debs = set(os.listdir(os.path.join(os.path.dirname(build.guest_dir()), "debs")))
    second = run("guest", "build", "--with", "socat")
    assert second.returncode == 0, second.stderr
    assert "downloading" not in second.stderr and "building" not in second.stderr
    assert os.stat(build.show().initrd).st_mtime_ns == before
    assert set(os.listdir(os.path.join(os.path.dirname(build.guest_dir()), "debs"))) == debs
    shown = json.loads(run("guest", "show", "--json").stdout)
    assert shown["built"] is True
    assert shown["release"].endswith("-cloud-amd64")
    assert "socat" in shown["extras"]
    assert os.path.getsize(shown["kernel"]) > 1 << 20


def test_initramfs_holds_modules_init_and_socat_with_libraries():
    files = read_cpio(open(build.show().initrd, "rb").read())
    release = build.show().release
    order = files["etc/vmmkit/modules"][1].decode().split()
    names = [os.path.basename(p)[:-3] for p in order]
    for needed in ("virtio_mmio", "virtio_blk", "virtio_mem", "virtiofs", "vmw_vsock_virtio_transport", "virtio-rng"):
        assert needed in names, needed
        assert f"lib/modules/{release}/{order[names.index(needed)]}" in files
    # dependencies before their users
    assert names.index("virtio_ring") < names.index("virtio_mmio")
    assert names.index("vsock") < names.index("vmw_vsock_virtio_transport")
    assert files["init"][0] & 0o111
    assert "usr/bin/socat" in files
    for lib in ("libc.so.6", "libssl.so.3", "libwrap.so.0", "ld-linux-x86-64.so.2"):
        assert f"lib/x86_64-linux-gnu/{lib}" in files, lib
    assert "lib64/ld-linux-x86-64.so.2" in files


def test_rootfs_image_has_the_initramfs_contents_but_not_its_marker():
    shown = build.show()
    assert shown.rootfs == os.path.join(build.guest_dir(), "rootfs.ext4")
    with open(os.path.join(build.guest_dir(), "manifest.json")) as f:
        assert json.load(f)["rootfs"] == "rootfs.ext4"
    assert os.path.getsize(shown.rootfs) % 512 == 0
    debugfs = rootfs.find_tool("debugfs")

    def ls(path):
        out = subprocess.run([debugfs, "-R", f"ls {path}", shown.rootfs], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, check=True).stdout
        return out.split()

    top = ls("/")
    assert "init" in top and "bin" in top
    assert "modules" in ls("/etc/vmmkit")
    assert os.path.basename(build.INITRAMFS_MARKER) not in ls("/etc/vmmkit")
    assert "console" in ls("/dev") and "null" in ls("/dev")
    assert build.INITRAMFS_MARKER in read_cpio(open(shown.initrd, "rb").read())
    assert "rootfs.ext4" in run("guest", "show").stdout
