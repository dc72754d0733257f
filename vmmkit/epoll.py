"""The per-worker event loop: epoll dispatch with real pause and kill.

Each device worker thread runs one :class:`EventLoop`. The device adds its
file descriptors (queue-notify ioeventfds, tap fds, timerfds, ...) with
callbacks; :meth:`EventLoop.run` waits in ``epoll_wait`` and calls the
callback of each ready fd.

Two control fds are built in, so other threads can reach a worker that is
blocked in ``epoll_wait``:

* **kill**: :meth:`EventLoop.kill` makes :meth:`EventLoop.run` return.
* **pause** (design contract 3, "pause is real"): :meth:`EventLoop.pause`
  returns only once the worker has stopped dispatching, so after it
  returns the device touches neither guest memory nor its queues until
  :meth:`EventLoop.resume`. A paused worker sleeps on a condition variable;
  it does not poll and does not spin. Events that arrive while paused stay
  pending in the (level-triggered) fds and are handled after resume.

Callbacks are called as ``callback(fd, events)`` in the worker thread. fds
are level-triggered, so a callback must consume what made its fd ready
(read the eventfd, drain the socket) and must tolerate a spurious call with
nothing to read (use non-blocking fds): after a pause, or after an fd number
is removed and reused within one batch of events, a callback can be called
when its fd is no longer ready.

A callback that raises puts the device in a failed state: the loop records
the exception in :attr:`EventLoop.error` and calls its ``on_error(exc)``
hook in the worker thread. The default hook logs the exception with the
worker's name and kills the loop; a device can pass its own hook (e.g. to
set virtio ``DEVICE_NEEDS_RESET`` and keep serving a reset). If the hook
itself raises, that is logged and the loop stops.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from typing import Any, Callable, Dict, Optional

log = logging.getLogger(__name__)

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP

Callback = Callable[[int, int], Any]


class _Notifier:
    """A wakeup fd: an eventfd where available (3.10+), else a pipe."""

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            self._r = self._w = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        else:  # pragma: no cover - Python 3.9
            self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def fileno(self) -> int:
        return self._r

    def notify(self) -> None:
        """Make the fd readable (idempotent until drained)."""
        try:
            os.write(self._w, (1).to_bytes(8, "little"))
        except BlockingIOError:
            pass  # counter or pipe full: already readable, which is all we need

    def drain(self) -> None:
        """Consume all pending notifications."""
        try:
            while os.read(self._r, 4096):
                if self._r == self._w:
                    break  # an eventfd read returns the whole counter at once
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self._r)
        if self._w != self._r:
            os.close(self._w)


def _fileno(fd: Any) -> int:
    return fd if isinstance(fd, int) else fd.fileno()


class EventLoop:
    """An epoll loop for one worker thread, with kill and pause control.

    ``name`` identifies the worker in logs (``"device:virtio-blk0"``).
    ``on_error(exc)`` handles a callback exception (default: log and kill).
    ``on_pause()`` / ``on_resume()``, if given, run in the worker thread
    right before it acknowledges a pause and right after it resumes: a
    device with work in flight elsewhere (async I/O) finishes it in
    ``on_pause`` so that "paused" really means "not touching guest memory".

    Control methods (:meth:`add`, :meth:`remove`, :meth:`kill`,
    :meth:`pause`, :meth:`resume`) are thread-safe. :meth:`run` is called
    by exactly one thread, once.
    """

    def __init__(self, name: str, *, on_error: Optional[Callable[[BaseException], Any]] = None,
                 on_pause: Optional[Callable[[], Any]] = None,
                 on_resume: Optional[Callable[[], Any]] = None) -> None:
        """Create the epoll instance and the kill/pause fds."""
        self.name = name
        self.on_error: Callable[[BaseException], Any] = on_error or self._default_on_error
        self.on_pause = on_pause
        self.on_resume = on_resume
        #: The first exception a callback raised, if any.
        self.error: Optional[BaseException] = None
        self._epoll = select.epoll()
        self._callbacks: Dict[int, Callback] = {}
        self._kill_fd = _Notifier()
        self._pause_fd = _Notifier()
        self._epoll.register(self._kill_fd.fileno(), EPOLLIN)
        self._epoll.register(self._pause_fd.fileno(), EPOLLIN)
        # One condition guards all control state below.
        self._cond = threading.Condition()
        self._killed = False
        self._pause_requested = False
        self._pause_acked = False
        self._running = False
        self._finished = False
        self._thread_ident: Optional[int] = None
        self._closed = False

    # -- fd registration --

    def add(self, fd: Any, callback: Callback, events: int = EPOLLIN) -> None:
        """Call ``callback(fd, events)`` in the worker whenever ``fd`` is ready.

        ``fd`` is an int or has ``fileno()``. Adding an fd twice raises
        ``FileExistsError`` (use :meth:`modify`).
        """
        n = _fileno(fd)
        with self._cond:
            if n in self._callbacks:
                raise FileExistsError(errno.EEXIST, f"{self.name}: fd {n} is already in the loop")
            self._callbacks[n] = callback
            try:
                self._epoll.register(n, events)
            except BaseException:
                del self._callbacks[n]
                raise

    def modify(self, fd: Any, events: int, callback: Optional[Callback] = None) -> None:
        """Change the events (and optionally the callback) for an added fd."""
        n = _fileno(fd)
        with self._cond:
            if n not in self._callbacks:
                raise KeyError(f"{self.name}: fd {n} is not in the loop")
            self._epoll.modify(n, events)
            if callback is not None:
                self._callbacks[n] = callback

    def remove(self, fd: Any) -> None:
        """Stop watching ``fd``. Safe to call from a callback, even for its own fd.

        Raises ``KeyError`` if the fd was never added. An fd that was
        already closed is just forgotten (the kernel dropped it already).
        """
        n = _fileno(fd)
        with self._cond:
            if self._callbacks.pop(n, None) is None:
                raise KeyError(f"{self.name}: fd {n} is not in the loop")
            try:
                self._epoll.unregister(n)
            except OSError as exc:
                if exc.errno not in (errno.EBADF, errno.ENOENT):
                    raise

    # -- control --

    def kill(self) -> None:
        """Make :meth:`run` return (also wakes a paused worker). Idempotent."""
        with self._cond:
            self._killed = True
            self._cond.notify_all()
        if not self._closed:
            self._kill_fd.notify()

    def control_fds(self) -> "tuple[int, int]":
        """The kill and pause fds: readable when the worker must come back to :meth:`run`.

        For a callback that serves for a long while in C (``native/virtio_serve.c``):
        it polls these too and returns as soon as either is readable, without
        reading them, so the loop then handles the kill or pause itself.
        """
        return self._kill_fd.fileno(), self._pause_fd.fileno()

    def epoll_fd(self) -> int:
        """The loop's own epoll fd: readable when any fd added to the loop (or kill, pause) is ready.

        A C serving loop that watches some of the loop's fds itself (after
        draining them) polls this too, to come back for everything else.
        """
        return self._epoll.fileno()

    @property
    def killed(self) -> bool:
        """Whether :meth:`kill` has been called."""
        return self._killed

    @property
    def paused(self) -> bool:
        """Whether the worker is paused: not dispatching and will not until resumed.

        True once :meth:`pause` has returned (or was called before the loop
        started), False again after :meth:`resume`.
        """
        with self._cond:
            return self._pause_requested and (self._pause_acked or not self._running)

    def pause(self, timeout: Optional[float] = None) -> bool:
        """Stop dispatching callbacks; wait until the worker has stopped.

        Returns True once the worker acknowledged (it finishes the callback
        it is in, runs ``on_pause``, then sleeps). Returns at once if the
        loop is not running (it will start paused) or has ended. Called
        from the worker thread itself (inside a callback) it cannot wait for
        itself: it requests the pause, which takes effect when the callback
        returns, and returns True. With a ``timeout`` it returns False if
        the worker did not acknowledge in time (the pause stays requested).
        """
        with self._cond:
            self._pause_requested = True
            if not self._running or threading.get_ident() == self._thread_ident:
                return True
            self._cond.notify_all()
            if not self._closed:
                self._pause_fd.notify()
            # Not "or killed": a killed worker may still be inside a
            # callback; it is only quiet once run() has returned.
            return self._cond.wait_for(lambda: self._pause_acked or not self._running, timeout)

    def resume(self) -> None:
        """Let a paused worker dispatch again. No-op if not paused."""
        with self._cond:
            self._pause_requested = False
            self._cond.notify_all()

    # -- the loop --

    def run(self) -> None:
        """Dispatch events until :meth:`kill`; call this in the worker thread.

        Returns normally after a kill or after a callback failure that
        stopped the loop (see :attr:`error`).
        """
        with self._cond:
            if self._running or self._finished:
                raise RuntimeError(f"{self.name}: event loop run() called twice")
            self._running = True
            self._thread_ident = threading.get_ident()
        try:
            self._loop()
        finally:
            with self._cond:
                self._running = False
                self._finished = True
                self._pause_acked = False
                # Wake anyone waiting in pause(): there is nothing to wait for.
                self._cond.notify_all()

    def _loop(self) -> None:
        kill_fd = self._kill_fd.fileno()
        pause_fd = self._pause_fd.fileno()
        while True:
            if not self._check_control():
                return
            events = self._epoll.poll()
            for fd, ev in events:
                if fd == kill_fd:
                    self._kill_fd.drain()
                    continue  # the flag is checked below
                if fd == pause_fd:
                    self._pause_fd.drain()
                    continue
                # Re-check before every callback: a pause or kill requested
                # during the previous callback must stop dispatch at once,
                # not after the rest of the batch.
                if self._killed or self._pause_requested:
                    break
                cb = self._callbacks.get(fd)
                if cb is None:
                    continue  # removed earlier in this batch
                try:
                    cb(fd, ev)
                except Exception as exc:  # noqa: BLE001 - device failure, see on_error
                    if self.error is None:
                        self.error = exc
                    try:
                        self.on_error(exc)
                    except Exception:  # noqa: BLE001
                        log.exception("%s: on_error hook failed; stopping the worker", self.name)
                        return

    def _check_control(self) -> bool:
        """Handle kill and pause between batches; return False to stop.

        While paused the worker sleeps here on the condition variable: no
        callbacks, no epoll_wait, no spinning.
        """
        with self._cond:
            if self._killed:
                return False
            if not self._pause_requested:
                return True
        if self.on_pause is not None:
            self._run_hook(self.on_pause, "on_pause")
        with self._cond:
            self._pause_acked = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._pause_requested or self._killed)
            self._pause_acked = False
            if self._killed:
                return False
        if self.on_resume is not None:
            self._run_hook(self.on_resume, "on_resume")
        return True

    def _run_hook(self, hook: Callable[[], Any], what: str) -> None:
        try:
            hook()
        except Exception as exc:  # noqa: BLE001
            if self.error is None:
                self.error = exc
            self.on_error(exc)

    def _default_on_error(self, exc: BaseException) -> None:
        """Log the failure with the worker's name and stop the loop."""
        log.error("%s: event callback failed; stopping the worker", self.name,
                  exc_info=(type(exc), exc, exc.__traceback__))
        self.kill()

    # -- teardown --

    def close(self) -> None:
        """Close the epoll and control fds (not the fds added by the device).

        Call after :meth:`run` has returned (or was never called).
        """
        if self._closed:
            return
        self._closed = True
        self._epoll.close()
        self._kill_fd.close()
        self._pause_fd.close()

    def __enter__(self) -> "EventLoop":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
