"""Building the KVM lab's kernel and initramfs from Debian packages.

The lab is an emulated x86 machine (QEMU TCG with an AMD SVM CPU model) whose
kernel loads kvm_amd, so /dev/kvm inside it is ordinary KVM. Its kernel is
Debian's generic flavour (the cloud flavour lacks 9p); its initramfs is
busybox plus the modules below and the /init in :mod:`vmmkit.lab.init`.
"""

from __future__ import annotations

import json
import os
import time

import attrs

from .. import paths
from ..guest import apt
from ..guest.initramfs import build_machine
from .init import init_script

KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"
LAB_MODULES = [
    "virtio_pci", "9pnet_virtio", "9p", "overlay", "kvm_amd", "vhost_vsock",
    "virtio_blk", "ext4", "crc32c_generic",
]
FORMAT = 5  # bump when the lab's /init or module list changes


@attrs.frozen
class LabFiles:
    """The lab machine's kernel and initramfs."""

    kernel: str
    initrd: str
    release: str


def lab_dir() -> str:
    """Directory of the lab machine in the cache."""
    return os.path.join(paths.cache_dir(), "lab")


def _lab_files(release: str) -> LabFiles:
    return LabFiles(os.path.join(lab_dir(), "vmlinuz"), os.path.join(lab_dir(), "initramfs.cpio"), release)


def ensure_lab(progress=print) -> LabFiles:
    """Build the lab machine unless the cache already holds a current one.

    Unlike the guest, an existing lab is reused without asking apt about newer
    kernels: it only has to provide KVM, and this keeps `vmmkit lab` offline.
    """
    manifest_path = os.path.join(lab_dir(), "manifest.json")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = _lab_files(manifest["release"])
        if manifest.get("format") == FORMAT and os.path.exists(files.kernel) and os.path.exists(files.initrd):
            return files
    except (OSError, ValueError, KeyError):
        pass

    started = time.monotonic()
    kernel_pkg = apt.resolve_kernel_package(KERNEL_META)
    progress(f"building the KVM lab machine from {kernel_pkg} (once; cached in {lab_dir()})")
    release = build_machine(lab_dir(), kernel_pkg, BUSYBOX, LAB_MODULES, init_script(), progress=progress)
    with open(manifest_path + ".tmp", "w") as f:
        json.dump({"format": FORMAT, "release": release, "kernel_package": kernel_pkg}, f)
    os.replace(manifest_path + ".tmp", manifest_path)
    progress(f"lab machine ready in {time.monotonic() - started:.1f}s")
    return _lab_files(release)
