"""virtio-mem benchmark: vmmkit's device against QEMU's virtio-mem-pci, same kernel and guest, one run.

    .venv/bin/python benchmarks/virtio_mem.py [--rounds 2] [--size 1G]

Where the host's KVM cannot boot a stock kernel it runs itself inside the KVM
lab (`vmmkit lab`); where KVM is real, or inside the lab, it runs in place.

Each round boots the default guest (1 vCPU, 256 MiB, a hotplug region of
--size, nothing plugged) under vmmkit (``[[device]] kind = "virtio-mem"``) and
under QEMU (``-M q35``, ``-m 256M,maxmem=...,slots=1``, a memory-backend-ram
object and ``virtio-mem-pci``; microvm has no virtio-mem), alternating which
goes first. The guest runs the same script under both: it watches MemTotal
(no fork per look) and prints a marker when the plugged memory is online,
then fills 3/4 of it (a tmpfs, then frees it), then prints a marker when the
memory is gone again. The host measures:

* plug: from just before the resize request (vmmkit's ``PUT
  /vm/virtio-mem/resize``, QEMU's QMP ``qom-set`` of ``requested-size``) to
  the guest's "online" marker on the console;
* unplug: the same for the resize to 0 and the "gone" marker;
* the VMM process's RSS before the plug, after the guest filled the plugged
  memory, and after the unplug.

The kernel and initramfs are the default guest's. QEMU's q35 needs virtio_pci,
which the default initramfs does not carry (vmmkit uses virtio-MMIO): for QEMU
only, a small second archive is appended that adds virtio_pci and its two
helper modules from the same kernel package and loads them after the others. The
kernel arguments are vmmkit's (minus ``pci=off`` for QEMU) plus
``memhp_default_state=online_movable`` for both.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from vmmkit import paths
from vmmkit.api.client import ApiClient
from vmmkit.guest import build
from vmmkit.guest.cpio import CpioWriter, read_cpio
from vmmkit.guest.deb import open_data_tar
from vmmkit.guest.execcmd import exec_param
from vmmkit.hostkvm import in_lab, kvm_status
from vmmkit.schema import format_size, parse_size
from vmmkit.testing.qemu import qemu_binary
from vmmkit.vm import BASE_CMDLINE, EXEC_CMDLINE
from vmmkit_plugins.virtio_mem import KERNEL_ARGS

MiB = 1 << 20
BOOT_MEMORY = 256 * MiB
STEP_TIMEOUT = 600  # a hang guard for the emulated lab, not a performance bound
PCI_MODULES = ("kernel/drivers/virtio/virtio_pci_modern_dev.ko", "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
               "kernel/drivers/virtio/virtio_pci.ko")

# MemTotal read with shell builtins only; markers when the plugged memory is online, filled, and gone.
SCRIPT = """\
m(){ while read k v u;do [ "$k" = MemTotal: ]&&{ echo $v;return;};done</proc/meminfo;}
b=$(m);echo VMEM-BASE
while [ $(m) -lt $((b+%(plug_kb)d)) ];do sleep 0.01;done;echo VMEM-ONLINE
mkdir /f;mount -t tmpfs -o size=%(fill_mb)dm t /f;head -c %(fill)d /dev/zero >/f/x;rm /f/x;umount /f;echo VMEM-FILLED
while [ $(m) -gt $((b+%(slack_kb)d)) ];do sleep 0.01;done;echo VMEM-GONE
sleep 3600
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Vmm:
    """One VMM process with the guest script: its console lines with arrival times, and its RSS."""

    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.seen: dict[str, float] = {}
        self.tail: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            with self._cond:
                self.tail = (self.tail + [line])[-20:]
                for token in ("VMEM-BASE", "VMEM-ONLINE", "VMEM-FILLED", "VMEM-GONE"):
                    if token in line and token not in self.seen:
                        self.seen[token] = time.monotonic()
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait(self, token: str) -> float:
        """monotonic() when *token* arrived on the console."""
        deadline = time.monotonic() + STEP_TIMEOUT
        with self._cond:
            while token not in self.seen:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name}: never saw {token} (status {self.proc.poll()}); "
                                       f"console tail: {self.tail}")
                self._cond.wait(0.5)
            return self.seen[token]

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def script(size: int) -> str:
    fill = size * 3 // 4
    return SCRIPT % {"plug_kb": size // 1024 - 16 * 1024, "fill_mb": fill // MiB + 64, "fill": fill,
                     "slack_kb": 64 * 1024}


def run_vmmkit(tmp: str, size: int) -> dict:
    config = os.path.join(tmp, "vmmkit.toml")
    with open(config, "w") as f:
        f.write(f'[machine]\nvcpus = 1\nmemory = "{format_size(BOOT_MEMORY)}"\n\n'
                f'[[device]]\nkind = "virtio-mem"\nregion = "{format_size(size)}"\n')
    sock = os.path.join(tmp, "vmmkit-api.sock")
    vmm = Vmm("vmmkit", [sys.executable, "-m", "vmmkit", "run", config, "--api-sock", sock,
                         "--exec", script(size)])
    client = ApiClient(sock, timeout=60)

    def resize(n: int) -> None:
        client.call("PUT", "/vm/virtio-mem/resize", {"size": n})
    try:
        return measure(vmm, resize, size)
    finally:
        vmm.stop()


def qemu_initrd(tmp: str) -> str:
    """The default initramfs plus an archive that adds virtio_pci (for q35) and loads it first."""
    files = build.show()
    with open(os.path.join(os.path.dirname(files.kernel), "manifest.json")) as f:
        manifest = json.load(f)
    release = manifest["release"]
    debs = glob.glob(os.path.join(paths.cache_dir(), "debs", f"{manifest['kernel_package']}_*.deb"))
    if not debs:
        raise RuntimeError(f"the kernel package {manifest['kernel_package']} is not in the cache: "
                           f"run vmmkit guest build --force")
    with open(files.initrd, "rb") as f:
        base = f.read()
    modules_list = read_cpio(base)["etc/vmmkit/modules"][1].decode()
    out = io.BytesIO()
    writer = CpioWriter(out)
    with open_data_tar(debs[0]) as tar:
        members = {m.name.lstrip("./"): m for m in tar.getmembers()}
        for rel in PCI_MODULES:
            name = f"lib/modules/{release}/{rel}"
            writer.add_dirs(os.path.dirname(name))
            writer.add_file(name, tar.extractfile(members[name]).read())
    writer.add_dirs("etc/vmmkit")
    # After the list: virtio_pci needs virtio and virtio_ring, which the list loads.
    writer.add_file("etc/vmmkit/modules", (modules_list.rstrip("\n") + "\n" + "\n".join(PCI_MODULES) + "\n").encode())
    writer.finish()
    path = os.path.join(tmp, "qemu-initrd.cpio")
    with open(path, "wb") as f:
        f.write(base + out.getvalue())
    return path


def run_qemu(tmp: str, size: int, initrd: str) -> dict:
    files = build.show()
    qmp_path = os.path.join(tmp, "qmp.sock")
    cmdline = " ".join(p for p in BASE_CMDLINE.split() if p != "pci=off")
    cmdline = " ".join([cmdline, EXEC_CMDLINE, *KERNEL_ARGS, exec_param(script(size))])
    argv = [qemu_binary(), "-M", "q35", "-enable-kvm", "-cpu", "host", "-smp", "1",
            "-m", f"{BOOT_MEMORY // MiB}M,maxmem={(BOOT_MEMORY + size) // MiB}M,slots=1",
            "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-kernel", files.kernel, "-initrd", initrd, "-append", cmdline,
            "-object", f"memory-backend-ram,id=vmem0,size={size // MiB}M",
            "-device", "virtio-mem-pci,id=vm0,memdev=vmem0,block-size=2M,requested-size=0",
            "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    vmm = Vmm("qemu", argv)
    qmp = None
    try:
        vmm.wait("VMEM-BASE")
        qmp = Qmp(qmp_path)

        def resize(n: int) -> None:
            qmp.execute("qom-set", {"path": "/machine/peripheral/vm0", "property": "requested-size", "value": n})
        return measure(vmm, resize, size)
    finally:
        if qmp is not None:
            qmp.close()
        vmm.stop()


class Qmp:
    """A minimal QMP client: capabilities negotiated, one command at a time, events skipped."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        json.loads(self.file.readline())  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, arguments: dict | None = None):
        msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            answer = json.loads(self.file.readline())
            if "return" in answer:
                return answer["return"]
            if "error" in answer:
                raise RuntimeError(f"QMP {command}: {answer['error']}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def measure(vmm: Vmm, resize, size: int) -> dict:
    vmm.wait("VMEM-BASE")
    time.sleep(2.0)  # let the guest's boot settle before the baseline
    before = vmm.rss()
    start = time.monotonic()
    resize(size)
    plug = vmm.wait("VMEM-ONLINE") - start
    vmm.wait("VMEM-FILLED")
    filled = vmm.rss()
    start = time.monotonic()
    resize(0)
    unplug = vmm.wait("VMEM-GONE") - start
    time.sleep(1.0)  # the last UNPLUG answers may trail the guest's MemTotal
    after = vmm.rss()
    result = {"plug": plug, "unplug": unplug, "rss_before": before, "rss_filled": filled, "rss_after": after}
    log(f"{vmm.name}: plug {plug:.2f}s unplug {unplug:.2f}s rss {before / MiB:.0f} -> {filled / MiB:.0f} -> "
        f"{after / MiB:.0f} MiB")
    return result


def benchmark(opts) -> int:
    files = build.show()
    if not files.built:
        raise SystemExit("build the default guest first: vmmkit guest build")
    size = parse_size(opts.size)
    results: dict[str, list[dict]] = {"vmmkit": [], "qemu": []}
    with tempfile.TemporaryDirectory(prefix="vmmkit-memben-") as tmp:
        initrd = qemu_initrd(tmp)
        for i in range(opts.rounds):
            order = [("vmmkit", lambda: run_vmmkit(tmp, size)), ("qemu", lambda: run_qemu(tmp, size, initrd))]
            if i % 2:
                order.reverse()
            for name, run in order:
                results[name].append(run())

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    where = "lab" if in_lab() else "host"
    print(f"\nvirtio-mem benchmark ({where}): {opts.rounds} round(s), 1 vCPU, 256M boot RAM, "
          f"{format_size(size)} plugged then unplugged, 3/4 of it filled by the guest, kernel {files.release}")
    print(f"{'metric':<34}{'vmmkit':>11}{'qemu':>11}{'vmmkit/qemu':>13}")
    rows = [("plug: request -> online", "plug", "s"), ("unplug: request -> gone", "unplug", "s"),
            ("RSS before plug", "rss_before", "MiB"), ("RSS after plug + fill", "rss_filled", "MiB"),
            ("RSS after unplug", "rss_after", "MiB")]
    for label, key, unit in rows:
        scale = 1 / MiB if unit == "MiB" else 1
        a, b = med("vmmkit", key) * scale, med("qemu", key) * scale
        fmt = "{:>10.2f}s" if unit == "s" else "{:>8.0f}MiB"
        print(f"{label:<34}{fmt.format(a)}{fmt.format(b)}{a / b:>13.2f}")
    for name in ("vmmkit", "qemu"):
        freed = med(name, "rss_filled") - med(name, "rss_after")
        print(f"{name}: unplug gave back {freed / MiB:.0f} MiB of {med(name, 'rss_filled') / MiB - med(name, 'rss_before') / MiB:.0f} MiB "
              f"the plug and fill added")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="boots of each VMM (default 2)")
    parser.add_argument("--size", default="1G", help="hotplug region, plugged then unplugged (default 1G)")
    parser.add_argument("--lab", choices=("auto", "always", "never"), default="auto",
                        help="run inside the KVM lab: auto (when this host's KVM cannot boot a stock kernel), "
                        "always or never")
    opts = parser.parse_args()
    if opts.rounds < 1:
        parser.error("--rounds must be at least 1")
    if in_lab() or opts.lab == "never" or (opts.lab == "auto" and kvm_status().usable):
        try:
            return benchmark(opts)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            raise SystemExit(f"virtio-mem benchmark failed: {exc}") from None
    from vmmkit.lab.run import LAB_FAILED, run_in_lab
    log("running in the KVM lab")
    status = run_in_lab([sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
                        timeout=900 + opts.rounds * 2 * 900)
    if status == LAB_FAILED:
        log("the KVM lab itself failed (see its console above and docs/lab.md): run the benchmark again")
    return status


if __name__ == "__main__":
    sys.exit(main())
