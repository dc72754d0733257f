"""`vmmkit guest build`: the default guest from Debian packages.

The default guest is the Debian cloud kernel's bzImage and a busybox
initramfs holding the virtio modules and an /init that either runs the
command passed with ``--exec`` or starts a shell on the console. The same
files also make ``rootfs.ext4``, an ext4 image to give the VM as a virtio-blk
disk: with ``root=/dev/vda`` on the kernel command line, the initramfs's
/init mounts it and switches to it, and the disk's /init then runs as usual.
It is built once into the cache; later calls find the manifest and do nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import time

import attrs

from .. import paths

KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
GUEST_MODULES = [
    "virtio", "virtio_ring", "virtio_mmio", "virtio_blk", "virtio_mem", "virtio-rng",
    "fuse", "virtiofs", "vsock", "vmw_vsock_virtio_transport", "vmw_vsock_virtio_transport_common",
    "ext4", "crc32c_generic",
    # The ACPI power button (vmmkit ctl shutdown) as an input device, for busybox acpid.
    "button", "evdev",
]
FORMAT = 7  # bump when the image layout or /init changes, so caches rebuild

EXEC_PARAM = "vmmkit.exec"
# Only in the initramfs, not in rootfs.ext4: tells /init where it runs.
INITRAMFS_MARKER = "etc/vmmkit/initramfs"
ROOTFS = "rootfs.ext4"
# The console carries kernel messages before the command starts; the VMM (or
# a QEMU peer in tests) forwards only what follows START_MARKER, up to
# EXIT_MARKER, which is followed by the status digits and ']'.
START_MARKER = "\x1b[vmmkit-exec-start]\n"
EXIT_MARKER = "\x1b[vmmkit-exit="

INIT = r"""#!/bin/sh
# vmmkit default guest init. Runs the base64 command in vmmkit.exec= on the
# kernel command line, or a shell on the console. In the initramfs, with
# root=/dev/NAME on the command line, it mounts that ext4 disk (read-only with
# `ro`) and hands over to the disk's /init, this same script, which then skips
# this step (the disk has no @INITRAMFS_MARKER@).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=${TERM:-linux}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
release=$(uname -r)
while read -r m; do insmod "/lib/modules/$release/$m" 2>/dev/null; done < /etc/vmmkit/modules
# No I/O scheduler on the virtio disks: the host already orders what the VMM
# does with them, and a second scheduler in the guest costs the guest's CPU
# on every request (mq-deadline, Linux's pick for a one-queue disk, halved
# fio's speed on a one-vCPU guest in the lab: docs/benchmarks.md).
for q in /sys/block/vd*/queue/scheduler; do [ -w "$q" ] && echo none > "$q"; done
if [ -e @INITRAMFS_MARKER@ ]; then
  root= rootmode=rw
  for arg in $(cat /proc/cmdline); do
    case "$arg" in root=*) root="${arg#root=}" ;; ro) rootmode=ro ;; rw) rootmode=rw ;; esac
  done
  if [ -n "$root" ]; then
    # A VM whose root cannot be found stops, rather than hang or run from the initramfs.
    fail() { echo "vmmkit guest: $*"; poweroff -f; exit 1; }
    case "$root" in /dev/?*) ;; *) fail "unsupported root=$root (give root=/dev/NAME)" ;; esac
    i=0
    while [ ! -b "$root" ]; do
      [ "$i" -lt 100 ] || fail "root device $root did not appear"
      sleep 0.1
      i=$((i + 1))
    done
    mkdir -p /newroot
    mount -t ext4 -o "$rootmode" "$root" /newroot || fail "cannot mount root device $root (ext4, $rootmode)"
    [ -x /newroot/init ] || fail "root device $root has no /init"
    # The disk's /init mounts these again. No 2>/dev/null here: an open
    # /dev/null would keep /dev busy.
    umount /dev/shm /dev/pts /tmp
    umount /dev /sys /proc
    exec switch_root /newroot /init
    fail "switch_root to $root failed"
  fi
fi
hostname vmmkit
ip link set lo up 2>/dev/null
# The ACPI power button (graceful shutdown: vmmkit ctl shutdown) reaches
# busybox acpid as KEY_POWER, which runs @POWER_HANDLER@.
[ -e /dev/input/event0 ] && acpid -l /tmp/acpid.log -p /tmp/acpid.pid
cd /root
cmd=
for arg in $(cat /proc/cmdline); do
  case "$arg" in @EXEC_PARAM@=*) cmd="${arg#@EXEC_PARAM@=}" ;; esac
done
if [ -n "$cmd" ]; then
  # Raw console: the command's bytes reach the host unchanged (no \n -> \r\n).
  stty -F /dev/console raw -echo 2>/dev/null
  printf '@START_MARKER@'
  echo "$cmd" | base64 -d > /tmp/.vmmkit-exec
  sh /tmp/.vmmkit-exec </dev/console >/dev/console 2>&1
  rc=$?
  # The VMM stops the VM as soon as it sees the status: what the command
  # wrote to a disk must be on the disk by then.
  sync
  # stty sets the line with TCSADRAIN: it returns once the UART has sent
  # everything, so no output is lost to the power-off.
  stty -F /dev/console raw -echo 2>/dev/null
  printf '@EXIT_MARKER@%d]' "$rc"
  poweroff -f
fi
# busybox's poweroff/halt/reboot signal PID 1 (USR2/USR1/TERM); this init is
# a shell, so it acts on them itself. `wait` is interruptible by traps.
trap 'poweroff -f' USR1 USR2
trap 'reboot -f' TERM
echo "vmmkit guest: type 'poweroff' to stop the VM"
setsid cttyhack sh -l &
wait $!
poweroff -f
"""


# What an init does at shutdown: TERM to every process, then power off. PID 1
# is /init: in a console session it powers off on USR2 (below); with --exec
# the command ends on the TERM and /init reports its status and powers off.
POWER_HANDLER = "etc/acpi/PWRF/00000080"
POWER_HANDLER_SCRIPT = b"""#!/bin/sh
# vmmkit default guest: the ACPI power button was pressed (run by busybox acpid).
echo "<5>vmmkit guest: power button pressed: shutting down" >/dev/kmsg
kill -TERM -1
sleep 0.2
kill -USR2 1
"""


def init_script() -> bytes:
    """The default guest's /init, with vmmkit's constants filled in."""
    text = (INIT.replace("@EXEC_PARAM@", EXEC_PARAM)
            .replace("@INITRAMFS_MARKER@", "/" + INITRAMFS_MARKER)
            .replace("@POWER_HANDLER@", "/" + POWER_HANDLER)
            .replace("@START_MARKER@", START_MARKER.replace("\x1b", "\\033").replace("\n", "\\n"))
            .replace("@EXIT_MARKER@", EXIT_MARKER.replace("\x1b", "\\033")))
    return text.encode()


@attrs.frozen
class GuestFiles:
    """Where the default guest's files are, and what went into them."""

    directory: str
    kernel: str
    initrd: str
    release: str
    kernel_package: str
    kernel_version: str
    extras: tuple
    built: bool
    rootfs: str | None = None

    def as_dict(self) -> dict:
        """JSON-friendly form, for `vmmkit guest show --json`."""
        return attrs.asdict(self)


#: Names a variant of the default guest with its own directory (``guest-<name>``),
#: so that heavy extras (fio for the benchmarks) stay out of the guest everyone boots.
VARIANT_ENV = "VMMKIT_GUEST"


def guest_dir() -> str:
    """Directory of the default guest in the cache (of the variant $VMMKIT_GUEST names, if set)."""
    variant = os.environ.get(VARIANT_ENV, "")
    if variant and not all(c.isalnum() or c in "-_" for c in variant):
        raise ValueError(f"${VARIANT_ENV}={variant!r}: a guest variant name is letters, digits, - and _")
    return os.path.join(paths.cache_dir(), f"guest-{variant}" if variant else "guest")


def _manifest_path() -> str:
    return os.path.join(guest_dir(), "manifest.json")


def _raw_manifest() -> dict:
    try:
        with open(_manifest_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def read_manifest(manifest: dict | None = None) -> dict | None:
    """The last build's manifest (or *manifest*, already read), or None when there is no complete build."""
    if manifest is None:
        manifest = _raw_manifest()
    if manifest.get("format") != FORMAT:
        return None  # built by an older vmmkit: its /init may not speak today's protocol
    for key in ("kernel", "initrd"):
        if not os.path.exists(os.path.join(guest_dir(), manifest.get(key, "\0"))):
            return None
    return manifest


def show() -> GuestFiles:
    """Describe the default guest (built or not) without building anything."""
    manifest = read_manifest()
    d = guest_dir()
    if manifest is None:
        return GuestFiles(d, os.path.join(d, "vmlinuz"), os.path.join(d, "initramfs.cpio"),
                          "", KERNEL_META, "", (), False)
    rootfs = os.path.join(d, manifest["rootfs"]) if manifest.get("rootfs") else None
    return GuestFiles(d, os.path.join(d, manifest["kernel"]), os.path.join(d, manifest["initrd"]),
                      manifest["release"], manifest["kernel_package"], manifest["kernel_version"],
                      tuple(manifest["extras"]), True,
                      rootfs if rootfs and os.path.exists(rootfs) else None)


def build(extras: list[str] = (), *, progress=print, force: bool = False, reset: bool = False) -> GuestFiles:
    """Build the default guest if needed and return its files.

    *extras* are Debian packages whose programs (with their libraries) join
    the initramfs; they add to those of earlier builds unless *reset*. A build whose kernel
    version and extras match the manifest is a no-op that downloads nothing:
    apt is only asked which version is current. Concurrent builds (two
    `vmmkit run` starting on a fresh machine) take turns on a lock file.
    """
    os.makedirs(guest_dir(), exist_ok=True)
    with open(os.path.join(guest_dir(), ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("another vmmkit is building the default guest: waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(extras, progress=progress, force=force, reset=reset)


def _build_locked(extras, *, progress, force: bool, reset: bool) -> GuestFiles:
    # Imported here: `vmmkit run` only needs show(), and these pull in tarfile and friends.
    from . import apt
    from .initramfs import CHAR_DEVICES, build_machine
    from .rootfs import rootfs_from_cpio
    raw = _raw_manifest()
    manifest = read_manifest(raw)
    # Extras survive a rebuild for a newer image format: take them even from a stale manifest.
    previous = () if reset else raw.get("extras", ())
    wanted = sorted(set(extras) | set(previous))
    kernel_pkg = apt.resolve_kernel_package(KERNEL_META)
    kernel_version = apt.candidate_version(kernel_pkg)
    if (not force and manifest and manifest.get("format") == FORMAT
            and manifest["kernel_package"] == kernel_pkg
            and manifest["kernel_version"] == kernel_version and manifest["extras"] == wanted
            and show().rootfs):
        return show()

    started = time.monotonic()
    progress(f"building the default guest: {kernel_pkg} {kernel_version}, busybox"
             + (f", {', '.join(wanted)}" if wanted else ""))
    marker = (INITRAMFS_MARKER, b"the default guest's initramfs (not in rootfs.ext4)\n", 0o644)
    handler = (POWER_HANDLER, POWER_HANDLER_SCRIPT, 0o755)
    release = build_machine(guest_dir(), kernel_pkg, BUSYBOX, GUEST_MODULES, init_script(), wanted, progress,
                            files=[marker, handler])
    rootfs_started = time.monotonic()
    progress(f"making {ROOTFS} from the initramfs")
    size = rootfs_from_cpio(os.path.join(guest_dir(), "initramfs.cpio"), os.path.join(guest_dir(), ROOTFS),
                            exclude=[INITRAMFS_MARKER],
                            devices=[(name, "c", major, minor, mode) for name, major, minor, mode in CHAR_DEVICES],
                            work_parent=paths.cache_dir())
    progress(f"{ROOTFS}: {size >> 20} MiB ext4 in {time.monotonic() - rootfs_started:.1f}s")
    manifest = {
        "format": FORMAT, "kernel": "vmlinuz", "initrd": "initramfs.cpio", "rootfs": ROOTFS, "release": release,
        "kernel_package": kernel_pkg, "kernel_version": kernel_version, "extras": wanted,
    }
    tmp = _manifest_path() + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, _manifest_path())
    progress(f"default guest ready in {time.monotonic() - started:.1f}s: {guest_dir()}")
    return show()
