"""virtio-vsock on the real default guest, driven from the host as Firecracker's clients do.

One VM serves the whole module. Its ``--exec`` command starts socat
listeners in the guest (an echo server, a hashing sink, a pattern source, two
relays that open guest-initiated connections) and then waits in a last
listener on port 5999: the final test connects there, which ends the guest
command and so the VM. Until then the tests talk to the guest through
``uds_path`` (``CONNECT <port>\\n`` / ``OK <port>\\n``) and through host
listeners at ``<uds_path>_<port>``.

The default guest needs socat (``vmmkit guest build --with socat``, as
setup.sh does). ``VMMKIT_VSOCK_TEST_MIB`` sets the size of the echo test,
256 MiB each way by default; ``VMMKIT_VSOCK_ONEWAY_MIB`` that of the two
one-way tests (64 MiB: the guest's own hashing is slow in the emulated lab).
``VMMKIT_VSOCK_TEST_ENGINE`` picks the device's engine (the default, ``loop``, when unset).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from vmmkit.testing import kvm_debugfs

pytestmark = pytest.mark.guest

# `vmmkit run`, with the vsock device's debug log (resets and their reasons) in a file for failures.
VMMKIT_WITH_LOG = [sys.executable, "-c", "import logging, sys; from vmmkit.cli import main; "
                   "h = logging.FileHandler(sys.argv.pop(1)); "
                   "h.setFormatter(logging.Formatter('%(asctime)s %(message)s')); "
                   "log = logging.getLogger('vmmkit.vsock'); log.addHandler(h); log.setLevel(logging.DEBUG); "
                   "sys.exit(main())"]
MiB = 1 << 20
BULK = int(os.environ.get("VMMKIT_VSOCK_TEST_MIB", "256")) * MiB
ONE_WAY = int(os.environ.get("VMMKIT_VSOCK_ONEWAY_MIB", "64")) * MiB
ENGINE = os.environ.get("VMMKIT_VSOCK_TEST_ENGINE")
PATTERN_LINE = b"0123456789abcdef0123456789abcde\n"  # 32 bytes, what `yes 0123...cde` prints

ECHO, SINK, SOURCE, RELAY, RELAY_NOBODY, QUIT = 5000, 5001, 5002, 5003, 5004, 5999
HOST_PORT, HOST_PORT_NOBODY = 6000, 6001
NO_LISTENER = 7777
#: Seconds of silence on a stream between looks at KVM's counters for a livelocked vCPU.
LIVELOCK_LOOK = 15.0

# socat -t: after one direction ends, how long to wait for the other (the lab is slow). The relays
# are scripts because socat would split a VSOCK-CONNECT:2:PORT inside a SYSTEM: address at its colons.
GUEST_COMMAND = f"""
cat > /tmp/relay <<'EOF'
#!/bin/sh
exec socat - VSOCK-CONNECT:2:{HOST_PORT}
EOF
cat > /tmp/relay-nobody <<'EOF'
#!/bin/sh
socat -u OPEN:/dev/null VSOCK-CONNECT:2:{HOST_PORT_NOBODY} 2>/dev/null && echo connected || echo refused
EOF
chmod +x /tmp/relay /tmp/relay-nobody
L='socat -b 65536 -t 120'
$L VSOCK-LISTEN:{ECHO},fork,reuseaddr EXEC:cat &
$L VSOCK-LISTEN:{SINK},fork,reuseaddr SYSTEM:sha256sum &
$L VSOCK-LISTEN:{SOURCE},fork,reuseaddr SYSTEM:'yes {PATTERN_LINE.decode().strip()} | head -c {ONE_WAY}' &
$L VSOCK-LISTEN:{RELAY},fork,reuseaddr EXEC:/tmp/relay &
$L VSOCK-LISTEN:{RELAY_NOBODY},fork,reuseaddr EXEC:/tmp/relay-nobody &
socat -u VSOCK-LISTEN:{QUIT} OPEN:/dev/null
echo guest-done
"""


class Vm:
    def __init__(self, directory, uds, proc):
        self.directory, self.uds, self.proc = directory, uds, proc
        self.timings = {}
        # Set when the guest stopped answering: later tests fail at once instead of each waiting it out.
        self.unresponsive = None

    def api(self):
        from vmmkit.api.client import ApiClient
        return ApiClient(str(self.directory / "api.sock"), timeout=60)

    def paused_inspection(self) -> dict:
        """GET /vm/inspect: the VM is paused for it and resumed after."""
        api = self.api()
        api.call("PUT", "/vm/pause")
        try:
            return api.call("GET", "/vm/inspect")
        finally:
            api.call("PUT", "/vm/resume")

    def inspect(self) -> str:
        """The VM's vCPUs and queues as text, for a failure message: where a silent guest is stuck."""
        if self.proc.poll() is not None:
            return "(vmmkit has ended)"
        try:
            return json.dumps(self.paused_inspection())
        except Exception as exc:  # a diagnosis must not hide the failure it explains
            return f"(inspecting failed: {type(exc).__name__}: {exc})"

    def output(self):
        """What vmmkit printed so far: the guest's console, then vmmkit's own messages."""
        out = (self.directory / "stdout").read_bytes().decode(errors="replace")
        err = (self.directory / "stderr").read_bytes().decode(errors="replace")
        path = self.directory / "vsock.log"
        log = path.read_bytes().decode(errors="replace") if path.exists() else ""
        return (f"status {self.proc.poll()}\nstdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}\n"
                f"vsock log:\n{log[-6000:]}")

    def connect(self, port, deadline=120.0):
        """CONNECT to a guest port until its listener answers; what went wrong otherwise."""
        if self.unresponsive:
            raise AssertionError(f"the guest stopped answering in an earlier test: {self.unresponsive}")
        try:
            return connect(self.uds, port, deadline)
        except (AssertionError, OSError) as exc:
            # As at any guest test's timeout: a vCPU caught in KVM's emulator is the lab's
            # emulated CPU failing (docs/lab.md), and its words have the module run again.
            livelock = kvm_debugfs.emulation_livelock(self.proc.pid)  # None once vmmkit has ended
            self.unresponsive = f"CONNECT {port}: {type(exc).__name__}: {exc}" + (f"; {livelock}" if livelock else "")
            raise AssertionError(f"{self.unresponsive}\n{self.output()}\ninspect: {self.inspect()}") from None

    def receive(self, s) -> bytes:
        """recv_all, and what the VM printed if the guest went silent (for the socket's timeout).

        Every LIVELOCK_LOOK seconds of silence, KVM's counters are looked at:
        a vCPU caught in KVM's instruction emulator (the lab's emulated CPU
        failing, docs/lab.md) fails the test at once, with words that have
        the pytest plugin run the module again in a fresh lab.
        """
        silence = s.gettimeout()
        limit = float("inf") if silence is None else silence
        out = bytearray()
        quiet = 0.0
        s.settimeout(min(limit, LIVELOCK_LOOK))
        try:
            while True:
                had = len(out)
                try:
                    return recv_all(s, out)
                except TimeoutError:
                    # Silent since the last byte: this whole step, and the steps before it if none came.
                    quiet = quiet + s.gettimeout() if len(out) == had else s.gettimeout()
                if livelock := kvm_debugfs.emulation_livelock(self.proc.pid):
                    self.unresponsive = f"no bytes for {quiet:g}s on a stream; {livelock}"
                elif quiet >= limit:
                    self.unresponsive = f"no bytes for {quiet:g}s on a stream"
                else:
                    continue
                raise AssertionError(f"{self.unresponsive}\n{self.output()}\ninspect: {self.inspect()}")
        finally:
            s.settimeout(silence)


def try_connect(uds, port, timeout=30.0):
    """CONNECT once: (socket, the OK line) or (None, what came instead)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(uds)
    s.sendall(f"CONNECT {port}\n".encode())
    line = b""
    try:
        while not line.endswith(b"\n"):
            chunk = s.recv(1)
            if not chunk:
                break
            line += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    if line.startswith(b"OK "):
        return s, line
    s.close()
    return None, line


def connect(uds, port, deadline=120.0):
    """CONNECT until the guest's listener answers (it may not be up yet); the connected socket."""
    end = time.monotonic() + deadline
    while True:
        s, line = try_connect(uds, port)
        if s is not None:
            assert line.rstrip(b"\n")[3:].isdigit(), line
            return s
        if time.monotonic() > end:
            raise AssertionError(f"no guest listener on port {port} within {deadline}s (last answer {line!r})")
        time.sleep(0.2)


def recv_all(s, out=None) -> bytes:
    """Everything until the stream ends (a reset, when our own bytes went unread, ends it too).

    *out*, when given, collects the bytes as they come, so a caller keeps them when a timeout
    cuts the read short.
    """
    out = bytearray() if out is None else out
    while True:
        try:
            chunk = s.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return bytes(out)
        out += chunk


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    from vmmkit.guest import build
    if "socat" not in build.show().extras:
        pytest.fail("the default guest has no socat: run `vmmkit guest build --with socat` (setup.sh does)")
    directory = tmp_path_factory.mktemp("vsock")
    uds = str(directory / "v.sock")
    config = directory / "vm.toml"
    # The guest prints warnings and oopses, and an oops panics and so ends the VM: a guest that
    # broke shows why, at once, instead of going silent.
    config.write_text(f'[boot]\ncmdline = "quiet loglevel=5 oops=panic"\n'
                      f'[api]\nsocket = "{directory / "api.sock"}"\n'
                      f'[[device]]\nkind = "vsock"\nguest_cid = 3\nuds_path = "{uds}"\n'
                      + (f'engine = "{ENGINE}"\n' if ENGINE else ""))
    # Files, not pipes: a console nobody reads must never stall the guest.
    with open(directory / "stdout", "wb") as out, open(directory / "stderr", "wb") as err:
        proc = subprocess.Popen(VMMKIT_WITH_LOG + [str(directory / "vsock.log"), "run", str(config),
                                                   "--exec", GUEST_COMMAND], stdout=out, stderr=err)
    machine = Vm(directory, uds, proc)
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(uds):
            assert proc.poll() is None, f"vmmkit run ended before creating {uds}:\n{machine.output()}"
            assert time.monotonic() < deadline, f"{uds} did not appear"
            time.sleep(0.1)
        started = time.monotonic()
        machine.connect(ECHO, deadline=300).close()
        machine.timings["socket_to_echo_ready_s"] = round(time.monotonic() - started, 1)
        yield machine
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        print(f"\n--- vmmkit run ---\n{machine.output()}")


def test_uds_path_is_a_socket_only_its_owner_may_use(vm):
    st = os.stat(vm.uds)
    assert oct(st.st_mode & 0o777) == "0o600"


def test_echo_through_a_host_initiated_connection(vm):
    s = vm.connect(ECHO)
    s.sendall(b"hello vsock\n")
    s.shutdown(socket.SHUT_WR)
    assert vm.receive(s) == b"hello vsock\n"
    s.close()


def test_64_connections_at_once_each_with_its_own_data(vm):
    socks = [vm.connect(ECHO) for _ in range(64)]
    data = [os.urandom(64 * 1024) + f"connection {i}\n".encode() for i in range(64)]
    results = [None] * 64
    silent = []  # what vm.receive said when a stream went silent

    def talk(i):
        sender = threading.Thread(target=lambda: (socks[i].sendall(data[i]), socks[i].shutdown(socket.SHUT_WR)))
        sender.start()
        try:
            results[i] = vm.receive(socks[i])
        except AssertionError as exc:
            silent.append(str(exc))
        sender.join()

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for s in socks:
        s.close()
    assert not silent, silent[0]
    assert [r == d for r, d in zip(results, data)] == [True] * 64


def test_inspecting_the_paused_guest_shows_its_vcpu_and_queues(vm):
    seen = vm.paused_inspection()
    cpu, = seen["vcpus"]
    assert cpu["cr0"] & (1 << 31) and cpu["efer"] & (1 << 10), cpu  # paging on, long mode active
    assert cpu["rip"] >= 1 << 47 or cpu["cs"] & 3 == 3, cpu  # the kernel's half, or user mode
    dev, = seen["devices"]
    assert dev["id"] == "vsock0" and dev["status"] & 4 and not dev["broken"], dev  # DRIVER_OK
    assert len(dev["queues"]) == 3 and all(q["ready"] and q["event_idx"] for q in dev["queues"]), dev
    for q in dev["queues"]:
        assert q["used_idx"] == q["next_used"], q  # the device published all it used
        assert (q["avail_idx"] - q["next_avail"]) & 0xFFFF <= q["size"], q
    rx = dev["queues"][0]
    assert (rx["avail_idx"] - rx["next_avail"]) & 0xFFFF > 0, rx  # an idle guest keeps rx buffers posted
    with pytest.raises(Exception, match="only a paused VM"):
        vm.api().call("GET", "/vm/inspect")
    # ... and the guest goes on.
    s = vm.connect(ECHO)
    s.sendall(b"after inspect\n")
    s.shutdown(socket.SHUT_WR)
    assert vm.receive(s) == b"after inspect\n"


def test_bulk_echo_both_ways_at_once(vm):
    payload = os.urandom(BULK)
    s = vm.connect(ECHO)
    s.settimeout(300)
    started = time.monotonic()
    sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
    sender.start()
    echoed = vm.receive(s)
    sender.join()
    elapsed = time.monotonic() - started
    s.close()
    assert len(echoed) == len(payload)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    print(f"\nvsock echo: {BULK // MiB} MiB each way in {elapsed:.1f}s "
          f"({BULK / MiB / elapsed:.1f} MiB/s each way)")


def test_bulk_host_to_guest_checked_by_the_guest(vm):
    payload = os.urandom(ONE_WAY)
    s = vm.connect(SINK)
    s.settimeout(300)
    started = time.monotonic()
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    answer = vm.receive(s)
    elapsed = time.monotonic() - started
    s.close()
    assert answer.split()[0].decode() == hashlib.sha256(payload).hexdigest()
    print(f"\nvsock host->guest: {ONE_WAY // MiB} MiB in {elapsed:.1f}s ({ONE_WAY / MiB / elapsed:.1f} MiB/s)")


def test_bulk_guest_to_host(vm):
    s = vm.connect(SOURCE)
    s.settimeout(300)
    started = time.monotonic()
    got = vm.receive(s)
    elapsed = time.monotonic() - started
    s.close()
    expected = (PATTERN_LINE * (ONE_WAY // len(PATTERN_LINE) + 1))[:ONE_WAY]
    assert len(got) == ONE_WAY
    assert hashlib.sha256(got).digest() == hashlib.sha256(expected).digest()
    print(f"\nvsock guest->host: {ONE_WAY // MiB} MiB in {elapsed:.1f}s ({ONE_WAY / MiB / elapsed:.1f} MiB/s)")


def test_guest_initiated_connection_reaches_the_host_listener(vm):
    path = f"{vm.uds}_{HOST_PORT}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    listener.settimeout(120)
    try:
        s = vm.connect(RELAY)  # the guest relays this stream to a new connection to CID 2, port 6000
        s.sendall(b"ping\n")
        host_side, _ = listener.accept()
        host_side.settimeout(120)
        assert host_side.recv(5) == b"ping\n"
        host_side.sendall(b"pong\n")
        assert s.recv(5) == b"pong\n"
        host_side.close()
        s.close()
    finally:
        listener.close()
        os.unlink(path)


def test_guest_connecting_where_no_host_listener_is_refused(vm):
    s = vm.connect(RELAY_NOBODY)
    s.settimeout(120)
    started = time.monotonic()
    answer = vm.receive(s)
    assert answer == b"refused\n"
    assert time.monotonic() - started < 60
    s.close()


def test_connecting_to_a_port_with_no_guest_listener_is_closed_promptly(vm):
    started = time.monotonic()
    s, line = try_connect(vm.uds, NO_LISTENER)
    elapsed = time.monotonic() - started
    assert s is None and line == b""
    # The guest's RST closes the stream (in milliseconds, even in the lab), well before the
    # device gives up on an unanswered request (REQUEST_TIMEOUT, 5 s).
    assert elapsed < 3, f"closed after {elapsed:.1f}s: by the request timeout, not by the guest's RST"
    print(f"\nvsock: refused CONNECT closed in {elapsed * 1000:.0f} ms")


def test_malformed_connect_line_closes_only_that_stream(vm):
    good = vm.connect(ECHO)
    for line in (b"BOGUS 5000\n", b"CONNECT\n", b"CONNECT 5000" + b" " * 40):
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bad.settimeout(30)
        bad.connect(vm.uds)
        bad.sendall(line)
        assert recv_all(bad) == b""
        bad.close()
    good.sendall(b"still fine\n")
    good.shutdown(socket.SHUT_WR)
    assert vm.receive(good) == b"still fine\n"
    good.close()


def test_zz_guest_ends_when_told_and_uds_path_is_removed(vm):
    # Last in this module: the guest command's final listener ends it, and with it the VM.
    vm.connect(QUIT).close()
    try:
        vm.proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        vm.proc.kill()
        vm.proc.wait()
        raise AssertionError(f"the VM did not stop:\n{vm.output()}")
    assert vm.proc.returncode == 0, vm.output()
    assert (vm.directory / "stdout").read_bytes().rstrip().endswith(b"guest-done"), vm.output()
    assert not os.path.exists(vm.uds)
    print(f"\nvsock timings: {vm.timings}")
