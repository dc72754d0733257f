"""Host-only tests for vmmkit.epoll.

No timing asserts: every wait uses an Event with a generous timeout, only so
that a bug makes the test fail instead of hanging.
"""

from __future__ import annotations

import logging
import os
import threading

import pytest

from vmmkit.epoll import EPOLLIN, EventLoop

T = 10  # seconds; only reached when something is broken


@pytest.fixture
def loop():
    lp = EventLoop("device:test")
    th = threading.Thread(target=lp.run, daemon=True)
    th.start()
    yield lp
    lp.kill()
    th.join(T)
    assert not th.is_alive()
    lp.close()


def make_efd():
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def test_callback_runs_on_readiness(loop):
    efd = make_efd()
    got = []
    done = threading.Event()

    def cb(fd, events):
        got.append((fd, events, os.eventfd_read(fd), threading.current_thread().name))
        done.set()

    loop.add(efd, cb)
    os.eventfd_write(efd, 3)
    assert done.wait(T)
    assert got[0][:3] == (efd, EPOLLIN, 3)
    assert got[0][3] != threading.current_thread().name   # ran in the worker
    loop.remove(efd)
    os.close(efd)


def test_add_twice_and_remove_unknown(loop):
    efd = make_efd()
    loop.add(efd, lambda fd, ev: None)
    with pytest.raises(FileExistsError):
        loop.add(efd, lambda fd, ev: None)
    loop.remove(efd)
    with pytest.raises(KeyError):
        loop.remove(efd)
    os.close(efd)


def test_pause_blocks_callbacks_until_resume(loop):
    efd = make_efd()
    calls = []
    called = threading.Event()

    def cb(fd, events):
        calls.append(os.eventfd_read(fd))
        called.set()

    loop.add(efd, cb)
    assert loop.pause(timeout=T) is True
    assert loop.paused
    os.eventfd_write(efd, 1)
    # The worker is paused: the callback must not run. A negative cannot be
    # proven without waiting; a short wait can only miss a bug, never flake.
    assert loop.pause(timeout=T) is True           # idempotent
    assert not called.wait(0.2)
    assert calls == []
    loop.resume()
    assert not loop.paused
    assert called.wait(T)
    assert calls == [1]
    loop.remove(efd)
    os.close(efd)


def test_pause_waits_for_running_callback():
    """pause() returns only after the callback in progress has finished."""
    lp = EventLoop("device:slow")
    th = threading.Thread(target=lp.run, daemon=True)
    th.start()
    efd = make_efd()
    inside = threading.Event()
    proceed = threading.Event()
    finished = threading.Event()

    def cb(fd, events):
        os.eventfd_read(fd)
        inside.set()
        proceed.wait(T)
        finished.set()

    lp.add(efd, cb)
    os.eventfd_write(efd, 1)
    assert inside.wait(T)
    result = []
    pauser = threading.Thread(target=lambda: result.append(lp.pause(timeout=T)))
    pauser.start()
    assert not finished.is_set()
    proceed.set()
    pauser.join(T)
    assert result == [True]
    assert finished.is_set()          # the callback completed before pause returned
    lp.kill()
    th.join(T)
    assert not th.is_alive()
    lp.close()
    os.close(efd)


def test_pause_before_run_starts_paused():
    lp = EventLoop("device:early")
    efd = make_efd()
    called = threading.Event()
    lp.add(efd, lambda fd, ev: (os.eventfd_read(fd), called.set()))
    os.eventfd_write(efd, 1)
    assert lp.pause() is True         # not running: returns at once
    assert lp.paused
    th = threading.Thread(target=lp.run, daemon=True)
    th.start()
    assert not called.wait(0.2)
    lp.resume()
    assert called.wait(T)
    lp.kill()
    th.join(T)
    assert not th.is_alive()
    lp.close()
    os.close(efd)


def test_kill_ends_run_even_when_paused():
    lp = EventLoop("device:k")
    th = threading.Thread(target=lp.run, daemon=True)
    th.start()
    assert lp.pause(timeout=T)
    lp.kill()
    th.join(T)
    assert not th.is_alive()
    assert lp.killed
    assert lp.pause(timeout=T) is True   # finished loop: nothing to wait for
    lp.close()


def test_kill_before_run():
    lp = EventLoop("device:k2")
    lp.kill()
    lp.run()                           # returns at once
    with pytest.raises(RuntimeError):
        lp.run()
    lp.close()


def test_pause_from_inside_callback():
    lp = EventLoop("device:self")
    efd = make_efd()
    calls = []
    paused_self = threading.Event()

    def cb(fd, events):
        os.eventfd_read(fd)
        calls.append(1)
        assert lp.pause() is True       # must not deadlock waiting for itself
        paused_self.set()

    lp.add(efd, cb)
    th = threading.Thread(target=lp.run, daemon=True)
    th.start()
    os.eventfd_write(efd, 1)
    assert paused_self.wait(T)
    # pause() from another thread now returns once the worker has acked.
    assert lp.pause(timeout=T)
    os.eventfd_write(efd, 1)
    th.join(0.2)
    assert th.is_alive() and calls == [1]
    lp.resume()
    lp.kill()
    th.join(T)
    assert not th.is_alive()
    lp.close()
    os.close(efd)


def test_callback_exception_default_logs_and_stops(caplog):
    lp = EventLoop("device:broken")
    efd = make_efd()

    def cb(fd, events):
        os.eventfd_read(fd)
        raise ValueError("boom")

    lp.add(efd, cb)
    os.eventfd_write(efd, 1)
    th = threading.Thread(target=lp.run, daemon=True)
    with caplog.at_level(logging.ERROR, logger="vmmkit.epoll"):
        th.start()
        th.join(T)
    assert not th.is_alive()           # the loop stopped by itself
    assert isinstance(lp.error, ValueError)
    assert any("device:broken" in r.getMessage() for r in caplog.records)
    lp.close()
    os.close(efd)


def test_callback_exception_custom_hook_keeps_going():
    errors = []
    second = threading.Event()
    lp = EventLoop("device:resilient", on_error=errors.append)
    a, b = make_efd(), make_efd()

    def bad(fd, events):
        os.eventfd_read(fd)
        raise OSError("io error")

    def good(fd, events):
        os.eventfd_read(fd)
        second.set()

    lp.add(a, bad)
    lp.add(b, good)
    th = threading.Thread(target=lp.run, daemon=True)
    th.start()
    os.eventfd_write(a, 1)
    os.eventfd_write(b, 1)
    assert second.wait(T)
    lp.kill()
    th.join(T)
    assert not th.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], OSError)
    lp.close()
    for fd in (a, b):
        os.close(fd)


def test_pause_and_resume_hooks_run_in_worker():
    seen = []
    resumed = threading.Event()

    def on_resume():
        seen.append(("resume", threading.current_thread().name))
        resumed.set()

    lp = EventLoop("device:hooks",
                   on_pause=lambda: seen.append(("pause", threading.current_thread().name)),
                   on_resume=on_resume)
    efd = make_efd()
    started = threading.Event()
    lp.add(efd, lambda fd, ev: (os.eventfd_read(fd), started.set()))
    th = threading.Thread(target=lp.run, name="worker", daemon=True)
    th.start()
    os.eventfd_write(efd, 1)
    assert started.wait(T)                 # the worker is inside run()
    assert lp.pause(timeout=T)
    assert seen == [("pause", "worker")]   # ran before pause() returned
    lp.resume()
    assert resumed.wait(T)
    lp.kill()
    th.join(T)
    assert seen == [("pause", "worker"), ("resume", "worker")]
    lp.close()
    os.close(efd)


def test_remove_from_callback(loop):
    efd = make_efd()
    calls = []
    done = threading.Event()

    def cb(fd, events):
        os.eventfd_read(fd)
        calls.append(fd)
        loop.remove(fd)
        done.set()

    loop.add(efd, cb)
    os.eventfd_write(efd, 1)
    assert done.wait(T)
    os.eventfd_write(efd, 1)           # no longer watched
    assert loop.pause(timeout=T)       # a full round-trip through the worker
    loop.resume()
    assert calls == [efd]
    os.close(efd)
