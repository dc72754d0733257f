"""Host-only tests for vmmkit.markers.MarkerStream, the console filter for --exec and the lab.

The markers here share a prefix ("<<") and the stream is full of near misses,
so a chunk boundary inside a marker, or inside something that only looks like
the start of one, is exercised at every offset.
"""

from __future__ import annotations

import io
import itertools

import pytest

from vmmkit.guest.execcmd import exec_stream
from vmmkit.markers import MarkerStream

START = b"<<S>>"
END = b"<<E>>"
BEFORE = b"\x1b[2J BIOS <<X <<S> <<SS>> boot <"
BODY = b"hello <<E <<E> x <<< <<S>> <<E>\n <"
AFTER = b"\r\nreboot: Power down <<S>> <<E>> bye <<"


class Recorder(io.BytesIO):
    """BytesIO that also records whether it was flushed after every write."""

    def __init__(self):
        super().__init__()
        self.unflushed = 0

    def write(self, b):
        self.unflushed += 1
        return super().write(b)

    def flush(self):
        self.unflushed = 0


def run(chunks, *, with_status=False):
    out = Recorder()
    stream = MarkerStream(out, START, END, with_status=with_status)
    for chunk in chunks:
        stream.feed(chunk)
    stream.close()
    assert out.unflushed == 0, "output must be flushed as it is written"
    return out.getvalue(), bytes(stream.log), stream.status


def splits2(data):
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]


def splits3(data):
    for i, j in itertools.combinations(range(len(data) + 1), 2):
        yield [data[:i], data[i:j], data[j:]]


STREAM = BEFORE + START + BODY + END + AFTER
STATUS_STREAM = BEFORE + START + BODY + END + b"7]" + AFTER


def test_whole_stream_in_one_chunk():
    assert run([STREAM]) == (BODY, BEFORE + AFTER, None)
    assert run([STATUS_STREAM], with_status=True) == (BODY, BEFORE + AFTER, 7)


def test_byte_by_byte():
    chunks = [STREAM[i:i + 1] for i in range(len(STREAM))]
    assert run(chunks) == (BODY, BEFORE + AFTER, None)
    chunks = [STATUS_STREAM[i:i + 1] for i in range(len(STATUS_STREAM))]
    assert run(chunks, with_status=True) == (BODY, BEFORE + AFTER, 7)


def test_every_two_chunk_split():
    for chunks in splits2(STREAM):
        assert run(chunks) == (BODY, BEFORE + AFTER, None), chunks
    for chunks in splits2(STATUS_STREAM):
        assert run(chunks, with_status=True) == (BODY, BEFORE + AFTER, 7), chunks


def test_every_three_chunk_split():
    for chunks in splits3(STATUS_STREAM):
        assert run(chunks, with_status=True) == (BODY, BEFORE + AFTER, 7), chunks


def test_empty_chunks_are_harmless():
    chunks = [b"", BEFORE, b"", START, b"", BODY, b"", END, b"", AFTER, b""]
    assert run(chunks) == (BODY, BEFORE + AFTER, None)


def test_empty_output_between_adjacent_markers():
    assert run([b"x" + START + END + b"y"]) == (b"", b"xy", None)
    assert run([b"x", START[:2], START[2:] + END[:1], END[1:], b"y"]) == (b"", b"xy", None)


def test_without_status_the_text_after_end_is_log():
    assert run([START + b"out" + END + b"7]tail"]) == (b"out", b"7]tail", None)


def test_markers_after_the_end_are_not_output():
    """Once the end marker is seen, a second start marker does not reopen the output."""
    assert run([START + b"one" + END + b" " + START + b"two" + END]) == (
        b"one", b" " + START + b"two" + END, None)


# --- Status -----------------------------------------------------------------------


@pytest.mark.parametrize("text, status", [
    (b"7]", 7), (b"0]", 0), (b"123]", 123), (b"255]tail", 255),
    (b"]", None), (b"12a]", None), (b"-1]", None), (b" 1]", None),
])
def test_status_parsing(text, status):
    _, _, got = run([START + b"x" + END + text], with_status=True)
    assert got == status


def test_status_split_across_chunks():
    tail = END + b"123]after"
    for chunks in splits3(tail):
        out, log, status = run([START + b"body"] + chunks, with_status=True)
        assert (out, status) == (b"body", 123), chunks
        assert log == b"after", chunks


def test_missing_bracket_gives_no_status_after_close():
    out = io.BytesIO()
    stream = MarkerStream(out, START, END, with_status=True)
    stream.feed(START + b"body" + END + b"7")
    assert stream.status is None
    stream.close()
    assert stream.status is None
    assert out.getvalue() == b"body"


@pytest.mark.parametrize("noise", [b"Kernel panic - not syncing: Attempted to kill init!\n", b"oops] more", b"7"])
def test_text_after_end_that_is_not_a_status_goes_to_the_log(noise):
    """A tail that is not digits + ']' is console text and belongs in the log (also when the stream ends)."""
    in_threes = [noise[i:i + 3] for i in range(0, len(noise), 3)]
    for chunks in ([START + b"o" + END + noise], [START + b"o" + END] + in_threes):
        out, log, status = run(chunks, with_status=True)
        assert (out, status) == (b"o", None)
        assert noise in log, log


def test_exec_stream_uses_the_guest_markers():
    """The real --exec markers (with their ESC bytes and newline) work through the same class."""
    from vmmkit.guest.build import EXIT_MARKER, START_MARKER
    out = io.BytesIO()
    stream = exec_stream(out)
    data = b"[    0.1] boot\n" + START_MARKER.encode() + b"result\n" + EXIT_MARKER.encode() + b"42]\n[ 1.0] reboot\n"
    for i in range(0, len(data), 5):
        stream.feed(data[i:i + 5])
    stream.close()
    assert (out.getvalue(), stream.status) == (b"result\n", 42)
    assert bytes(stream.log) == b"[    0.1] boot\n\n[ 1.0] reboot\n"


# --- Partial markers and close() ------------------------------------------------------


def test_prefix_of_end_marker_is_forwarded_intact():
    near_misses = [b"<", b"<<", b"<<E", b"<<E>", b"<<<E>", b"<<E<<E>", b"<<E>x"]
    for miss in near_misses:
        for tail in (b"", b"x", b" more"):
            body = b"a" + miss + tail
            for chunks in splits2(body):
                out, log, _ = run([START] + chunks + [END + b"after"])
                assert out == body, (miss, tail, chunks)
                assert log == b"after"


def test_partial_end_prefix_is_held_back_until_resolved():
    out = io.BytesIO()
    stream = MarkerStream(out, START, END)
    stream.feed(START + b"data<<E")
    assert out.getvalue() == b"data"  # "<<E" may still become the end marker
    stream.feed(b"!")
    assert out.getvalue() == b"data<<E!"
    stream.feed(b"<<E")
    stream.feed(b">>rest")
    assert out.getvalue() == b"data<<E!"
    assert bytes(stream.log) == b"rest"


@pytest.mark.parametrize("tail", [b"<", b"<<", b"<<E", b"<<E>"])
def test_close_flushes_a_held_back_prefix(tail):
    out = io.BytesIO()
    stream = MarkerStream(out, START, END)
    stream.feed(START + b"partial " + tail)
    stream.close()
    assert out.getvalue() == b"partial " + tail
    stream.close()  # a second close adds nothing
    assert out.getvalue() == b"partial " + tail


def test_stream_ending_before_the_start_marker_keeps_everything_in_the_log():
    """A guest that panics before the command runs: the whole console is in the log for the error."""
    data = b"Kernel panic - not syncing: VFS: Unable to mount root fs <<S>"
    for chunks in splits2(data):
        out, log, status = run(chunks)
        assert (out, status) == (b"", None)
        assert log == data, chunks


def test_log_keeps_the_last_64_kib():
    noise = bytes(i % 251 for i in range(200_000))
    out, log, _ = run([noise[i:i + 4096] for i in range(0, len(noise), 4096)])
    assert out == b""
    assert log == noise[-65536:]
