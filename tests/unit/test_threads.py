"""Host-only tests for vmmkit.threads."""

from __future__ import annotations

import threading

import pytest

from vmmkit import threads
from vmmkit.errors import VmmkitError
from vmmkit.threads import (ROLE_API, ROLE_DEVICE, ROLE_MAIN, ROLE_VCPU, ThreadStartError,
                            add_thread_start_callback, remove_thread_start_callback,
                            start_thread, threads_by_role)

T = 10


@pytest.fixture(autouse=True)
def clean_callbacks():
    saved = list(threads._callbacks)
    yield
    threads._callbacks[:] = saved


def _os_name(t: threading.Thread) -> str:
    with open(f"/proc/self/task/{t.native_id}/comm") as f:
        return f.read().strip()


def test_callbacks_run_in_new_thread_before_target():
    events = []

    def global_cb(role, name):
        events.append(("global", role, name, threading.current_thread().name))

    def local_cb(role, name):
        events.append(("local", role, name, threading.current_thread().name))

    def target(x, y):
        events.append(("target", x + y, threading.current_thread().name))

    add_thread_start_callback(global_cb)
    t = start_thread(ROLE_VCPU, "vcpu:0", target, 1, 2, on_start=local_cb)
    t.join_checked(T)
    me = "vmmkit:vcpu:0"
    assert events == [("local", "vcpu", "vcpu:0", me), ("global", "vcpu", "vcpu:0", me),
                      ("target", 3, me)]
    assert t.name == me and t.role == ROLE_VCPU and t.vmm_name == "vcpu:0"
    remove_thread_start_callback(global_cb)


def test_failing_callback_prevents_target():
    ran = threading.Event()

    def bad(role, name):
        raise OSError("seccomp: not supported")

    add_thread_start_callback(bad)
    t = start_thread(ROLE_DEVICE, "device:virtio-blk0", ran.set)
    with pytest.raises(ThreadStartError) as ei:
        t.join_checked(T)
    assert not ran.is_set()
    assert isinstance(ei.value, VmmkitError)
    assert "device:virtio-blk0" in str(ei.value) and "seccomp: not supported" in str(ei.value)
    assert isinstance(ei.value.__cause__, OSError)


def test_failing_on_start_prevents_target_and_skips_rest():
    ran = []
    add_thread_start_callback(lambda role, name: ran.append("global"))

    def bad(role, name):
        raise RuntimeError("nope")

    t = start_thread(ROLE_API, "api", lambda: ran.append("target"), on_start=bad)
    with pytest.raises(ThreadStartError):
        t.join_checked(T)
    assert ran == []


def test_target_error_reraised():
    def boom():
        raise ValueError("vcpu died")

    t = start_thread(ROLE_VCPU, "vcpu:1", boom)
    with pytest.raises(ValueError, match="vcpu died"):
        t.join_checked(T)


def test_join_checked_timeout():
    release = threading.Event()
    t = start_thread(ROLE_DEVICE, "device:slow", release.wait, T)
    with pytest.raises(TimeoutError):
        t.join_checked(0.01)
    release.set()
    t.join_checked(T)


def test_registry_and_os_names():
    release = threading.Event()
    inside = [threading.Event(), threading.Event()]

    def target(i):
        inside[i].set()            # the OS name is set before the target runs
        release.wait(T)

    t1 = start_thread(ROLE_VCPU, "vcpu:7", target, 0)
    t2 = start_thread(ROLE_DEVICE, "device:virtio-net0", target, 1)
    try:
        assert inside[0].wait(T) and inside[1].wait(T)
        by_role = threads_by_role()
        assert t1 in by_role[ROLE_VCPU] and t2 in by_role[ROLE_DEVICE]
        assert _os_name(t1) == "vcpu:7"
        assert _os_name(t2) == "device:virtio-n"            # 15 bytes
    finally:
        release.set()
    t1.join_checked(T)
    t2.join_checked(T)
    by_role = threads_by_role()
    assert t1 not in by_role.get(ROLE_VCPU, []) and t2 not in by_role.get(ROLE_DEVICE, [])


def test_os_name_truncation_keeps_utf8_valid():
    done = []

    def target():
        assert threads.set_os_thread_name("vcpu:" + "\u00e9" * 10)   # 25 bytes
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "rb") as f:
            done.append(f.read().rstrip(b"\n"))

    start_thread(ROLE_VCPU, "x", target).join_checked(T)
    assert done[0] == ("vcpu:" + "\u00e9" * 5).encode()            # 15 bytes, no split char


def test_unknown_role_refused():
    with pytest.raises(ValueError, match="unknown thread role"):
        start_thread("worker", "w", lambda: None)
    with pytest.raises(ValueError, match="adopted"):
        start_thread(ROLE_MAIN, "main", lambda: None)


def test_adopt_current_thread():
    seen = []
    add_thread_start_callback(lambda role, name: seen.append((role, name,
                                                              threading.current_thread())))
    out = []

    def body():
        threads.adopt_current_thread(ROLE_MAIN, "main")
        out.append(threads_by_role())

    t = threading.Thread(target=body)
    t.start()
    t.join(T)
    assert seen == [("main", "main", t)]
    assert t in out[0][ROLE_MAIN]
    assert t not in threads_by_role().get(ROLE_MAIN, [])   # dead threads drop out
