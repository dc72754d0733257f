"""virtio-mem on a real guest: the stock kernel's virtio_mem driver plugs and unplugs as vmmkit asks.

One VM (1 vCPU, 256 MiB, a 1 GiB hotplug region, nothing plugged) runs a
script that reports MemTotal as it changes; the test resizes it through the
control API as a user would (`vmmkit ctl resize-memory`, and PUT requests),
has the guest fill 400 MiB of the new memory and read it back, then takes
the memory away and checks that the VMM's RSS falls with it.
"""

import hashlib
import json
import subprocess
import sys
import threading
import time

import pytest

from api_unix import unix_session

pytestmark = pytest.mark.guest

VMMKIT = [sys.executable, "-m", "vmmkit"]
BOOT_TIMEOUT = 300  # the lab is an emulated machine
STEP_TIMEOUT = 300
FILL_TIMEOUT = 1200  # writing and summing 400 MiB in a busy emulated lab: minutes
MiB = 1 << 20
FILL = 400 * MiB
PATTERN = b"abcdefgh\n"  # what busybox `yes abcdefgh` writes

CONFIG = """\
[machine]
vcpus = 1
memory = "256M"

[[device]]
kind = "virtio-mem"
id = "mem0"
region = "1G"
"""

# MemTotal as it changes: the base, grown (then fill 400 MiB in a tmpfs that
# only the plugged memory can hold, and checksum it), then shrunk back.
SCRIPT = """\
m(){ awk '/^MemTotal/{print $2}' /proc/meminfo;}
b=$(m);echo base $b
while [ $(m) -lt $((b+500000)) ];do sleep 0.2;done;echo grown $(m)
mkdir /f;mount -t tmpfs -o size=420m t /f
yes abcdefgh|head -c %d >/f/x;echo sum $(md5sum </f/x)
rm /f/x;umount /f;echo freed
while [ $(m) -gt $((b+100000)) ];do sleep 0.2;done;echo shrunk $(m)
sleep 900
""" % FILL


class Guest:
    """`vmmkit run --api-sock` in the background, its console lines collected."""

    def __init__(self, tmp_path):
        config = tmp_path / "vm.toml"
        config.write_text(CONFIG)
        self.sock = str(tmp_path / "api.sock")
        self.proc = subprocess.Popen(VMMKIT + ["run", str(config), "--api-sock", self.sock, "--exec", SCRIPT],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines, self.stderr = [], b""
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: setattr(self, "stderr", self.proc.stderr.read()), daemon=True).start()

    def _read(self):
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").strip())
                self._cond.notify_all()

    def word(self, key, timeout):
        """The rest of the first console line starting with *key*, waiting for it."""
        deadline = time.monotonic() + timeout  # a hang guard, not a performance check
        with self._cond:
            while True:
                for line in self.lines:
                    if line.split(" ", 1)[0] == key:
                        return line.split(" ", 1)[1] if " " in line else ""
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(f"never saw {key!r}; exit status {self.proc.poll()}; console tail "
                                         f"{self.lines[-15:]}; stderr {self.stderr[-2000:]!r}")
                self._cond.wait(1.0)

    def ctl(self, *args):
        return subprocess.run(VMMKIT + ["ctl", "--api-sock", self.sock, *args], capture_output=True, text=True,
                              timeout=STEP_TIMEOUT + 60)

    def status(self):
        with unix_session(self.sock) as session:
            return session.get("http://localhost/vm/virtio-mem").json()["devices"][0]

    def wait_plugged(self, size, timeout):
        deadline = time.monotonic() + timeout
        while (status := self.status())["plugged_size"] != size:
            assert time.monotonic() < deadline, f"the guest did not get to {size} bytes plugged: {status}"
            time.sleep(0.5)
        return status

    def rss(self):
        """(VmRSS of vmmkit, Rss of the mapping holding the 1 GiB hotplug region), in bytes.

        The region is one anonymous mapping, which the host kernel may merge with
        a neighbour (guest RAM): the smallest mapping of at least 1 GiB is it.
        """
        with open(f"/proc/{self.proc.pid}/status") as f:
            total = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
        big = []  # (size kB, rss kB) of mappings of 1 GiB or more
        with open(f"/proc/{self.proc.pid}/smaps") as f:
            size = None
            for line in f:
                if line.startswith("Size:"):
                    size = int(line.split()[1])
                elif line.startswith("Rss:") and size is not None and size >= 1 << 20:
                    big.append((size, int(line.split()[1])))
        assert big, "no mapping of 1 GiB or more (the hotplug region) in vmmkit's smaps"
        return total, min(big)[1] * 1024

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def guest(tmp_path):
    g = Guest(tmp_path)
    yield g
    g.stop()


def test_resize_plugs_usable_memory_and_unplug_gives_it_back(guest):
    base = int(guest.word("base", BOOT_TIMEOUT))
    assert base < 256 * 1024, f"MemTotal {base} kB: the hotplug region must not be RAM at boot"
    status = guest.status()
    assert status["region_size"] == 1 << 30 and status["plugged_size"] == 0
    assert status["addr"] >= 1 << 32 and status["addr"] % (128 * MiB) == 0

    # Invalid sizes are refused with a clear message and change nothing.
    for size, message in [("3M", "not a multiple of the block size 2M"),
                          ("2G", "larger than the hotplug region (1G)")]:
        refused = guest.ctl("resize-memory", size)
        assert refused.returncode == 1 and message in refused.stderr, refused
    refused = guest.ctl("call", "PUT", "/vm/virtio-mem/resize", json.dumps({"size": -2 * MiB}))
    assert refused.returncode == 1 and "cannot be negative" in refused.stderr, refused
    assert guest.status()["requested_size"] == 0

    # Grow to 512 MiB: the answer says what is plugged so far; the guest onlines it by itself.
    grown = guest.ctl("resize-memory", "512M", "--json")
    assert grown.returncode == 0, grown
    answer = json.loads(grown.stdout)
    assert answer["requested_size"] == 512 * MiB and 0 <= answer["plugged_size"] <= 512 * MiB
    total = int(guest.word("grown", STEP_TIMEOUT))
    assert 500 * 1024 <= total - base <= 520 * 1024, (base, total)
    guest.wait_plugged(512 * MiB, STEP_TIMEOUT)

    # 400 MiB written into the new memory and read back intact.
    expected = hashlib.md5((PATTERN * (FILL // len(PATTERN) + 1))[:FILL]).hexdigest()
    assert guest.word("sum", FILL_TIMEOUT).split()[0] == expected
    guest.word("freed", STEP_TIMEOUT)
    rss_before, region_before = guest.rss()

    # Shrink to 0: MemTotal falls back and the host gets the memory back.
    with unix_session(guest.sock) as session:
        answer = session.put("http://localhost/vm/virtio-mem/resize", json={"size": "0"})
    assert answer.status_code == 200 and answer.json()["requested_size"] == 0, answer.text
    shrunk = int(guest.word("shrunk", STEP_TIMEOUT))
    assert shrunk <= base + 100 * 1024, (base, shrunk)
    guest.wait_plugged(0, STEP_TIMEOUT)
    rss_after, region_after = guest.rss()
    given_back = region_before - region_after
    assert given_back >= 200 * MiB, (region_before, region_after)
    # The VMM's RSS falls by what the region gave back (nothing else grew meanwhile), and that
    # is most of the 400 MiB the guest had written and freed.
    assert rss_before - rss_after >= 0.9 * given_back, (rss_before, rss_after, given_back)
    assert rss_before - rss_after >= FILL // 2, (rss_before, rss_after)
