"""Host-side plumbing for vsock: the listening Unix socket at ``uds_path`` and a periodic timer fd."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
import time
from typing import Optional

from vmmkit.errors import VmmkitError

from . import MAX_UDS_PATH  # noqa: E402  (longest Unix socket path; defined once, in the package)

LISTEN_BACKLOG = 128


class UdsPathError(VmmkitError):
    """``uds_path`` cannot be used: held by a live process, not a socket, or not creatable."""


def listen_unix(path: str) -> socket.socket:
    """Bind and listen on *path* (owner-only, 0600), replacing a stale socket left by a dead process.

    A path where a process still accepts connections, or that is not a
    socket, is a :class:`UdsPathError`: two VMs must never share one.
    Returns a non-blocking, close-on-exec listening socket.
    """
    if len(os.fsencode(path)) > MAX_UDS_PATH:
        raise UdsPathError(f"vsock uds_path {path!r} is longer than the {MAX_UDS_PATH} bytes a Unix socket allows")
    _remove_if_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # The socket inode's mode becomes the file's at bind(): never a moment with wider permissions.
        os.fchmod(sock.fileno(), 0o600)
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UdsPathError(f"vsock uds_path {path}: another process created it just now") from None
            raise UdsPathError(f"vsock uds_path {path}: cannot create the socket: {exc.strerror or exc}") from None
        os.chmod(path, 0o600)  # for kernels that ignore fchmod on a socket before bind
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_if_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise UdsPathError(f"vsock uds_path {path}: the directory {parent} does not exist") from None
        return
    except OSError as exc:
        raise UdsPathError(f"vsock uds_path {path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UdsPathError(f"vsock uds_path {path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        # Nobody accepts there: a socket file left behind by a process that died.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except BlockingIOError:
        pass  # a live listener with a full backlog
    except OSError as exc:
        raise UdsPathError(f"vsock uds_path {path}: cannot tell whether it is in use: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise UdsPathError(f"vsock uds_path {path} is in use by a running process (another VM?); "
                       f"stop it or choose another path")


def same_file(path: str, st: os.stat_result) -> bool:
    """Whether *path* is still the file *st* describes (so closing never removes someone else's socket)."""
    try:
        now = os.lstat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


# ----- a periodic timer fd (os.timerfd_* on Python 3.13+, libc through ctypes before) -----

_CLOCK_MONOTONIC = time.CLOCK_MONOTONIC
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                                          ctypes.c_void_p]
    return _libc


class TickTimer:
    """A non-blocking timerfd that becomes readable every *interval* seconds while armed."""

    def __init__(self) -> None:
        if hasattr(os, "timerfd_create"):
            self.fd = os.timerfd_create(_CLOCK_MONOTONIC, flags=_TFD_NONBLOCK | _TFD_CLOEXEC)
        else:
            fd = _c().timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
            if fd < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"timerfd_create: {os.strerror(err)}")
            self.fd = fd
        self.armed = False

    def fileno(self) -> int:
        return self.fd

    def arm(self, interval: float) -> None:
        """Tick every *interval* seconds from now on."""
        self._set(interval)
        self.armed = True

    def once(self, seconds: float) -> None:
        """Become readable once, *seconds* from now."""
        self._set(seconds, 0.0)
        self.armed = True

    def disarm(self) -> None:
        """Stop ticking."""
        if self.armed:
            self._set(0.0)
            self.armed = False

    def _set(self, initial: float, interval: Optional[float] = None) -> None:
        interval = initial if interval is None else interval
        if hasattr(os, "timerfd_settime"):
            os.timerfd_settime(self.fd, initial=initial, interval=interval)
            return

        def ts(t):
            return _Timespec(int(t), int((t - int(t)) * 1e9))
        spec = _Itimerspec(ts(interval), ts(initial))
        if _c().timerfd_settime(self.fd, 0, ctypes.byref(spec), None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def drain(self) -> None:
        """Consume the expirations counted so far."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
