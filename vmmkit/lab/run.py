"""`vmmkit lab -- CMD`: run a command inside the KVM lab and return its exit status.

The command runs as the caller would run it on the host: same root
filesystem (read-only over 9p, writable through a tmpfs overlay), same working
directory, same environment. Its stdout and stderr stream back live over two
serial ports; host directories named with ``--share`` are writable inside, so
files can come back. ``--scratch SIZE`` adds a fresh ext4 disk mounted at
/scratch: a real, writable filesystem (the overlay's tmpfs refuses O_DIRECT),
made as a sparse file in the run directory and deleted with it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from ..errors import VmmkitError
from ..guest.rootfs import find_tool
from .build import ensure_lab
from ..markers import MarkerStream
from .init import END_MARKER, RUN_PARAM, START_MARKER

LAB_FAILED = 125  # our exit status when the lab itself failed, as docker uses for its own errors
_NOISE = ("TCG doesn't support requested feature",)
#: A lab CPU its kernel reports stuck this long means the lab is wedged (docs/lab.md): it is
#: killed and counts as failed, instead of holding its caller until the timeout.
WEDGE_SECONDS = 120
_LOCKUP = re.compile(rb"soft lockup - CPU#\d+ stuck for (\d+)s")


class WedgeWatch:
    """Passes the lab's console on to *feed*, and calls *kill* once when its kernel reports a
    CPU stuck for WEDGE_SECONDS or more (the report is kept in :attr:`report`)."""

    def __init__(self, feed, kill) -> None:
        self.feed, self.kill = feed, kill
        self.report: str | None = None
        self._tail = b""

    def __call__(self, chunk: bytes) -> None:
        self.feed(chunk)
        data = self._tail + chunk
        if self.report is None:
            for m in _LOCKUP.finditer(data):
                if int(m.group(1)) >= WEDGE_SECONDS:
                    self.report = m.group(0).decode()
                    self.kill()
                    break
        self._tail = data[-64:]
# PYTHONDONTWRITEBYTECODE keeps Python from littering a checkout with __pycache__; inside the lab
# every write lands on the throw-away overlay, so dropping it lets a lab session compile each
# module once instead of on every Python start (about ten times slower there than on the host).
_SKIP_ENV = {"PWD", "OLDPWD", "SHLVL", "_", "PYTHONDONTWRITEBYTECODE"}
SCRATCH_MOUNT = "/scratch"
SCRATCH_DEVICE = "/dev/vda"  # the lab's only virtio-blk disk
STALL_POLL = 5.0  # seconds between looks at a stall-watched file (run_in_lab(stall=...))
#: A lab machine boots in about 8 s; one whose init has not started the command after this
#: long hung at boot (seen once in CI: both CPUs spinning, nothing printed) and boots again.
BOOT_SECONDS = 120.0
BOOT_RETRIES = 2
BOOT_POLL = 0.5  # seconds between looks for the command's start
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# Host-side cache and aio modes for the scratch disk, best first: O_DIRECT with
# io_uring; thread-pool aio where io_uring is refused (seccomp, old kernel, a
# QEMU built without it); the page cache where the host file refuses O_DIRECT.
DRIVE_MODES = (("none", "io_uring"), ("none", "threads"), ("writeback", "threads"))


class LabError(VmmkitError):
    """The lab could not be started (QEMU missing, bad share path, ...)."""


def qemu_binary() -> str:
    """Path of qemu-system-x86_64, or LabError saying which package provides it."""
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise LabError("the KVM lab needs QEMU: install it with 'apt-get install qemu-system-x86'")
    return path


def write_script(path: str, argv: list[str], cwd: str, env: dict[str, str]) -> None:
    """Write the shell script the lab runs: the caller's environment, directory and command.

    The kernel command line mangles quotes and is short, so only this
    script's directory travels on it; the script itself is read over 9p.
    """
    lines = ["#!/bin/sh"]
    for key, value in sorted(env.items()):
        if key in _SKIP_ENV or not key.isidentifier():
            continue
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append("export VMMKIT_IN_LAB=1")
    lines.append(f"cd {shlex.quote(cwd)} || exit 126")
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``256M``, ``4G``, ``1.5G`` or ``1048576`` (binary units; K, M, G, T)."""
    if isinstance(text, int):
        return text
    t = text.strip().upper()
    for suffix in ("IB", "B"):
        if t.endswith(suffix) and len(t) > len(suffix) and t[-len(suffix) - 1] in "KMGT":
            t = t[:-len(suffix)]
            break
    unit = t[-1:] if t[-1:] in _SIZE_UNITS else ""
    try:
        return int(float(t[:len(t) - len(unit)]) * _SIZE_UNITS[unit])
    except (ValueError, OverflowError):
        raise LabError(f"bad size {text!r}: give e.g. 256M or 4G") from None


def make_scratch(path: str, size: int) -> None:
    """Make *path* a sparse file of *size* bytes holding an empty ext4 filesystem."""
    if size < 16 << 20:
        raise LabError(f"--scratch: {size} bytes is too small for an ext4 disk (give at least 16M)")
    with open(path, "wb") as f:
        f.truncate(size)
    # The root directory belongs to the caller, as a directory they made would.
    proc = subprocess.run([find_tool("mkfs.ext4"), "-F", "-q", "-b", "4096", "-L", "vmmkit-scratch",
                           "-E", f"root_owner={os.getuid()}:{os.getgid()}", path],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise LabError(f"mkfs.ext4 of the scratch disk failed: {proc.stdout.strip()}")


def qemu_escape(value: str) -> str:
    """*value* as one QEMU option value: commas doubled."""
    return value.replace(",", ",,")


def drive_works(qemu: str, drive: str) -> bool:
    """Whether this QEMU opens the ``-drive`` *drive* here (probed with a machine that runs nothing)."""
    try:
        proc = subprocess.run([qemu, "-machine", "none", "-nodefaults", "-display", "none", "-S",
                               "-monitor", "stdio", "-drive", drive],
                              input=b"quit\n", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def drive_options(qemu: str, path: str, modes=DRIVE_MODES) -> tuple[str, str]:
    """The first (cache, aio) of *modes* that QEMU accepts here for a raw -drive on *path*.

    By default: cache=none,aio=io_uring if it works, else the next best.
    """
    for cache, aio in modes:
        if drive_works(qemu, f"file={qemu_escape(path)},if=none,id=probe,format=raw,cache={cache},aio={aio}"):
            return cache, aio
    raise LabError(f"QEMU cannot open {path} as a disk (tried cache/aio: "
                   + ", ".join(f"{c}/{a}" for c, a in modes) + ")")


def _pump(src, sink) -> None:
    while True:
        try:
            chunk = os.read(src, 65536)
        except OSError:
            return
        if not chunk:
            return
        sink(chunk)


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _wait_watching(proc, timeout: float | None, stall: tuple[str, float] | None) -> float | None:
    """Wait for *proc* until *timeout*; with *stall*, stop waiting once its file has not changed for that long.

    Returns the seconds without progress when it stalled, else None (*proc*
    ended, or the timeout passed while it still runs).
    """
    start = time.monotonic()
    if stall is None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        return None
    path, seconds = stall
    seen, since = _mtime(path), start
    while proc.poll() is None:
        now = time.monotonic()
        if timeout is not None and now - start >= timeout:
            return None
        mtime = _mtime(path)
        if mtime != seen:
            seen, since = mtime, now
        elif now - since >= seconds:
            return now - since
        try:
            proc.wait(timeout=min(STALL_POLL, seconds))
        except subprocess.TimeoutExpired:
            pass
    return None


def _wait_for_start(proc, console: MarkerStream, seconds: float) -> bool:
    """Wait until the lab's init has started the command (its start marker came); False when
    *seconds* passed first. A lab that ends before then counts as started: its failure is not a hang."""
    deadline = time.monotonic() + seconds
    while console.state == "before" and proc.poll() is None:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            proc.wait(timeout=min(BOOT_POLL, left))
        except subprocess.TimeoutExpired:
            pass
    return True


class _Attempt:
    """One boot of the lab machine: how it ended, and what it printed besides the command's output."""

    def __init__(self) -> None:
        self.boot_hung = False
        self.timed_out = False
        self.stalled: float | None = None
        self.wedge: str | None = None
        self.returncode: int | None = None
        self.console_log = b""
        self.qemu_err = b""


def _boot(args: list[str], errfifo: str, stdout, stderr, timeout: float | None,
          stall: tuple[str, float] | None) -> _Attempt:
    """Run one lab machine (*args*: its QEMU command line) to its end, streaming the command's output."""
    started = time.monotonic()
    attempt = _Attempt()
    # A reader and a spare writer on the fifo: reads block (not EOF) until
    # QEMU opens it, and end once both writers are gone.
    err_r = os.open(errfifo, os.O_RDONLY | os.O_NONBLOCK)
    err_w = os.open(errfifo, os.O_WRONLY)
    os.set_blocking(err_r, True)
    console = MarkerStream(stdout, START_MARKER.encode(), END_MARKER.encode())
    qemu_err = bytearray()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wedge = WedgeWatch(console.feed, proc.kill)
    threads = [
        threading.Thread(target=_pump, args=(proc.stdout.fileno(), wedge), daemon=True),
        threading.Thread(target=_pump, args=(err_r, lambda b: (stderr.write(b), stderr.flush())), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr.fileno(), qemu_err.extend), daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        limit = BOOT_SECONDS if timeout is None else min(BOOT_SECONDS, timeout)
        if not _wait_for_start(proc, console, limit):
            # The caller's timeout ending first is a timeout, not a hung boot.
            attempt.boot_hung = limit == BOOT_SECONDS
            attempt.timed_out = not attempt.boot_hung
        else:
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
            attempt.stalled = _wait_watching(proc, left, stall)
            attempt.timed_out = attempt.stalled is None and proc.poll() is None
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise
    finally:
        os.close(err_w)
        for t in threads:
            t.join(timeout=10)
        os.close(err_r)
    console.close()
    attempt.wedge = wedge.report
    attempt.returncode = proc.returncode
    attempt.console_log = bytes(console.log)
    attempt.qemu_err = bytes(qemu_err)
    return attempt


def run_in_lab(argv: list[str], *, shares: list[str] = (), memory: str = "8G", cpus: int = 2,
               timeout: float | None = None, cwd: str | None = None, env: dict | None = None,
               stdout=None, stderr=None, progress=None, scratch: str | int | None = None,
               stall: tuple[str, float] | None = None) -> int:
    """Run *argv* in the lab; return its exit status (LAB_FAILED when the lab broke).

    *shares* are host directories made writable inside the lab at the same path.
    *scratch* (a size: bytes, or text such as ``"4G"``) attaches a fresh ext4
    disk mounted at /scratch inside; it is deleted afterwards. *stall*
    ``(path, seconds)``: the command writes *path* (in a share) as it makes
    progress; when it has not changed for *seconds*, the lab is taken to be
    hung (a lab whose processes wait for ever shows no other sign) and is
    stopped, and the run counts as failed. A lab machine whose init has not
    started the command BOOT_SECONDS after QEMU started hung at boot (the
    emulation's fault, docs/lab.md): it is stopped and booted again, up to
    BOOT_RETRIES times, which is safe because nothing of the command ran.
    """
    if not argv:
        raise LabError("nothing to run: give a command after '--', e.g. vmmkit lab -- uname -a")
    stdout = stdout or sys.stdout.buffer
    stderr = stderr or sys.stderr.buffer
    progress = progress or (lambda s: print(f"vmmkit lab: {s}", file=sys.stderr, flush=True))
    qemu = qemu_binary()
    for share in shares:
        if not os.path.isdir(share):
            raise LabError(f"--share {share}: not a directory")
    scratch_size = parse_size(scratch) if scratch is not None else None
    lab = ensure_lab(progress)
    cwd = os.path.abspath(cwd or os.getcwd())
    rundir = tempfile.mkdtemp(prefix="vmmkit-lab-")
    try:
        write_script(os.path.join(rundir, "script.sh"), list(argv), cwd, dict(env if env is not None else os.environ))
        share_lines = [f"run {rundir}"] + [f"share{i} {os.path.abspath(s)}" for i, s in enumerate(shares)]
        with open(os.path.join(rundir, "shares"), "w") as f:
            f.write("\n".join(share_lines) + "\n")
        drives = []
        if scratch_size is not None:
            image = os.path.join(rundir, "scratch.img")
            make_scratch(image, scratch_size)
            cache, aio = drive_options(qemu, image)
            if (cache, aio) != DRIVE_MODES[0]:
                progress(f"scratch disk: QEMU refused cache=none,aio=io_uring here; using cache={cache},aio={aio}")
            drives = ["-drive", f"file={qemu_escape(image)},if=none,id=scratch,format=raw,cache={cache},aio={aio}",
                      "-device", "virtio-blk-pci,drive=scratch"]
            with open(os.path.join(rundir, "scratch"), "w") as f:
                f.write(f"{SCRATCH_DEVICE} {SCRATCH_MOUNT}\n")
        errfifo = os.path.join(rundir, "stderr.fifo")
        os.mkfifo(errfifo)
        args = [
            qemu, "-accel", "tcg,thread=multi", "-M", "q35", "-cpu", "EPYC,+svm,+npt",
            "-smp", str(cpus), "-m", memory, "-display", "none", "-monitor", "none",
            "-nodefaults", "-no-reboot",
            "-kernel", lab.kernel, "-initrd", lab.initrd,
            "-append", f"console=ttyS0 quiet loglevel=1 panic=-1 {RUN_PARAM}={rundir}",
            "-serial", "stdio", "-serial", f"file:{errfifo}",
            "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
        ]
        for line in share_lines:
            tag, path = line.split(" ", 1)
            args += ["-virtfs", f"local,path={path},mount_tag={tag},security_model=none,multidevs=remap"]
        args += drives
        started = time.monotonic()
        for boot in range(1 + BOOT_RETRIES):
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
            attempt = _boot(args, errfifo, stdout, stderr, left, stall)
            if not attempt.boot_hung:
                break
            if boot < BOOT_RETRIES:
                progress(f"the lab machine did not start the command within {BOOT_SECONDS:.0f}s "
                         f"of booting (a boot takes about 8s): booting it again")
        status_file = os.path.join(rundir, "status")
        done = not (attempt.boot_hung or attempt.timed_out or attempt.stalled is not None or attempt.wedge)
        if done and os.path.exists(status_file):
            with open(status_file) as f:
                text = f.read().strip()
            if text.isdigit():
                return int(text)
        if attempt.boot_hung:
            why = f"did not start the command within {BOOT_SECONDS:.0f}s of booting, {1 + BOOT_RETRIES} times"
        elif attempt.wedge:
            why = f"wedged ({attempt.wedge}), so it was stopped"
        elif attempt.stalled is not None:
            why = f"made no progress for {attempt.stalled:.0f}s ({stall[0]} unchanged), so it was stopped"
        elif attempt.timed_out:
            why = f"timed out after {timeout:.0f}s"
        else:
            why = f"QEMU exited with {attempt.returncode} before the command finished"
        noise = "\n".join(l for l in attempt.qemu_err.decode(errors="replace").splitlines()
                          if not any(n in l for n in _NOISE))
        tail = attempt.console_log.decode(errors="replace")[-3000:]
        stderr.write(f"vmmkit lab: the lab failed: {why}\n--- lab console (tail) ---\n{tail}\n--- qemu stderr ---\n{noise}\n".encode())
        stderr.flush()
        return LAB_FAILED
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
