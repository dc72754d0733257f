"""vsock benchmark: vmmkit's hybrid vsock against QEMU's vhost-vsock and a Unix-socket loopback, one run, one table.

    .venv/bin/python benchmarks/vsock.py [--mib 256] [--count 2000] [--rounds 1] [--engine NAME] [--halt-poll-ns N]

Where the host's KVM cannot boot a stock kernel it runs itself inside the KVM
lab (`vmmkit lab`); where KVM is real, or inside the lab, it runs in place
(--lab changes that). There it boots the default guest (1 vCPU) under vmmkit
with a ``kind = "vsock"`` device and under QEMU microvm with
``-device vhost-vsock-device`` (the lab's /init loads vhost_vsock), and runs
the same socat peers in each guest. This process is the host side: through
``uds_path`` with Firecracker's ``CONNECT <port>`` line for vmmkit, through
AF_VSOCK for QEMU. The limit is the same peers (the guest's own socat binary,
unpacked from its initramfs) on Unix sockets in the machine the VMMs run in.

The three peers run at the same time (both guests idle when not measured:
1 vCPU each) and are measured in turn, phase by phase, so that a change in
the machine's load, which is shared in the lab, falls on all of them alike.
Nothing is timed before every peer is set up. The phases:

- host to guest: --mib MiB of random bytes sent on one connection; the peer
  writes them over a tmpfs file of that size (made beforehand, so no memory
  is allocated while timed) and closes. Timed from the first byte to the
  peer's close, so every byte is in the peer's file. Then (untimed) the peer
  hashes the file and the host compares the sha256.
- guest to host: the peer sends that same file back; timed from the
  connection to its end, then (untimed) the host compares the sha256 of what
  came with what it sent.
- round trips: --count 64-byte messages (after a short warm-up) on one
  connection per peer to an echo peer (socat's PIPE address); each is sent,
  then read back whole before the next, and checked. They go in ten blocks
  that rotate among the peers.

The peer's work per byte is the same for every VMM: one copy into or out of
tmpfs, socat with the same block size. It prints MB/s (10^6 bytes) and round
trip microseconds (median, p99; medians over --rounds), with the ratios
vmmkit/QEMU and vmmkit/loopback: above 1 is better for throughput, below 1 is
better for latency. Absolute numbers inside the lab mean little (everything is
emulated); the ratios from one run are what to compare.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shlex
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import time

from vmmkit.guest import build
from vmmkit.guest.cpio import read_cpio
from vmmkit.guest.execcmd import exec_stream
from vmmkit.hostkvm import in_lab, kvm_status
from vmmkit.testing.qemu import qemu_command

import kvmstats

MiB = 1 << 20
GUEST_CID = 3
# Peer ports: echo (stays up), sink (host to guest), hash of the received file, source (guest to host),
# ready (the peer is idle and set up), quit.
ECHO, SINK, HASH, SOURCE, READY, QUIT = 5000, 5001, 5002, 5003, 5004, 5999
MSG = 64
WARMUP = 50
RTT_BLOCKS = 10       # the round trips go in this many blocks, rotating among the peers
BLOCK = 131072        # socat -b: the peers' read/write size
CHUNK = MiB           # the host's send and receive size
#: Why KVM's per-VM counters cannot be read in this run (None: they can), set by `benchmark`.
COUNTERS_UNAVAILABLE: str | None = "not checked yet"
STALL = 300.0         # seconds without progress that count as a hang (the lab is slow)
BOOT_DEADLINE = 600.0  # seconds for a guest to boot and start listening
VHOST_DEV = "/dev/vhost-vsock"
ROUND_RETRIES = 2     # rounds run again after a peer failed (the lab crashes a guest now and then)
GOAL = "goal: throughput vmmkit/QEMU >= 1.00x, latency vmmkit/QEMU <= 1.00x"
ROWS = (  # (key, label, higher is better)
    ("h2g", "host->guest (MB/s)", True),
    ("g2h", "guest->host (MB/s)", True),
    ("rtt_median", "64 B RTT median (us)", False),
    ("rtt_p99", "64 B RTT p99 (us)", False),
)


def peer_script(socat: str, listen, data_file: str, size: int) -> str:
    """The shell script every peer runs: socat listeners, one after the other, then a quit listener.

    *listen(port)* is socat's listening address for a port; *data_file* is
    the tmpfs file that the host's *size* bytes land in and are sent back
    from. It is filled with zeros first and then overwritten in place, so the
    timed transfer does not allocate memory (in a nested guest every first
    touch of a page is an expensive fault, nothing the VMM does).
    """
    s = f"{socat} -b {BLOCK}"
    f = shlex.quote(data_file)
    return "\n".join([
        f"{s} {listen(ECHO)},fork PIPE & E=$!",
        f"head -c {size} /dev/zero >{f}",
        f"{socat} -u {listen(READY)} OPEN:/dev/null",
        f"{s} -u {listen(SINK)} OPEN:{f}",
        # socat splits its addresses at ':' and ',', so the command takes the file from the environment.
        f"F={f} {s} {listen(HASH)} SYSTEM:'sha256sum $F'",
        f"{s} -U {listen(SOURCE)} OPEN:{f}",
        f"rm -f {f}",
        f"{socat} -u {listen(QUIT)} OPEN:/dev/null",
        "kill $E 2>/dev/null",
        "echo peer-done",
    ]) + "\n"


def guest_script(size: int) -> str:
    """The peer script for a guest: listeners on its vsock ports, data in its tmpfs /tmp."""
    return peer_script("socat", lambda port: f"VSOCK-LISTEN:{port}", "/tmp/vsock-bench", size)


class Peer:
    """One side to measure against: how to connect to a port, and the process that serves it."""

    def __init__(self, name: str, proc: subprocess.Popen, connect_once, describe_failure, *, vm: bool = True):
        self.name, self.proc = name, proc
        self._connect_once = connect_once
        self.describe_failure = describe_failure
        #: Whether *proc* runs a KVM VM (whose counters :meth:`counters` reads).
        self.vm = vm
        #: KVM's counters per phase: {phase: summed deltas} (see `kvmstats`).
        self.kvm: dict[str, kvmstats.Counters] = {}

    def counted(self, phase: str, fn, *args):
        """*fn(*args)*, adding the KVM counters of this peer's VM over the call to *phase* (when they can be read).

        A failure comes back with what the peer printed (a crashed guest says so there).
        """
        try:
            if not self.vm or COUNTERS_UNAVAILABLE:
                return fn(*args)
            before = kvmstats.read(self.proc.pid)
            result = fn(*args)
        except (RuntimeError, OSError) as exc:
            time.sleep(2)  # what the peer prints as it goes down
            raise RuntimeError(f"{exc}\n{self.describe_failure()}") from exc
        d = kvmstats.delta(kvmstats.read(self.proc.pid), before)
        old = self.kvm.get(phase)
        self.kvm[phase] = d if old is None else {k: old[k] + d[k] for k in d}
        return result

    def connect(self, port: int, deadline: float = 120.0) -> socket.socket:
        """A connected stream to *port*, retrying while its listener is not up yet."""
        end = time.monotonic() + deadline
        last = None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: the peer ended (status {self.proc.returncode}) before port "
                                   f"{port} answered\n{self.describe_failure()}")
            try:
                s = self._connect_once(port)
                if s is not None:
                    s.settimeout(STALL)
                    return s
            except OSError as exc:
                last = exc
            if time.monotonic() > end:
                raise RuntimeError(f"{self.name}: no listener on port {port} within {deadline:.0f}s "
                                   f"(last error: {last})\n{self.describe_failure()}")
            time.sleep(0.2)

    def finish(self, timeout: float = 300.0) -> None:
        """Let the peer's script end (its quit listener) and wait for its process."""
        self.connect(QUIT).close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"{self.name}: did not end after quit\n{self.describe_failure()}") from None


def hybrid_connect(uds: str):
    """connect_once for Firecracker's hybrid vsock: ``CONNECT <port>\\n``, then ``OK <n>\\n``, then the stream."""
    def connect_once(port: int):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(30)
            s.connect(uds)
            s.sendall(f"CONNECT {port}\n".encode())
            line = b""
            # One byte at a time: a source peer's data may follow the OK line at once.
            while not line.endswith(b"\n") and len(line) < 64:
                c = s.recv(1)
                if not c:
                    break
                line += c
        except OSError:
            s.close()
            raise
        if line.startswith(b"OK ") and line.endswith(b"\n"):
            return s
        s.close()
        return None  # nobody listens on the guest port yet: vmmkit closed the stream
    return connect_once


def vsock_connect(cid: int):
    """connect_once over AF_VSOCK to guest *cid*."""
    def connect_once(port: int):
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            s.settimeout(10)
            s.connect((cid, port))
        except OSError:
            s.close()
            raise
        return s
    return connect_once


def unix_connect(directory: str):
    """connect_once to the loopback peer's ``<directory>/<port>`` sockets."""
    def connect_once(port: int):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(30)
            s.connect(os.path.join(directory, str(port)))
        except OSError:
            s.close()
            raise
        return s
    return connect_once


def read_to_end(s: socket.socket, buf: memoryview) -> int:
    """Read into *buf* until the stream ends; the count (a reset counts as the end)."""
    got = 0
    while True:
        if got == len(buf):
            raise RuntimeError(f"the peer sent more than the {len(buf) - 1} bytes expected")
        try:
            n = s.recv_into(buf[got:got + CHUNK])
        except ConnectionResetError:
            n = 0
        if not n:
            return got
        got += n


def host_to_guest(peer: Peer, payload: bytes, digest: str) -> float:
    """MB/s of *payload* sent to the peer's sink; its sha256 checked afterwards, untimed."""
    size = len(payload)
    view = memoryview(payload)
    s = peer.connect(SINK)
    t0 = time.perf_counter()
    for off in range(0, size, CHUNK):
        s.sendall(view[off:off + CHUNK])
    s.shutdown(socket.SHUT_WR)
    trailing = read_to_end(s, memoryview(bytearray(16)))
    elapsed = time.perf_counter() - t0
    s.close()
    if trailing:
        raise RuntimeError(f"{peer.name}: the sink answered {trailing} bytes")
    rate = size / 1e6 / elapsed
    log(f"{peer.name}: host->guest {size // MiB} MiB in {elapsed:.1f}s ({rate:.1f} MB/s); hashing")

    # No shutdown from here: socat would then give the hashing command only its -t (0.5 s) to answer.
    s = peer.connect(HASH)
    buf = bytearray(256)
    answer = bytes(buf[:read_to_end(s, memoryview(buf))]).decode(errors="replace")
    s.close()
    if answer.split()[:1] != [digest]:
        raise RuntimeError(f"{peer.name}: host->guest data corrupted: the peer's sha256 is {answer.strip()!r}, "
                           f"the host sent {digest}")
    return rate


def guest_to_host(peer: Peer, payload: bytes, digest: str) -> float:
    """MB/s of the peer's copy of *payload* coming back; checked against *digest* afterwards, untimed."""
    size = len(payload)
    buf = bytearray(size + 1)
    buf[:size] = payload  # touch every page now: page faults are not the data path's cost
    s = peer.connect(SOURCE)
    t0 = time.perf_counter()
    got = read_to_end(s, memoryview(buf))
    elapsed = time.perf_counter() - t0
    s.close()
    if got != size:
        raise RuntimeError(f"{peer.name}: guest->host gave {got} bytes, expected {size}")
    if hashlib.sha256(memoryview(buf)[:size]).hexdigest() != digest:
        raise RuntimeError(f"{peer.name}: guest->host data corrupted (sha256 differs)")
    rate = size / 1e6 / elapsed
    log(f"{peer.name}: guest->host {size // MiB} MiB in {elapsed:.1f}s ({rate:.1f} MB/s), sha256 ok")
    return rate


def round_trips(peer: Peer, s: socket.socket, first: int, count: int) -> list[float]:
    """Microseconds of *count* 64-byte round trips on the echo stream *s*, each checked."""
    reply = bytearray(MSG)
    rview = memoryview(reply)
    samples = []
    for i in range(first, first + count):
        msg = i.to_bytes(8, "little") + bytes([i & 0xFF]) * (MSG - 8)
        t0 = time.perf_counter_ns()
        s.sendall(msg)
        got = 0
        while got < MSG:
            n = s.recv_into(rview[got:])
            if not n:
                raise RuntimeError(f"{peer.name}: the echo peer closed after {i} round trips")
            got += n
        dt = time.perf_counter_ns() - t0
        if reply != msg:
            raise RuntimeError(f"{peer.name}: round trip {i} came back different")
        samples.append(dt / 1000)
    return samples


def measure(peers: list[Peer], payload: bytes, digest: str, count: int) -> dict[str, dict[str, float]]:
    """Every measurement against every peer, interleaved: {peer name: {row key: value}}.

    Each phase takes the peers in turn and the round trips go in blocks that
    rotate among them, so a change in the machine's load (the lab is shared)
    falls on all peers alike rather than on whichever ran at that time.
    """
    out: dict[str, dict[str, float]] = {p.name: {} for p in peers}
    for p in peers:
        out[p.name]["h2g"] = p.counted("h2g", host_to_guest, p, payload, digest)
    for p in peers:
        out[p.name]["g2h"] = p.counted("g2h", guest_to_host, p, payload, digest)
    echoes = {}
    for p in peers:
        echoes[p.name] = p.connect(ECHO)
        echoes[p.name].settimeout(60)
        round_trips(p, echoes[p.name], 0, WARMUP)
    samples: dict[str, list[float]] = {p.name: [] for p in peers}
    block = max(1, -(-count // RTT_BLOCKS))
    done, b = 0, 0
    while done < count:
        n = min(block, count - done)
        for p in peers[b % len(peers):] + peers[:b % len(peers)]:
            samples[p.name] += p.counted("rtt", round_trips, p, echoes[p.name], WARMUP + done, n)
        done, b = done + n, b + 1
    for p in peers:
        out[p.name]["kvm"] = p.kvm
        echoes[p.name].close()
        got = sorted(samples[p.name])
        out[p.name]["rtt_median"] = statistics.median(got)
        out[p.name]["rtt_p99"] = got[math.ceil(0.99 * len(got)) - 1]
        log(f"{p.name}: {count} round trips of {MSG} B: median {out[p.name]['rtt_median']:.0f} us, "
            f"p99 {out[p.name]['rtt_p99']:.0f} us")
    return out


def tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")[-n:]
    except OSError:
        return ""


def start_vmmkit(tmp: str, size: int, memory_mib: int, engine: str | None, halt_poll_ns: int | None) -> Peer:
    uds = os.path.join(tmp, "v.sock")
    config = os.path.join(tmp, "vm.toml")
    with open(config, "w") as f:
        poll = "" if halt_poll_ns is None else f"halt_poll_ns = {halt_poll_ns}\n"
        f.write(f'[machine]\nvcpus = 1\nmemory = "{memory_mib}M"\n{poll}\n[[device]]\nkind = "vsock"\n'
                f'guest_cid = {GUEST_CID}\nuds_path = {json.dumps(uds)}\n')
        if engine:
            f.write(f"engine = {json.dumps(engine)}\n")
    out, err = os.path.join(tmp, "vmmkit.out"), os.path.join(tmp, "vmmkit.err")
    # Files, not pipes: a console nobody reads must never stall the guest.
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "vmmkit", "run", config, "--exec", guest_script(size)],
                                stdin=subprocess.DEVNULL, stdout=o, stderr=e)
    return Peer("vmmkit", proc, hybrid_connect(uds),
                lambda: f"--- vmmkit stdout ---\n{tail(out)}\n--- vmmkit stderr ---\n{tail(err)}")


def start_qemu(tmp: str, size: int, memory_mib: int) -> Peer:
    if not os.path.exists(VHOST_DEV):
        raise RuntimeError(f"{VHOST_DEV} is missing: load the vhost_vsock module (the lab's /init does)")
    if not hasattr(socket, "AF_VSOCK"):
        raise RuntimeError("this Python has no socket.AF_VSOCK")
    out = os.path.join(tmp, "qemu.out")
    args = qemu_command(guest_script(size), vcpus=1, memory=f"{memory_mib}M",
                        extra_args=["-device", f"vhost-vsock-device,guest-cid={GUEST_CID}"])
    with open(out, "wb") as o:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=o, stderr=subprocess.STDOUT)

    def describe():
        text = io.BytesIO()
        stream = exec_stream(text)
        try:
            with open(out, "rb") as f:
                stream.feed(f.read())
        except OSError:
            pass
        return (f"--- guest output ---\n{text.getvalue().decode(errors='replace')[-2000:]}\n"
                f"--- console ---\n{bytes(stream.log).decode(errors='replace')[-3000:]}")
    return Peer("qemu", proc, vsock_connect(GUEST_CID), describe)


def socat_from_guest(dest: str) -> str:
    """A shell command that runs the default guest's socat here: its binary and libraries, unpacked from the initramfs.

    The loopback limit must run the very peer the guests run; the guest's
    userland is Debian's, so its own dynamic loader runs it on the lab.
    """
    with open(build.show().initrd, "rb") as f:
        entries = read_cpio(f.read())
    libdirs = ("lib/x86_64-linux-gnu/", "usr/lib/x86_64-linux-gnu/")
    for name, (mode, body) in entries.items():
        if name != "usr/bin/socat" and not name.startswith(libdirs):
            continue
        path = os.path.join(dest, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if stat.S_ISLNK(mode):
            os.symlink(body.decode(), path)
        elif stat.S_ISREG(mode):
            with open(path, "wb") as out:
                out.write(body)
            os.chmod(path, stat.S_IMODE(mode))
    if not os.path.exists(os.path.join(dest, "usr/bin/socat")):
        raise RuntimeError("the default guest has no socat: vmmkit guest build --with socat")
    libs = ":".join(os.path.join(dest, d) for d in libdirs)
    loader = os.path.join(dest, "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    return " ".join(shlex.quote(a) for a in (loader, "--library-path", libs, os.path.join(dest, "usr/bin/socat")))


def start_loopback(tmp: str, size: int, socat: str) -> Peer:
    sockets = tempfile.mkdtemp(prefix="loop-", dir=tmp)  # a fresh one per round: the last round's sockets stay
    script = peer_script(socat, lambda port: f"UNIX-LISTEN:{os.path.join(sockets, str(port))}",
                         os.path.join(tmp, "loop-data"), size)
    out = os.path.join(tmp, "loop.out")
    with open(out, "wb") as o:
        proc = subprocess.Popen(["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=o, stderr=subprocess.STDOUT)
    return Peer("loopback", proc, unix_connect(sockets), lambda: f"--- loopback peer ---\n{tail(out)}", vm=False)


def run_round(order: list[str], starters: dict, payload: bytes, digest: str, count: int) -> dict[str, dict]:
    """Start the peers in *order*, wait until all are ready, measure them; each peer is stopped at the end."""
    peers, t0 = [], time.monotonic()
    try:
        for name in order:
            peers.append(starters[name]())
        # Nothing is timed until every peer is idle: both guests booted, their files made.
        for peer in peers:
            peer.connect(READY, deadline=BOOT_DEADLINE).close()
        log(f"all ready after {time.monotonic() - t0:.0f}s")
        values = measure(peers, payload, digest, count)
        for peer in peers:
            peer.finish()
        return values
    finally:
        for peer in peers:
            if peer.proc.poll() is None:
                peer.proc.kill()
                peer.proc.wait()


def benchmark(opts) -> int:
    files = build.show()
    if not files.built or "socat" not in files.extras:
        raise SystemExit("the default guest needs socat: vmmkit guest build --with socat")
    global COUNTERS_UNAVAILABLE
    COUNTERS_UNAVAILABLE = kvmstats.available()
    if COUNTERS_UNAVAILABLE:
        log(f"no KVM counters in this run: {COUNTERS_UNAVAILABLE}")
    size = opts.mib * MiB
    # The peer keeps the data in its tmpfs /tmp, which may take half of RAM.
    memory_mib = max(1024, 2 * opts.mib + 512)
    t_start = time.monotonic()
    # tmpfs for the loopback peer's file (the lab's /tmp is an overlay); the default elsewhere.
    workdir = "/dev/shm" if in_lab() and os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="vmmkit-vsockbench-", dir=workdir) as tmp:
        log(f"making {opts.mib} MiB of random data")
        payload = os.urandom(size)
        digest = hashlib.sha256(payload).hexdigest()
        socat = socat_from_guest(os.path.join(tmp, "socat"))
        starters = {"vmmkit": lambda: start_vmmkit(tmp, size, memory_mib, opts.engine, opts.halt_poll_ns),
                    "qemu": lambda: start_qemu(tmp, size, memory_mib),
                    "loopback": lambda: start_loopback(tmp, size, socat)}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in starters}
        failed: list[str] = []
        i = 0
        while i < opts.rounds:
            order = ["vmmkit", "qemu"] if i % 2 == 0 else ["qemu", "vmmkit"]
            order.append("loopback")
            t0 = time.monotonic()
            log(f"round {i + 1}: starting {', '.join(order)}")
            try:
                values = run_round(order, starters, payload, digest, opts.count)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                # A guest the lab's emulator crashed (docs/lab.md) costs this round, not the run.
                failed.append(f"round {i + 1}: {str(exc).splitlines()[0]}")
                if len(failed) > ROUND_RETRIES:
                    raise
                log(f"round {i + 1} failed ({len(failed)} of {ROUND_RETRIES} retries used), running it again:\n{exc}")
                continue
            for name, v in values.items():
                results[name].append(v)
            log(f"round {i + 1} done in {time.monotonic() - t0:.0f}s")
            i += 1

    log(f"all measured in {time.monotonic() - t_start:.0f}s")

    def med(name, key):
        return statistics.median(r[key] for r in results[name])

    where = "lab" if in_lab() else "host"
    print(f"\nvsock benchmark ({where}): {opts.mib} MiB each way (sha256 checked), {opts.count} round trips of "
          f"{MSG} B, {opts.rounds} round{'s' if opts.rounds > 1 else ''} (medians), guest 1 vCPU {memory_mib}M, "
          f"kernel {files.release}")
    poll = "KVM's default" if opts.halt_poll_ns is None else f"{opts.halt_poll_ns} ns"
    print(f"vmmkit: hybrid vsock via uds_path, engine {opts.engine or '(the default)'}, halt polling {poll}; "
          f"QEMU microvm: vhost-vsock-device via AF_VSOCK; loopback: Unix sockets in the {where}; "
          f"peers: socat -b {BLOCK}, data in tmpfs")
    print(f"{'metric':<24}{'QEMU':>10}{'vmmkit':>10}{'vmmkit/QEMU':>13}{'loopback':>10}{'vmmkit/loopback':>17}")
    for key, label, _higher in ROWS:
        q, v, lim = med("qemu", key), med("vmmkit", key), med("loopback", key)
        print(f"{label:<24}{q:>10.1f}{v:>10.1f}{v / q:>12.2f}x{lim:>10.1f}{v / lim:>16.2f}x")
    if opts.rounds > 1:
        # Each round measures the peers side by side, so its ratios are paired; the lab's load moves between rounds.
        print("vmmkit/QEMU in each round: " + "; ".join(
            f"{key} " + " ".join(f"{v[key] / q[key]:.2f}" for v, q in zip(results["vmmkit"], results["qemu"]))
            for key, _l, _h in ROWS))
    print(GOAL)
    if failed:
        print(f"rounds run again after a failure: {len(failed)}")
        for why in failed:
            print(f"  {why}")
    if not COUNTERS_UNAVAILABLE:
        print_counters(results, opts.mib, opts.count)
    return 0


def print_counters(results: dict[str, list[dict]], mib: int, count: int) -> None:
    """KVM's counters per MiB moved and per round trip, medians over rounds: what each VMM costs the guest."""
    per = {"h2g": (mib, "MiB"), "g2h": (mib, "MiB"), "rtt": (count, "round trip")}
    print("\nKVM counters of each guest (medians over rounds)")
    print(f"{'phase':<20}{'VMM':<8}" + "".join(f"{kvmstats.LABELS[k]:>9}" for k in kvmstats.FIELDS))
    for phase, (n, unit) in per.items():
        for vmm in ("qemu", "vmmkit"):
            runs = [r["kvm"][phase] for r in results[vmm] if phase in r.get("kvm", {})]
            if runs:
                print(f"{f'{phase} per {unit}':<20}{vmm:<8}"
                      + "".join(f"{statistics.median(r[k] for r in runs) / n:>9.1f}" for k in kvmstats.FIELDS))
    # A vCPU near 1.00 is saturated: the guest's CPU bounds the phase, and a VMM can only
    # speed it up by costing the guest less (exits, interrupts).
    print("\nThe VMM's CPU in each phase (medians over rounds): share of one CPU used by the vCPU thread "
          "and by the other threads")
    print(f"{'phase':<20}{'VMM':<8}{'vCPU':>8}{'others':>8}")
    for phase in per:
        for vmm in ("qemu", "vmmkit"):
            shares = [kvmstats.busy(r["kvm"][phase]) for r in results[vmm]
                      if "wall_ms" in r.get("kvm", {}).get(phase, {})]
            if shares:
                print(f"{phase:<20}{vmm:<8}{statistics.median(v for v, _ in shares):>8.2f}"
                      f"{statistics.median(o for _, o in shares):>8.2f}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="MiB sent each way (default 256)")
    parser.add_argument("--count", type=int, default=2000, help="64-byte round trips (default 2000)")
    parser.add_argument("--rounds", type=int, default=1, help="boots of each VMM (default 1)")
    parser.add_argument("--engine", default=None, help="the vsock device's engine option for vmmkit, if it has one")
    parser.add_argument("--halt-poll-ns", type=int, default=None,
                        help="[machine] halt_poll_ns for vmmkit's VM (default: unset; QEMU always keeps KVM's default)")
    parser.add_argument("--lab", choices=("auto", "always", "never"), default="auto",
                        help="run inside the KVM lab: auto (when this host's KVM cannot boot a stock kernel), "
                        "always or never")
    opts = parser.parse_args()
    if opts.mib < 1 or opts.count < 1 or opts.rounds < 1:
        parser.error("--mib, --count and --rounds must be at least 1")

    if in_lab() or opts.lab == "never" or (opts.lab == "auto" and kvm_status().usable):
        try:
            return benchmark(opts)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            raise SystemExit(f"vsock benchmark failed: {exc}") from None

    from vmmkit.lab.run import LAB_FAILED, run_in_lab
    argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
    # A lab machine that wedges (docs/lab.md) would otherwise hang here for good.
    timeout = 1200 + opts.rounds * (900 + 3 * opts.mib + opts.count / 20)
    log("running in the KVM lab")
    status = run_in_lab(argv, timeout=timeout)
    if status == LAB_FAILED:
        log("the KVM lab itself failed (see its console above and docs/lab.md): run the benchmark again")
    return status


if __name__ == "__main__":
    sys.exit(main())
