"""A small, strict HTTP/1.1 request reader and response writer for the control API.

Only what the API needs: requests with a ``Content-Length`` body (or none),
persistent connections, ``Expect: 100-continue``. Every way a peer can get
it wrong ends in an :class:`HttpError` carrying a 4xx status, which the
server answers with a JSON error body and then closes the connection:

* a request line over ``max_line`` bytes: 414; headers over ``max_header``
  bytes or more than ``max_headers`` fields: 431;
* a body over ``max_body`` bytes: 413 (answered before the body is read);
* ``Transfer-Encoding`` (chunked bodies): 411, send ``Content-Length``;
* a request not complete within the deadline: 408;
* anything else malformed: 400.

The reader never waits past its deadline, so a slow or silent client costs
one connection thread for at most that long and nothing else.
"""

from __future__ import annotations

import json
import re
import socket
import time
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

import attrs

REASONS = {
    100: "Continue", 200: "OK", 202: "Accepted", 204: "No Content",
    400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    409: "Conflict", 411: "Length Required", 413: "Content Too Large", 414: "URI Too Long",
    415: "Unsupported Media Type", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable",
}

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
# Field values: visible ASCII, obs-text, spaces and tabs (RFC 9110 5.5); no CR, LF or NUL.
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


class HttpError(Exception):
    """A request the server refuses: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, *, close: bool = True, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = headers or {}


class ClientGone(Exception):
    """The peer closed the connection (or went silent between requests): close quietly."""


@attrs.define
class Request:
    """One parsed request.

    ``path`` is percent-decoded, without the query; ``query`` maps each
    parameter to its list of values; ``headers`` has lower-case names (a
    repeated field's values joined with ", "); ``body`` is the raw bytes.
    """

    method: str
    target: str
    path: str
    query: dict
    version: tuple
    headers: dict
    body: bytes = b""

    @property
    def keep_alive(self) -> bool:
        """Whether the connection stays open after the response (HTTP/1.1 default, 1.0 opt-in)."""
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version >= (1, 1):
            return "close" not in tokens
        return "keep-alive" in tokens

    def json(self):
        """The body as JSON (None when there is none); raises HttpError(400) when it is not JSON."""
        if not self.body:
            return None
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise HttpError(400, f"the request body is not valid JSON: {exc}") from None


class RequestReader:
    """Reads requests from one connected socket, keeping bytes that belong to the next one."""

    def __init__(self, sock: socket.socket, *, max_line: int = 8192, max_header: int = 16384,
                 max_headers: int = 64, max_body: int = 65536):
        self.sock = sock
        self.max_line = max_line
        self.max_header = max_header
        self.max_headers = max_headers
        self.max_body = max_body
        self.buf = bytearray()

    def _recv(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout()
        self.sock.settimeout(remaining)
        return self.sock.recv(65536)

    def read(self, *, idle_timeout: float, request_timeout: float) -> Request:
        """Read one request.

        Waiting for its first byte is bounded by ``idle_timeout`` seconds
        (then :class:`ClientGone`); once it has begun, the whole request,
        body included, must arrive within ``request_timeout`` seconds or the
        answer is 408.
        """
        now = time.monotonic()
        idle_deadline = now + idle_timeout
        request_deadline = now + request_timeout
        started = bool(self.buf)
        end = -1
        while True:
            # Leading empty lines before a request line are allowed (RFC 9112 2.2).
            while self.buf[:2] == b"\r\n" or self.buf[:1] == b"\n":
                del self.buf[:2 if self.buf[:2] == b"\r\n" else 1]
            end, sep = _header_end(self.buf)
            if end >= 0:
                break
            first_line = self.buf.split(b"\n", 1)[0]
            if len(first_line) > self.max_line:
                raise HttpError(414, f"the request line is longer than {self.max_line} bytes")
            if len(self.buf) > self.max_header:
                raise HttpError(431, f"the request header is longer than {self.max_header} bytes")
            try:
                data = self._recv(request_deadline if started else idle_deadline)
            except socket.timeout:
                if started:
                    raise HttpError(408, "the request did not arrive in time") from None
                raise ClientGone() from None
            except OSError:
                raise ClientGone() from None
            if not data:
                if self.buf.strip():
                    raise HttpError(400, "the connection ended in the middle of the request header")
                raise ClientGone()
            if not started:
                started = True
                request_deadline = time.monotonic() + request_timeout
            self.buf += data
        if end > self.max_header:
            raise HttpError(431, f"the request header is longer than {self.max_header} bytes")
        head = bytes(self.buf[:end])
        del self.buf[:end + len(sep)]
        request = self._parse_head(head)
        length = self._body_length(request)
        if length:
            if request.headers.get("expect", "").lower() == "100-continue" and len(self.buf) < length:
                self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            while len(self.buf) < length:
                try:
                    data = self._recv(request_deadline)
                except socket.timeout:
                    raise HttpError(408, "the request body did not arrive in time") from None
                except OSError:
                    raise ClientGone() from None
                if not data:
                    raise HttpError(400, f"the connection ended after {len(self.buf)} of {length} body bytes")
                self.buf += data
            request.body = bytes(self.buf[:length])
            del self.buf[:length]
        return request

    def _parse_head(self, head: bytes) -> Request:
        lines = head.split(b"\n")
        lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
        request_line = lines[0]
        if len(request_line) > self.max_line:
            raise HttpError(414, f"the request line is longer than {self.max_line} bytes")
        parts = request_line.split(b" ")
        if len(parts) != 3 or not all(parts):
            raise HttpError(400, "malformed request line (expected: METHOD TARGET HTTP/1.1)")
        method, target, version = parts
        if not _TOKEN.fullmatch(method):
            raise HttpError(400, "malformed request method")
        m = _VERSION.fullmatch(version)
        if not m:
            raise HttpError(400, "malformed HTTP version in the request line")
        ver = (int(m.group(1)), int(m.group(2)))
        if ver[0] != 1:
            raise HttpError(400, f"HTTP/{ver[0]}.{ver[1]} is not supported: speak HTTP/1.1")
        if len(lines) - 1 > self.max_headers:
            raise HttpError(431, f"more than {self.max_headers} header fields")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):
                raise HttpError(400, "folded header lines are not allowed")
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise HttpError(400, f"malformed header field: {line[:60]!r}")
            value = value.strip(b" \t")
            if not _FIELD_VALUE.fullmatch(value):
                raise HttpError(400, f"invalid characters in header field {name.decode()!r}")
            key = name.decode("ascii").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        try:
            text_target = target.decode("ascii")
        except UnicodeDecodeError:
            raise HttpError(400, "the request target must be ASCII (percent-encode other bytes)") from None
        if any(c in text_target for c in "\x00\x7f") or any(ord(c) < 0x20 for c in text_target):
            raise HttpError(400, "control characters in the request target")
        if text_target.startswith("/"):
            split = urlsplit(text_target)
        elif text_target.startswith(("http://", "https://")):
            split = urlsplit(text_target)  # absolute-form: only the path and query matter here
        elif text_target == "*":
            raise HttpError(400, "the target * is not supported")
        else:
            raise HttpError(400, "the request target must be a path starting with /")
        try:
            path = unquote(split.path or "/", errors="strict")
        except UnicodeDecodeError:
            raise HttpError(400, "the request path is not UTF-8 once percent-decoded") from None
        try:
            query = parse_qs(split.query, keep_blank_values=True, strict_parsing=False, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise HttpError(400, "malformed query string") from None
        return Request(method.decode("ascii"), text_target, path, query, ver, headers)

    def _body_length(self, request: Request) -> int:
        if "transfer-encoding" in request.headers:
            raise HttpError(411, "Transfer-Encoding is not supported: send the body with Content-Length")
        raw = request.headers.get("content-length")
        if raw is None:
            return 0
        values = {v.strip() for v in raw.split(",")}
        if len(values) != 1:
            raise HttpError(400, "conflicting Content-Length values")
        value = values.pop()
        if not value.isdigit() or not value.isascii():
            raise HttpError(400, f"malformed Content-Length: {value[:40]!r}")
        length = int(value)
        if length > self.max_body:
            raise HttpError(413, f"the request body is {length} bytes; at most {self.max_body} are accepted")
        return length


def _header_end(buf: bytearray) -> tuple[int, bytes]:
    """Where the header section ends (the index of the blank line's separator) and the separator."""
    crlf = buf.find(b"\r\n\r\n")
    lf = buf.find(b"\n\n")
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, b"\n\n"
    if crlf >= 0:
        return crlf, b"\r\n\r\n"
    return -1, b""


def render_response(status: int, body, *, keep_alive: bool, headers: Optional[dict] = None,
                    head_only: bool = False) -> bytes:
    """A complete response with a JSON body (``body`` None gives no body, as for 204)."""
    reason = REASONS.get(status, "Unknown")
    lines = [f"HTTP/1.1 {status} {reason}"]
    payload = b""
    if body is not None and status != 204:
        payload = (json.dumps(body, indent=None, separators=(",", ":"), allow_nan=False) + "\n").encode()
        lines.append("Content-Type: application/json")
    lines.append(f"Content-Length: {len(payload)}")
    lines.append("Connection: " + ("keep-alive" if keep_alive else "close"))
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return data if head_only else data + payload
