"""The lab machine's /init.

It loads the modules, mounts the host's root read-only over virtio-9p with a
tmpfs overlay on top (so everything looks writable and nothing reaches the
host), mounts the writable shares at their host paths and the scratch disk
(if any) at /scratch, and runs the caller's script in a chroot with stdout on
ttyS0 and stderr on ttyS1. The exit status goes to the run directory, which is
itself a writable share.
"""

START_MARKER = "\x1b[vmmkit-lab-start]"
END_MARKER = "\x1b[vmmkit-lab-end]"
RUN_PARAM = "vmmkit.lab"

INIT = r"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# khugepaged (it collapses small pages into huge ones in the background) once held a CPU of
# this emulated machine for minutes (soft lockup, the lab wedged); huge pages still come at
# fault time, which is what guest RAM gets (see vmmkit/memory.py).
echo 3600000 > /sys/kernel/mm/transparent_hugepage/khugepaged/scan_sleep_millisecs 2>/dev/null
release=$(uname -r)
while read -r m; do insmod "/lib/modules/$release/$m" 2>/dev/null; done < /etc/vmmkit/modules
run=
for arg in $(cat /proc/cmdline); do
  case "$arg" in @RUN_PARAM@=*) run="${arg#@RUN_PARAM@=}" ;; esac
done
fail() { echo "vmmkit lab: $*"; poweroff -f; }
opts=trans=virtio,version=9p2000.L,msize=1048576
mkdir -p /mnt/lower /mnt/upper /mnt/root
mount -t 9p -o $opts,cache=loose,ro host /mnt/lower || fail "cannot mount the host's root over 9p"
mount -t tmpfs -o mode=0755 tmpfs /mnt/upper
mkdir -p /mnt/upper/u /mnt/upper/w
mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/upper/u,workdir=/mnt/upper/w,xino=off,index=off,redirect_dir=off,metacopy=off overlay /mnt/root || fail "cannot mount the overlay"
r=/mnt/root
mount -t proc proc $r/proc
mount -t sysfs sysfs $r/sys
mount -t devtmpfs devtmpfs $r/dev
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts devpts $r/dev/pts
mount -t tmpfs tmpfs $r/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $r/run
# Writable shares, one "tag path" per line; the run directory is the first.
while read -r tag path; do
  mkdir -p "$r$path" && mount -t 9p -o $opts "$tag" "$r$path" || fail "cannot mount share $tag at $path"
done < "/mnt/lower$run/shares"
# The scratch disk (vmmkit lab --scratch): "device mountpoint" in the run directory.
if [ -e "/mnt/lower$run/scratch" ]; then
  read -r dev mnt < "/mnt/lower$run/scratch"
  i=0
  while [ ! -b "$dev" ]; do
    [ "$i" -lt 300 ] || fail "the scratch disk $dev did not appear"
    sleep 0.1
    i=$((i + 1))
  done
  mkdir -p "$r$mnt" && mount -t ext4 "$dev" "$r$mnt" || fail "cannot mount the scratch disk $dev at $mnt"
fi
stty -F /dev/ttyS0 raw -echo
stty -F /dev/ttyS1 raw -echo
printf '@START_MARKER@'
chroot $r /bin/sh "$run/script.sh" </dev/null >/dev/ttyS0 2>/dev/ttyS1
rc=$?
echo $rc > "$r$run/status"
stty -F /dev/ttyS0 raw -echo
stty -F /dev/ttyS1 raw -echo
printf '@END_MARKER@'
sync
poweroff -f
"""


def init_script() -> bytes:
    """The lab's /init with the markers filled in."""
    def esc(s: str) -> str:
        return s.replace("\x1b", "\\033")
    return (INIT.replace("@RUN_PARAM@", RUN_PARAM).replace("@START_MARKER@", esc(START_MARKER))
            .replace("@END_MARKER@", esc(END_MARKER))).encode()
