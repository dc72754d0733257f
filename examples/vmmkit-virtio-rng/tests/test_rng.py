"""Tests for the virtio-rng plugin, written with vmmkit's testing helpers as any plugin author would.

`virtio_harness` and `vmmkit_run` come from vmmkit's pytest plugin (installed with vmmkit).
Run with `python -m pytest` in this directory after `pip install .`.
"""

import pytest

from vmmkit_virtio_rng import VirtioRng


def test_fills_the_buffers_the_guest_posts(virtio_harness):
    bench = virtio_harness(VirtioRng("rng0"))
    written, (data,) = bench.request([], [256])
    assert written == 256
    assert data != bytes(256)
    written, (first, second) = bench.request([], [16, 48])
    assert written == 64 and first != bytes(16) and second != bytes(48)
    assert bench.interrupts >= 2


def test_caps_what_one_request_can_ask(virtio_harness):
    bench = virtio_harness(VirtioRng("rng0", max_bytes=100))
    written, (data,) = bench.request([], [4096])
    assert written == 100
    assert data[100:] == bytes(4096 - 100)


def test_reads_from_the_configured_source(virtio_harness, tmp_path):
    source = tmp_path / "pattern"
    source.write_bytes(b"0123456789" * 10)
    bench = virtio_harness(VirtioRng("rng0", source=str(source)))
    assert bench.request([], [10])[1] == [b"0123456789"]


def test_a_broken_ring_asks_for_a_reset(virtio_harness):
    bench = virtio_harness(VirtioRng("rng0"))
    q = bench.queues[0]
    q.write_desc(0, 1 << 45, 64, 2, 0)  # device-writable buffer far outside guest RAM
    q.publish(0)
    bench.driver.notify(0)
    with pytest.raises(AssertionError, match="reset"):
        bench.wait_used(0, 1, timeout=5)
    assert bench.needs_reset


@pytest.mark.guest
def test_the_guest_reads_hwrng(vmmkit_run):
    proc = vmmkit_run.exec('[[device]]\nkind = "virtio-rng"\n',
                           "cat /sys/class/misc/hw_random/rng_current; "
                           "dd if=/dev/hwrng bs=512 count=4 2>/dev/null | od -An -v -tx1 | tr -d ' \\n' | wc -c")
    assert proc.returncode == 0, proc.stderr.decode()
    current, hex_chars = proc.stdout.decode().split()
    assert current.startswith("virtio_rng")
    assert int(hex_chars) == 2 * 2048
