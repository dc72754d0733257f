"""The control API server over a fake VM: routing, errors, limits, concurrency, the socket file."""

import json
import os
import select
import socket
import stat
import threading
import time

import pytest

from api_fakes import FakeVm, parse_response, raw, run_threads
from vmmkit import threads
from vmmkit.api import ApiError, ApiServer, ApiSocketError, CORE_ROUTES, make_server
from vmmkit.api.client import ApiClient, ApiClientError
from vmmkit.config import VmSpec
from vmmkit.plugins import PluginError


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "api.sock")


@pytest.fixture
def serve(sock_path):
    servers = []

    def start(vm=None, routes=CORE_ROUTES, **limits):
        server = ApiServer(sock_path, routes, **limits).start(vm or FakeVm())
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.close()


def request(path, method, target, body=None, headers=None):
    status, data = ApiClient(path, timeout=10).request(method, target, body)
    return status, data


# ----- routes -----

def test_get_vm_reports_state_config_and_devices(serve, sock_path):
    dev = {"id": "blk0", "kind": "blk", "transport": "virtio-mmio", "virtio_id": 2, "mmio_base": 0xD0000000,
           "mmio_size": 0x200, "gsi": 5}
    vm = FakeVm(devices=[dev])
    serve(vm)
    status, info = request(sock_path, "GET", "/vm")
    assert status == 200
    assert info["state"] == "running"
    assert info["vcpus"] == 2 and info["memory"] == 1 << 30
    assert info["devices"] == [dev]
    assert info["config"]["machine"] == {"vcpus": 2, "memory": 1 << 30, "on_reboot": "exit",
                                        "shared": False, "memory_file": None, "halt_poll_ns": None}
    assert info["config"]["api"] == {"socket": None}
    assert info["shutdown_requested_at"] is None
    assert info["pid"] == os.getpid()


def test_config_with_devices_and_features_is_json(tmp_path, serve, sock_path):
    import attrs

    @attrs.define
    class Opts:
        path: str = "disk.img"
        size: int = 4096
        tags: tuple = ("a", "b")

    spec = VmSpec.build(devices=[{"kind": "x", "path": "d.img"}], features={"feat": Opts()},
                        device_kinds={"x": Opts}, feature_types={"feat": Opts}, base_dir=str(tmp_path))
    serve(FakeVm(spec))
    _, info = request(sock_path, "GET", "/vm")
    assert info["config"]["devices"] == [{"kind": "x", "id": "x0",
                                          "options": {"path": "d.img", "size": 4096, "tags": ["a", "b"]}}]
    assert info["config"]["features"] == {"feat": {"path": "disk.img", "size": 4096, "tags": ["a", "b"]}}


def test_lifecycle_routes(serve, sock_path):
    vm = FakeVm()
    serve(vm)
    assert request(sock_path, "PUT", "/vm/pause") == (200, {"state": "paused"})
    assert request(sock_path, "PUT", "/vm/pause") == (200, {"state": "paused"})  # idempotent
    status, body = request(sock_path, "PUT", "/vm/shutdown")
    assert status == 409 and "paused" in body["error"]
    assert request(sock_path, "PUT", "/vm/resume", {}) == (200, {"state": "running"})
    assert request(sock_path, "PUT", "/vm/shutdown") == (202, {"state": "running"})
    assert vm.shutdown_requested_at is not None
    assert request(sock_path, "PUT", "/vm/stop") == (202, {"state": "stopping"})
    status, body = request(sock_path, "PUT", "/vm/pause")
    assert status == 409 and "stopping" in body["error"]
    assert vm.calls == ["pause", "pause", "shutdown", "resume", "shutdown", "stop", "pause"]


def test_unknown_path_and_wrong_method(serve, sock_path):
    serve()
    status, body = request(sock_path, "GET", "/nope")
    assert status == 404 and body == {"error": "no such endpoint: /nope"}
    data = raw(sock_path, b"POST /vm/pause HTTP/1.1\r\nConnection: close\r\n\r\n")
    status, headers, body = parse_response(data)
    assert status == 405 and headers["allow"] == "PUT" and "not allowed" in json.loads(body)["error"]
    status, headers, body = parse_response(raw(sock_path, b"HEAD /vm HTTP/1.1\r\nConnection: close\r\n\r\n"))
    assert status == 405 and headers["allow"] == "GET" and body == b""
    assert request(sock_path, "PUT", "/vm")[0] == 405


def test_bodies_are_checked(serve, sock_path):
    serve()
    for body in (b"{", b"\xff\xfe", b"[1,", b"nul"):
        data = raw(sock_path, b"PUT /vm/pause HTTP/1.1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                   % (len(body), body))
        status, headers, payload = parse_response(data)
        assert status == 400 and "not valid JSON" in json.loads(payload)["error"], data
    status, body = request(sock_path, "PUT", "/vm/pause", {"now": True})
    assert status == 400 and "takes no request body" in body["error"]
    status, body = request(sock_path, "PUT", "/vm/pause", [1, 2])
    assert status == 400


@pytest.mark.parametrize("data,status", [
    (b"garbage\r\n\r\n", 400),
    (b"GET /vm\r\n\r\n", 400),
    (b"GET  /vm HTTP/1.1\r\n\r\n", 400),
    (b"GET /vm HTTP/2.0\r\n\r\n", 400),
    (b"GET /vm HTTP/1.x\r\n\r\n", 400),
    (b"G(T /vm HTTP/1.1\r\n\r\n", 400),
    (b"GET vm HTTP/1.1\r\n\r\n", 400),
    (b"GET * HTTP/1.1\r\n\r\n", 400),
    (b"GET /vm\xff HTTP/1.1\r\n\r\n", 400),
    (b"GET /%ff HTTP/1.1\r\n\r\n", 400),
    (b"GET /vm HTTP/1.1\r\nNo colon here\r\n\r\n", 400),
    (b"GET /vm HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
    (b"GET /vm HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
    (b"GET /vm HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    (b"PUT /vm/pause HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 1x\r\n\r\n", 400),
    (b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400),
    (b"PUT /vm/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411),
    (b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", 413),
])
def test_malformed_requests_get_a_4xx_json_error_and_close(serve, sock_path, data, status):
    serve()
    out = raw(sock_path, data)
    got, headers, body = parse_response(out)
    assert got == status, out
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert isinstance(json.loads(body)["error"], str)


def test_truncated_request_is_400(serve, sock_path):
    serve()
    out = raw(sock_path, b"GET /vm HTTP/1.1\r\nHost: x\r\n", shut_write=True)
    assert parse_response(out)[0] == 400
    out = raw(sock_path, b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}", shut_write=True)
    assert parse_response(out)[0] == 400


def test_limits(serve, sock_path):
    serve()
    assert parse_response(raw(sock_path, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n"))[0] == 414
    big_header = b"GET /vm HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    assert parse_response(raw(sock_path, big_header))[0] == 431
    many = b"GET /vm HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(100)) + b"\r\n"
    assert parse_response(raw(sock_path, many))[0] == 431
    # A body over 64 KiB is refused from its Content-Length, before it is sent.
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(sock_path)
    s.sendall(b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 65537\r\n\r\n")
    status, _, body = parse_response(s.recv(65536))
    s.close()
    assert status == 413 and "65536" in json.loads(body)["error"]
    # 64 KiB exactly is read (and refused as a body this route does not take).
    body = b"{" + b" " * (65536 - 2) + b"}"
    out = raw(sock_path, b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 65536\r\nConnection: close\r\n\r\n" + body)
    assert parse_response(out)[0] == 200  # {} padded with spaces is the empty object


def test_expect_100_continue(serve, sock_path):
    serve()
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(sock_path)
    s.sendall(b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
    s.sendall(b"{}")
    assert parse_response(s.recv(65536))[0] == 200
    s.close()


def test_keep_alive_and_pipelining(serve, sock_path):
    serve()
    data = (b"GET /vm HTTP/1.1\r\nHost: x\r\n\r\n"
            b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
            b"\r\nGET /vm HTTP/1.1\r\nConnection: close\r\n\r\n")
    out = raw(sock_path, data)
    assert out.count(b"HTTP/1.1 200 OK") == 3
    assert b'"state":"paused"' in out.split(b"HTTP/1.1 200 OK")[-1]
    # HTTP/1.0 closes after one answer unless it asks for keep-alive.
    out = raw(sock_path, b"GET /vm HTTP/1.0\r\n\r\nGET /vm HTTP/1.0\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 OK") == 1


def test_absolute_form_target_and_query_are_accepted(serve, sock_path):
    serve()
    out = raw(sock_path, b"GET http://localhost/vm?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert parse_response(out)[0] == 200
    out = raw(sock_path, b"\r\nGET /v%6d HTTP/1.1\nConnection: close\n\n")  # bare LF, percent-encoding
    assert parse_response(out)[0] == 200


# ----- concurrency and slow clients -----

def test_many_clients_at_once(serve, sock_path):
    vm = FakeVm()
    vm.pause_delay = 0.05
    serve(vm)

    def client(i):
        c = ApiClient(sock_path, timeout=20)
        for _ in range(10):
            assert c.call("GET", "/vm")["vcpus"] == 2
            assert c.call("PUT", "/vm/pause" if i % 2 else "/vm/resume")["state"] in ("paused", "running")
    run_threads(16, client)


def _slow_and_silent(sock_path):
    slow = socket.socket(socket.AF_UNIX)
    slow.settimeout(30)
    slow.connect(sock_path)
    slow.sendall(b"GET /vm HTTP/1.1\r\nHost:")  # ... and nothing more
    silent = socket.socket(socket.AF_UNIX)
    silent.settimeout(30)
    silent.connect(sock_path)  # connects, never sends a byte
    return slow, silent


def test_a_slow_client_does_not_block_others(serve, sock_path):
    # The server would wait a minute for the slow ones; a client gives up after 10 s. So these
    # calls only succeed if nobody waits for the slow and the silent connection.
    serve(request_timeout=60.0, idle_timeout=60.0)
    slow, silent = _slow_and_silent(sock_path)
    for _ in range(20):
        assert ApiClient(sock_path, timeout=10).call("GET", "/vm")["state"] == "running"
    slow.close()
    silent.close()


def test_a_slow_client_is_cut_off_and_an_idle_one_closed(serve, sock_path):
    serve(request_timeout=1.0, idle_timeout=1.0)
    slow, silent = _slow_and_silent(sock_path)
    assert parse_response(slow.recv(65536))[0] == 408
    assert silent.recv(100) == b""  # an idle connection is closed without an answer
    slow.close()
    silent.close()


def test_slowloris_trickle_gets_408(serve, sock_path):
    serve(request_timeout=1.0)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(sock_path)
    start = time.monotonic()
    try:
        for ch in b"GET /vm HTTP/1.1\r\nX-Trickle: " + b"a" * 100:
            s.send(bytes([ch]))  # a byte every 50 ms keeps each recv() busy, but not the request deadline
            if select.select([s], [], [], 0.05)[0]:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    answered = time.monotonic() - start
    out = s.recv(65536)
    s.close()
    assert parse_response(out)[0] == 408
    assert 0.9 < answered < 2.5


def test_too_many_connections_get_503(serve, sock_path):
    server = serve(max_connections=2, idle_timeout=5)
    held = []
    for _ in range(2):
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock_path)
        held.append(s)
    deadline = time.monotonic() + 5
    while server.connection_count < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    # Refused at once (the accept thread never waits for a request that would not be served).
    extra = socket.socket(socket.AF_UNIX)
    extra.settimeout(5)
    extra.connect(sock_path)
    status, headers, body = parse_response(extra.recv(65536))
    extra.close()
    assert status == 503 and headers["retry-after"] == "1" and "too many" in json.loads(body)["error"]
    for s in held:
        s.close()
    deadline = time.monotonic() + 5
    while server.connection_count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert request(sock_path, "GET", "/vm")[0] == 200


def test_server_threads_have_the_api_role(sock_path):
    seen = []
    cb = lambda role, name: seen.append((role, name))  # noqa: E731
    threads.add_thread_start_callback(cb)
    try:
        with ApiServer(sock_path, CORE_ROUTES).start(FakeVm()):
            request(sock_path, "GET", "/vm")
    finally:
        threads.remove_thread_start_callback(cb)
    assert ("api", "api") in seen
    assert any(role == "api" and name.startswith("api:conn") for role, name in seen)
    assert {role for role, _ in seen} == {"api"}


# ----- the socket file -----

def test_socket_is_owner_only_and_removed_on_close(sock_path):
    old = os.umask(0)
    try:
        server = ApiServer(sock_path, CORE_ROUTES)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
    server.start(FakeVm())
    server.close()
    assert not os.path.exists(sock_path)
    server.close()  # idempotent


def test_stale_socket_is_replaced_live_one_refused(sock_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock_path)
    stale.close()
    with ApiServer(sock_path, CORE_ROUTES).start(FakeVm()):
        assert request(sock_path, "GET", "/vm")[0] == 200
        with pytest.raises(ApiSocketError, match="in use"):
            ApiServer(sock_path, CORE_ROUTES)
        assert request(sock_path, "GET", "/vm")[0] == 200  # the refused one did not touch it


def test_other_files_are_never_replaced(tmp_path):
    path = tmp_path / "file"
    path.write_text("mine")
    with pytest.raises(ApiSocketError, match="not a socket"):
        ApiServer(str(path), CORE_ROUTES)
    assert path.read_text() == "mine"
    with pytest.raises(ApiSocketError):
        ApiServer(str(tmp_path / "no" / "such" / "dir.sock"), CORE_ROUTES)


def test_close_leaves_a_newer_socket_alone(sock_path):
    server = ApiServer(sock_path, CORE_ROUTES)
    os.unlink(sock_path)
    other = socket.socket(socket.AF_UNIX)
    other.bind(sock_path)
    server.close()
    assert os.path.exists(sock_path)
    other.close()


# ----- plugin routes -----

class FakePlugins:
    def __init__(self, *route_lists):
        self.route_lists = route_lists

    def call(self, hook, **kwargs):
        assert hook == "vmmkit_api_routes"
        return list(self.route_lists)


def test_plugin_routes(sock_path):
    def hello(vm, request):
        return {"hello": request.query.get("name", ["?"])[0], "state": vm.state}

    def create(vm, request):
        body = request.json()
        if not isinstance(body, dict) or "size" not in body:
            raise ApiError(400, "give size")
        return 201, {"created": body["size"]}

    def broken(vm, request):
        raise RuntimeError("plugin bug")

    def not_json(vm, request):
        return {"x": object()}

    plugins = FakePlugins([("GET", "/vm/hello", hello), ("PUT", "/vm/thing", create)], [("GET", "/vm/broken", broken), ("GET", "/vm/notjson", not_json)])
    with make_server(sock_path, plugins).start(FakeVm()):
        assert request(sock_path, "GET", "/vm/hello?name=x") == (200, {"hello": "x", "state": "running"})
        assert request(sock_path, "PUT", "/vm/thing", {"size": 3}) == (201, {"created": 3})
        assert request(sock_path, "PUT", "/vm/thing", {}) == (400, {"error": "give size"})
        status, body = request(sock_path, "GET", "/vm/broken")
        assert status == 500 and "plugin bug" in body["error"]
        status, body = request(sock_path, "GET", "/vm/notjson")
        assert status == 500 and "not JSON" in body["error"]
        assert request(sock_path, "GET", "/vm")[0] == 200  # still serving


@pytest.mark.parametrize("routes,match", [
    ([("GET", "/vm", lambda vm, r: 1)], "defined twice"),
    ([("get", "/x", lambda vm, r: 1)], "upper-case"),
    ([("GET", "x", lambda vm, r: 1)], "start with '/'"),
    ([("GET", "/x", "not callable")], "not callable"),
    ([("GET", "/x")], r"\(method, path, handler\)"),
])
def test_bad_plugin_routes_stop_before_boot(sock_path, routes, match):
    with pytest.raises(PluginError, match=match):
        make_server(sock_path, FakePlugins(routes))
    assert not os.path.exists(sock_path)


# ----- the client -----

def test_client_errors_are_one_line(tmp_path, sock_path):
    with pytest.raises(ApiClientError, match="no API socket at"):
        ApiClient(sock_path).call("GET", "/vm")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock_path)
    stale.close()
    with pytest.raises(ApiClientError, match="nothing is listening"):
        ApiClient(sock_path).call("GET", "/vm")
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(ApiClientError):
        ApiClient(str(plain)).call("GET", "/vm")


def test_client_timeout(sock_path):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sock_path)
    listener.listen(1)  # accepts (in the backlog) but never answers
    try:
        with pytest.raises(ApiClientError, match="did not answer"):
            ApiClient(sock_path, timeout=0.3).call("GET", "/vm")
    finally:
        listener.close()


def test_dispatch_without_vm_is_409(sock_path):
    with ApiServer(sock_path, CORE_ROUTES).start() as server:
        assert server.vm is None
        status, body = request(sock_path, "GET", "/vm")
        assert status == 409 and "no VM" in body["error"]


def test_requests_during_close_do_not_hang(sock_path):
    server = ApiServer(sock_path, CORE_ROUTES, idle_timeout=30).start(FakeVm())
    conns = []
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock_path)
        conns.append(s)
    time.sleep(0.1)
    # A hang, not a speed, is what this catches: the bound is far above any normal close.
    closer = threading.Thread(target=server.close)
    closer.start()
    closer.join(30)
    assert not closer.is_alive(), "close() hung with idle connections open"
    for s in conns:
        s.settimeout(30)
        assert s.recv(10) == b""
        s.close()
    def api_threads():
        return [t for t in threading.enumerate() if t.name.startswith("vmmkit:api") and t.is_alive()]

    # A connection's thread ends a moment after it stops counting: wait for both.
    deadline = time.monotonic() + 30
    while (server.connection_count or api_threads()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.connection_count == 0
    assert not api_threads()
