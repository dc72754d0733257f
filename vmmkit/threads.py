"""Starting vmmkit's threads: one helper, named roles, start hooks.

Design contract 2: every thread vmmkit starts has a role and goes through
:func:`start_thread`. The role says what the thread may do, which is what
the seccomp filters are cut by (a vCPU thread needs ``KVM_RUN`` but not
``socket``; the API thread the reverse), so it is a closed set:

* :data:`ROLE_VCPU` (``"vcpu"``): runs ``KVM_RUN`` for one vCPU;
* :data:`ROLE_DEVICE` (``"device"``): a device worker's event loop;
* :data:`ROLE_API` (``"api"``): the control API server;
* :data:`ROLE_MAIN` (``"main"``): the process's main thread, adopted with
  :func:`adopt_current_thread` rather than started.

The name tells threads apart within a role: ``"vcpu:0"``,
``"device:virtio-blk0"``. The Python thread is called ``vmmkit:<name>``;
the OS thread name (what ``ps -L``, ``top -H`` and core dumps show) is
``<name>`` truncated to the kernel's 15 bytes, without the prefix, which
would otherwise eat half of them.

Thread-start callbacks (:func:`add_thread_start_callback`, and a per-call
``on_start``) run *in the new thread* before its target, as
``cb(role, name)``; seccomp installs its per-role filter there. If one
raises, the target never runs: the error is logged, recorded on the thread
and re-raised by :meth:`VmmThread.join_checked`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from vmmkit.errors import VmmkitError

log = logging.getLogger(__name__)

ROLE_VCPU = "vcpu"
ROLE_DEVICE = "device"
ROLE_API = "api"
ROLE_MAIN = "main"
#: Every valid role. Adding one means adding a seccomp policy for it too,
#: which is why unknown roles are refused rather than passed through.
ROLES = frozenset({ROLE_VCPU, ROLE_DEVICE, ROLE_API, ROLE_MAIN})

StartCallback = Callable[[str, str], Any]

_TASK_COMM_LEN = 16  # including the NUL

_callbacks: List[StartCallback] = []
_registry: Dict[threading.Thread, Tuple[str, str]] = {}
_lock = threading.Lock()


class ThreadStartError(VmmkitError):
    """A thread-start callback failed, so the thread's target never ran."""


def add_thread_start_callback(cb: StartCallback) -> None:
    """Run ``cb(role, name)`` at the start of every thread started from now on.

    Callbacks run in registration order, in the new thread, after the
    per-call ``on_start`` of :func:`start_thread`.
    """
    with _lock:
        _callbacks.append(cb)


def remove_thread_start_callback(cb: StartCallback) -> None:
    """Unregister a callback added with :func:`add_thread_start_callback`."""
    with _lock:
        _callbacks.remove(cb)


def set_os_thread_name(name: str) -> bool:
    """Set the calling thread's kernel name (``prctl(PR_SET_NAME)``).

    Truncated to 15 bytes without splitting a UTF-8 character. Returns
    False if it could not be set (non-Linux, no libc): names are a
    diagnostic aid, never worth failing a thread over.
    """
    raw = name.encode("utf-8", "replace")[:_TASK_COMM_LEN - 1]
    raw = raw.decode("utf-8", "ignore").encode("utf-8")
    try:
        from ._native import lib
    except ImportError:
        return False
    return lib.vmm_set_thread_name(raw) == 0


class VmmThread(threading.Thread):
    """A thread started by :func:`start_thread`: knows its role and records its error.

    Attributes: ``role``, ``vmm_name`` (the name without the ``vmmkit:``
    prefix), ``error`` (the exception that ended it, if any; a
    :class:`ThreadStartError` if a start callback failed).
    """

    def __init__(self, role: str, name: str, target: Callable[..., Any], args: Tuple[Any, ...],
                 on_start: Optional[StartCallback], daemon: bool) -> None:
        """Prepare the thread; use :func:`start_thread` instead."""
        super().__init__(name=f"vmmkit:{name}", daemon=daemon)
        self.role = role
        self.vmm_name = name
        self.error: Optional[BaseException] = None
        self._vmm_target = target
        self._vmm_args = args
        self._on_start = on_start

    def run(self) -> None:
        """Name the OS thread, run the start callbacks, then the target."""
        try:
            set_os_thread_name(self.vmm_name)
            try:
                _run_start_callbacks(self.role, self.vmm_name, self._on_start)
            except ThreadStartError as exc:
                self.error = exc
                log.error("%s", exc, exc_info=exc.__cause__)
                return
            try:
                self._vmm_target(*self._vmm_args)
            except BaseException as exc:  # noqa: BLE001 - recorded for join_checked
                self.error = exc
                log.error("thread %s (role %s) failed", self.name, self.role,
                          exc_info=(type(exc), exc, exc.__traceback__))
        finally:
            with _lock:
                _registry.pop(self, None)
            # Break reference cycles through the target's closure/args.
            self._vmm_target = self._vmm_args = None  # type: ignore[assignment]

    def join_checked(self, timeout: Optional[float] = None) -> None:
        """Join, then re-raise the thread's error (start callback or target).

        Raises ``TimeoutError`` if the thread is still alive after
        ``timeout`` seconds.
        """
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"thread {self.name} (role {self.role}) did not finish "
                               f"within {timeout} s")
        if self.error is not None:
            raise self.error


def _run_start_callbacks(role: str, name: str, on_start: Optional[StartCallback]) -> None:
    """Run ``on_start`` then the global callbacks; wrap a failure in ThreadStartError."""
    with _lock:
        callbacks = list(_callbacks)
    if on_start is not None:
        callbacks.insert(0, on_start)
    for cb in callbacks:
        try:
            cb(role, name)
        except Exception as exc:
            raise ThreadStartError(f"thread {name} (role {role}) not started: start hook "
                                   f"{getattr(cb, '__qualname__', cb)!s} failed: {exc}") from exc


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown thread role {role!r}; valid roles: {', '.join(sorted(ROLES))}")


def start_thread(role: str, name: str, target: Callable[..., Any], *args: Any,
                 on_start: Optional[StartCallback] = None, daemon: bool = True) -> VmmThread:
    """Start ``target(*args)`` in a new thread with a role; return the thread.

    The thread is named ``vmmkit:<name>`` and is listed by
    :func:`threads_by_role` from now until it ends. Before ``target`` runs,
    the new thread calls ``on_start(role, name)`` (if given) and then every
    registered thread-start callback; if any raises, ``target`` does not
    run and :meth:`VmmThread.join_checked` raises :class:`ThreadStartError`.

    Threads are daemons by default: a vCPU stuck in ``KVM_RUN`` must not
    keep the process alive after the main thread has given up; orderly
    shutdown joins them explicitly.
    """
    _check_role(role)
    if role == ROLE_MAIN:
        raise ValueError("the main thread is adopted (adopt_current_thread), not started")
    t = VmmThread(role, name, target, args, on_start, daemon)
    # Registered before start() so the registry never misses a live thread.
    with _lock:
        _registry[t] = (role, name)
    try:
        t.start()
    except BaseException:
        with _lock:
            _registry.pop(t, None)
        raise
    return t


def adopt_current_thread(role: str = ROLE_MAIN, name: str = "main", *,
                         run_callbacks: bool = True, set_os_name: bool = False) -> None:
    """Give the calling thread (normally the main thread) a role.

    Registers it for :func:`threads_by_role` and, with ``run_callbacks``,
    runs the thread-start callbacks in it (raising
    :class:`ThreadStartError` on failure). The OS name is left alone by
    default: on the main thread it is the process name ``ps`` shows.
    """
    _check_role(role)
    if set_os_name:
        set_os_thread_name(name)
    with _lock:
        _registry[threading.current_thread()] = (role, name)
    if run_callbacks:
        _run_start_callbacks(role, name, None)


def threads_by_role() -> Dict[str, List[threading.Thread]]:
    """Live vmmkit threads grouped by role: ``{"vcpu": [...], ...}`` (diagnostics)."""
    out: Dict[str, List[threading.Thread]] = {}
    with _lock:
        for t, (role, _name) in list(_registry.items()):
            # A started thread registers before start() and unregisters as it
            # ends; adopted threads never unregister, so drop them once dead.
            if t.is_alive() or t.ident is None:
                out.setdefault(role, []).append(t)
            else:
                del _registry[t]
    return out
