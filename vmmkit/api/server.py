"""The control API server: HTTP/1.1 + JSON on a Unix socket, in vmmkit's ``api`` threads.

One thread (role ``api``, name ``api``) accepts connections; each connection
is served by its own thread (role ``api``, name ``api:conn<N>``) with its own
deadlines, so a slow or silent client holds one thread for a bounded time
and never delays another client. The VM never waits on these threads: a
route calls the VM's methods (``pause()`` waits for the vCPUs, not the
other way round).

The socket is created owner-only (0600) and removed when the server closes.
A socket file left behind by a dead process (connecting is refused) is
replaced; one that a live process answers on is an error, reported before
the VM boots.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import threading
from typing import Any, Callable, Iterable, Optional

import attrs

from .. import threads
from ..errors import VmmkitError
from .http import ClientGone, HttpError, Request, RequestReader, render_response

log = logging.getLogger("vmmkit.api")

#: Default limits; see :class:`ApiServer`.
MAX_BODY = 64 * 1024
MAX_HEADER = 16 * 1024
REQUEST_TIMEOUT = 10.0
IDLE_TIMEOUT = 30.0
MAX_CONNECTIONS = 32


class ApiError(Exception):
    """Raised by a route handler to answer with a status and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ApiSocketError(VmmkitError):
    """The API socket cannot be created (in use by a live VM, bad path, permissions)."""


@attrs.frozen
class Route:
    """``handler(vm, request)`` answers ``method`` requests for the exact ``path``.

    The handler returns a JSON-serializable value (sent with status 200),
    or a ``(status, value)`` pair; it raises :class:`ApiError` for an error
    answer. ``request`` is a :class:`vmmkit.api.http.Request`
    (``request.json()`` parses the body). An exception of any other type is
    answered with 500 and logged: it is a bug in the handler.
    """

    method: str
    path: str
    handler: Callable[[Any, Request], Any]
    summary: str = ""


def as_route(item) -> Route:
    """A :class:`Route` from a Route or a ``(method, path, handler)`` tuple, checked."""
    if not isinstance(item, Route):
        try:
            method, path, handler = item
        except (TypeError, ValueError):
            raise TypeError(f"an API route must be (method, path, handler), got {item!r}") from None
        item = Route(method, path, handler)
    if not isinstance(item.method, str) or not item.method.isalpha() or not item.method.isupper():
        raise TypeError(f"API route {item.path!r}: method must be an upper-case word like 'GET', got {item.method!r}")
    if not isinstance(item.path, str) or not item.path.startswith("/"):
        raise TypeError(f"API route: path must start with '/', got {item.path!r}")
    if not callable(item.handler):
        raise TypeError(f"API route {item.method} {item.path}: handler is not callable")
    return item


def _probe(path: str) -> bool:
    """Whether a live process accepts connections on the Unix socket *path*."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except socket.timeout:
        return True  # a live listener with a full backlog
    except OSError:
        return False
    finally:
        probe.close()


class ApiServer:
    """Serve *routes* for one VM on the Unix socket *path*.

    Creating the server binds and listens (errors: :class:`ApiSocketError`),
    so that a socket in use stops vmmkit before the VM boots;
    :meth:`start` begins serving ``vm``; :meth:`attach` switches to another
    VM (a guest reboot with ``on_reboot = "restart"`` makes a new Vm);
    :meth:`close` stops serving and removes the socket file.

    Limits: request header ``max_header`` bytes (431), body ``max_body``
    bytes (413), ``request_timeout`` seconds for a whole request once it
    has begun (408), ``idle_timeout`` seconds for a kept-alive connection
    between requests, at most ``max_connections`` connections at once (more
    are answered 503 and closed).
    """

    def __init__(self, path: str, routes: Iterable = (), *, max_body: int = MAX_BODY, max_header: int = MAX_HEADER,
                 request_timeout: float = REQUEST_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS):
        self.path = os.path.abspath(path)
        self.max_body = max_body
        self.max_header = max_header
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.routes: dict[tuple[str, str], Route] = {}
        for item in routes:
            self.add_route(item)
        self.vm = None
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._conn_counter = 0
        self._thread = None
        self._closed = False
        self._sock = None
        self._identity = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self._bind()
        except BaseException:
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise

    # ----- routes -----
    def add_route(self, item) -> None:
        """Add a :class:`Route` (or ``(method, path, handler)``); a duplicate is an error."""
        route = as_route(item)
        key = (route.method, route.path)
        if key in self.routes:
            raise ValueError(f"API route {route.method} {route.path} is defined twice")
        self.routes[key] = route

    # ----- the socket -----
    def _bind(self) -> None:
        path = self.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise ApiSocketError(f"API socket {path}: {exc.strerror}") from None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise ApiSocketError(f"API socket {path}: a file that is not a socket is in the way "
                                     "(remove it or choose another path)")
            if _probe(path):
                raise ApiSocketError(f"API socket {path} is in use: another VM is serving its API there "
                                     "(stop it or choose another path)")
            try:
                os.unlink(path)  # left behind by a process that is gone
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise ApiSocketError(f"API socket {path}: cannot remove the stale socket: {exc.strerror}") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            try:
                sock.bind(path)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ApiSocketError(f"API socket {path} is in use (created by another process just now)") from None
                raise ApiSocketError(f"API socket {path}: {exc.strerror}") from None
            # Owner-only before listen(): until then nobody can connect, so no
            # client ever reaches a socket with wider permissions.
            os.chmod(path, 0o600)
            st = os.lstat(path)
            self._identity = (st.st_dev, st.st_ino)
            sock.listen(64)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        self._sock = sock

    def _unlink(self) -> None:
        """Remove the socket file if it is still ours (never someone else's newer one)."""
        if self._identity is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        except OSError:
            pass
        self._identity = None

    # ----- serving -----
    def attach(self, vm) -> None:
        """Serve this VM from now on."""
        self.vm = vm

    def start(self, vm=None) -> "ApiServer":
        """Begin serving (*vm*, if given, is attached first) in an ``api`` thread."""
        if vm is not None:
            self.attach(vm)
        if self._thread is None:
            self._thread = threads.start_thread(threads.ROLE_API, "api", self._accept_loop)
        return self

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._closed:
            try:
                ready = poller.poll()
            except InterruptedError:
                continue
            if self._closed or any(fd == self._wake_r for fd, _ in ready):
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                if self._closed:
                    return
                log.warning("vmmkit: API: accept failed: %s", exc)
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    threading.Event().wait(0.1)  # out of fds: let some connections finish
                continue
            with self._lock:
                full = len(self._connections) >= self.max_connections
                if not full:
                    self._connections.add(conn)
                    self._conn_counter += 1
                    number = self._conn_counter
            if full:
                self._refuse(conn)
                continue
            try:
                threads.start_thread(threads.ROLE_API, f"api:conn{number}", self._serve_connection, conn)
            except Exception as exc:  # noqa: BLE001 - thread limit reached: drop this one connection
                log.warning("vmmkit: API: cannot start a connection thread: %s", exc)
                self._forget(conn)

    def _refuse(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(False)  # the accept thread never waits on a client
            conn.send(render_response(503, {"error": f"too many API connections (at most {self.max_connections})"},
                                      keep_alive=False, headers={"Retry-After": "1"}))
        except OSError:
            pass
        _close_gently(conn, linger=0.0)

    def _forget(self, conn: socket.socket, linger: float = 0.0) -> None:
        with self._lock:
            self._connections.discard(conn)
        _close_gently(conn, linger)

    def _serve_connection(self, conn: socket.socket) -> None:
        reader = RequestReader(conn, max_header=self.max_header, max_body=self.max_body)
        linger = 0.0
        try:
            while not self._closed:
                try:
                    request = reader.read(idle_timeout=self.idle_timeout, request_timeout=self.request_timeout)
                except ClientGone:
                    return
                except HttpError as exc:
                    self._send(conn, render_response(exc.status, {"error": exc.message}, keep_alive=False,
                                                     headers=exc.headers))
                    linger = 1.0  # let the client read the answer before the rest of its request is refused
                    return
                status, body, headers = self.dispatch(request)
                keep_alive = request.keep_alive and not self._closed
                try:
                    data = render_response(status, body, keep_alive=keep_alive, headers=headers,
                                           head_only=request.method == "HEAD")
                except (TypeError, ValueError) as exc:  # a handler returned something JSON cannot hold
                    log.error("vmmkit: API: %s %s: the answer is not JSON: %s", request.method, request.path, exc)
                    data = render_response(500, {"error": f"internal error: the answer is not JSON: {exc}"},
                                           keep_alive=keep_alive)
                if not self._send(conn, data):
                    return
                if not keep_alive:
                    return
        except Exception:  # noqa: BLE001 - never let one connection take the server down
            log.exception("vmmkit: API: connection failed")
        finally:
            self._forget(conn, linger)

    def _send(self, conn: socket.socket, data: bytes) -> bool:
        try:
            conn.settimeout(self.request_timeout)  # a client that does not read is dropped
            conn.sendall(data)
            return True
        except OSError:
            return False

    def dispatch(self, request: Request) -> tuple[int, Any, dict]:
        """Route one request: ``(status, JSON body, extra headers)``. Never raises."""
        route = self.routes.get((request.method, request.path))
        if route is None:
            allowed = sorted(m for (m, p) in self.routes if p == request.path)
            if not allowed:
                return 404, {"error": f"no such endpoint: {request.path}"}, {}
            return 405, {"error": f"{request.method} is not allowed on {request.path} "
                                  f"(allowed: {', '.join(allowed)})"}, {"Allow": ", ".join(allowed)}
        vm = self.vm
        if vm is None:
            return 409, {"error": "no VM is attached to this API yet"}, {}
        try:
            result = route.handler(vm, request)
        except ApiError as exc:
            return exc.status, {"error": exc.message}, {}
        except HttpError as exc:
            return exc.status, {"error": exc.message}, {}
        except Exception as exc:  # noqa: BLE001 - a handler bug: answer, log, keep serving
            log.exception("vmmkit: API: %s %s failed", request.method, request.path)
            return 500, {"error": f"internal error: {type(exc).__name__}: {exc}"}, {}
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], int):
            status, body = result
        else:
            status, body = 200, result
        return status, body, {}

    # ----- teardown -----
    def close(self) -> None:
        """Stop accepting, end open connections, remove the socket file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._unlink()
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a connection thread blocked in recv
            except OSError:
                pass
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> "ApiServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connection_count(self) -> int:
        """Connections being served right now."""
        with self._lock:
            return len(self._connections)


def _close_gently(conn: socket.socket, linger: float) -> None:
    """Close after the answer is out: stop sending, discard what the client still sends (for at most
    *linger* seconds and 256 KiB), so that unread request bytes do not reset the connection before
    the client has read the answer."""
    try:
        conn.shutdown(socket.SHUT_WR)
        if linger > 0:
            conn.settimeout(linger)
        else:
            conn.setblocking(False)
        discarded = 0
        while discarded < 256 * 1024:
            data = conn.recv(65536)
            if not data:
                break
            discarded += len(data)
    except OSError:
        pass
    finally:
        try:
            conn.close()
        except OSError:
            pass


def collect_routes(core: Iterable, plugin_results: Optional[Iterable] = None) -> list[Route]:
    """The core routes plus what the ``vmmkit_api_routes`` hook returned (a list per plugin)."""
    routes = [as_route(r) for r in core]
    for result in plugin_results or ():
        for item in result or ():
            routes.append(as_route(item))
    return routes
