"""vmmkit.testing.pipes.read_until: a child's output against a deadline."""

import subprocess
import sys
import time

from vmmkit.testing.pipes import read_until


def child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)


def test_a_silent_child_is_left_at_the_deadline():
    proc = child("import os, time; os.write(1, b'up'); time.sleep(60)")
    got = bytearray()
    try:
        started = time.monotonic()
        assert read_until(proc.stdout, time.monotonic() + 1.0, got.extend) is False
        assert time.monotonic() - started < 30
        assert bytes(got) == b"up"
        assert proc.poll() is None  # neither killed nor waited for
    finally:
        proc.kill()
        proc.wait()


def test_the_end_of_the_output_ends_the_read():
    proc = child("print('a'); print('b')")
    got = bytearray()
    assert read_until(proc.stdout, time.monotonic() + 60, got.extend) is True
    assert bytes(got) == b"a\nb\n"
    assert proc.wait() == 0


def test_done_stops_the_read_before_the_end():
    proc = child("import os, time; os.write(1, b'ready\\n'); time.sleep(60)")  # one write: one chunk
    got = bytearray()
    try:
        assert read_until(proc.stdout, time.monotonic() + 60, got.extend, done=lambda: b"ready" in got) is True
        assert bytes(got) == b"ready\n"
    finally:
        proc.kill()
        proc.wait()
