"""A client for the control API (what ``vmmkit ctl`` uses; usable from Python too)::

    from vmmkit.api.client import ApiClient
    client = ApiClient("/run/vm.sock")
    client.call("PUT", "/vm/pause")
    print(client.call("GET", "/vm")["state"])
"""

from __future__ import annotations

import errno
import http.client
import json
import socket

from ..errors import VmmkitError


class ApiClientError(VmmkitError):
    """The API could not be reached, or answered with an error (``status`` is its HTTP status, or None)."""

    exit_code = 1

    def __init__(self, message: str, status: int | None = None, body=None):
        super().__init__(message)
        self.status = status
        self.body = body


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ApiClient:
    """Talks to the API socket at ``path``; each call is one connection."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.path = path
        self.timeout = timeout

    def request(self, method: str, path: str, body=None) -> tuple[int, object]:
        """Send one request (``body``: a JSON value or None); return ``(status, parsed JSON or None)``.

        Raises :class:`ApiClientError` with a one-line explanation when the
        socket is missing, dead or not ours to use.
        """
        conn = _UnixConnection(self.path, self.timeout)
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            status = response.status
        except FileNotFoundError:
            raise ApiClientError(f"no API socket at {self.path} (is the VM running with --api-sock {self.path}?)") from None
        except ConnectionRefusedError:
            raise ApiClientError(f"nothing is listening on {self.path}: the VM that served it has stopped") from None
        except PermissionError:
            raise ApiClientError(f"permission denied on {self.path}: the API socket is owner-only (0600)") from None
        except socket.timeout:
            raise ApiClientError(f"the API at {self.path} did not answer within {self.timeout:g} s") from None
        except OSError as exc:
            if exc.errno in (errno.ENOTSOCK, errno.ECONNREFUSED, errno.EPROTOTYPE):
                raise ApiClientError(f"{self.path} is not a vmmkit API socket") from None
            raise ApiClientError(f"cannot talk to the API at {self.path}: {exc.strerror or exc}") from None
        except http.client.HTTPException as exc:
            raise ApiClientError(f"the API at {self.path} sent a malformed answer: {type(exc).__name__}") from None
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw.strip() else None
        except ValueError:
            raise ApiClientError(f"the API at {self.path} answered {status} with a body that is not JSON",
                                 status) from None
        return status, data

    def call(self, method: str, path: str, body=None):
        """Like :meth:`request`, but a non-2xx answer raises :class:`ApiClientError` with its message."""
        status, data = self.request(method, path, body)
        if not 200 <= status < 300:
            message = data.get("error") if isinstance(data, dict) else None
            raise ApiClientError(f"{method} {path}: {message or f'HTTP {status}'}", status, data)
        return data
