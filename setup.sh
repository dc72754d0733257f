#!/bin/sh
# Set up vmmkit on a Debian (bookworm or later) machine: system packages, a
# virtualenv in .venv with vmmkit installed (its C part is built by cffi), the
# default guest, and the KVM lab when this host's KVM cannot boot a stock kernel.
set -eu
cd "$(dirname "$0")"
SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO apt-get update -q
# qemu: the KVM lab and the peer in benchmarks; acpica-tools: iasl checks our ACPI tables;
# e2fsprogs: mke2fs makes the default guest's rootfs.ext4.
# liburing-dev: io_uring for the native virtio-blk data path (it falls back to threads without).
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    python3 python3-venv python3-dev gcc libc6-dev linux-libc-dev liburing-dev \
    qemu-system-x86 qemu-system-data seabios acpica-tools ca-certificates \
    cpio binutils dpkg e2fsprogs
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
# Compile vmmkit's bytecode now: the editable install leaves its sources uncompiled, and where
# nothing may write __pycache__ at run time (PYTHONDONTWRITEBYTECODE, a read-only checkout, the
# lab's throw-away overlay) every `vmmkit run` would compile ~80 modules again before booting.
.venv/bin/python -m compileall -q -j 0 vmmkit plugins
.venv/bin/vmmkit guest build --with socat
if ! .venv/bin/python -c 'import sys; from vmmkit.hostkvm import kvm_status; sys.exit(not kvm_status().usable)'; then
    echo "setup: this host's KVM cannot boot a stock kernel; vmmkit will use the KVM lab (building it now)"
    .venv/bin/python -c 'from vmmkit.lab.build import ensure_lab; ensure_lab()'
fi
echo "setup: done. Activate with: . .venv/bin/activate"
