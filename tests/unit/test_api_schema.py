"""docs/api.yaml against the server: schemathesis generates requests (valid and invalid) from the
document and checks every answer (no 5xx, documented status codes, content types, headers and
bodies, invalid data rejected, 405 with Allow for undocumented methods).

The server is the real ApiServer on a real Unix socket, serving a fake VM (tests/unit/api_fakes.py):
a live guest is too slow in the lab for hundreds of requests. tests/guest/test_api.py checks a live
VM's GET /vm answer against the same document.
"""

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from api_fakes import FakeVm
from api_unix import unix_session
from vmmkit.api import ApiServer, CORE_ROUTES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API_YAML = os.path.join(ROOT, "docs", "api.yaml")
BASE_URL = "http://localhost"


schema = schemathesis.openapi.from_path(API_YAML)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("api") / "api.sock")
    server = ApiServer(path, CORE_ROUTES).start(FakeVm())
    session = unix_session(path)
    yield server, session
    session.close()
    server.close()


@schema.parametrize()
@settings(max_examples=int(os.environ.get("VMMKIT_API_EXAMPLES", "60")), deadline=None, suppress_health_check=list(HealthCheck))
def test_server_conforms_to_docs_api_yaml(case, live):
    server, session = live
    server.attach(FakeVm())  # each case starts from a running VM, so that valid requests can succeed
    response = case.call_and_validate(base_url=BASE_URL, session=session)
    assert response.status_code < 500


def test_the_document_lists_exactly_the_core_routes():
    import yaml
    with open(API_YAML) as f:
        doc = yaml.safe_load(f)
    documented = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    assert documented == {(r.method, r.path) for r in CORE_ROUTES}
    from vmmkit.api import API_VERSION
    assert doc["info"]["version"] == API_VERSION


def test_real_answers_validate_against_the_document(live):
    """Each route's answer, also the 409s and error bodies, against the document's schemas."""
    server, session = live
    vm = FakeVm(devices=[{"id": "blk0", "kind": "blk", "transport": "virtio-mmio", "virtio_id": 2,
                          "mmio_base": 0xD0000000, "mmio_size": 0x200, "gsi": 5}])
    server.attach(vm)
    sequence = [("GET", "/vm"), ("GET", "/vm/inspect"), ("PUT", "/vm/pause"), ("GET", "/vm/inspect"),
                ("PUT", "/vm/shutdown"), ("GET", "/vm"),
                ("PUT", "/vm/resume"), ("PUT", "/vm/shutdown"), ("GET", "/vm"), ("PUT", "/vm/stop"),
                ("PUT", "/vm/pause"), ("PUT", "/vm/resume"), ("GET", "/vm")]
    statuses = []
    for method, path in sequence:
        response = session.request(method, BASE_URL + path)
        schema[path][method].validate_response(response)
        statuses.append(response.status_code)
    assert statuses == [200, 409, 200, 200, 409, 200, 200, 202, 200, 202, 409, 409, 200]
