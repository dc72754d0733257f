"""requests over a Unix socket (for schemathesis and the API tests): `unix_session(path)`."""

import socket

import requests
import urllib3
from requests.adapters import HTTPAdapter


class _UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, path, *args, **kwargs):
        super().__init__("localhost", *args, **kwargs)
        self.unix_path = path

    def _new_conn(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self.unix_path)
        return sock


class _UnixPool(urllib3.HTTPConnectionPool):
    def __init__(self, path):
        super().__init__("localhost")
        self.unix_path = path

    def _new_conn(self):
        return _UnixConnection(self.unix_path, timeout=self.timeout.connect_timeout)


class UnixAdapter(HTTPAdapter):
    """Sends every request to the Unix socket *path*, whatever host the URL names."""

    def __init__(self, path):
        super().__init__()
        self.pool = _UnixPool(path)

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        return self.pool

    def get_connection(self, url, proxies=None):  # requests < 2.32
        return self.pool

    def close(self):
        self.pool.close()
        super().close()


def unix_session(path) -> requests.Session:
    """A requests session whose http:// URLs all go to the Unix socket *path*."""
    session = requests.Session()
    session.mount("http://", UnixAdapter(path))
    return session
