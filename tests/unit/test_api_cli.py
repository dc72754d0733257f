"""`vmmkit ctl` against a server over a fake VM, and `vmmkit run --api-sock` errors before boot."""

import json
import os
import socket

import pytest

from api_fakes import FakeVm
from vmmkit.api import ApiServer, CORE_ROUTES
from vmmkit.cli import main
from vmmkit.config import VmSpec


@pytest.fixture
def served(tmp_path):
    path = str(tmp_path / "api.sock")
    dev = {"id": "data", "kind": "blk", "transport": "virtio-mmio", "virtio_id": 2, "mmio_base": 0xD0000000,
           "mmio_size": 0x200, "gsi": 5}
    vm = FakeVm(VmSpec.build(machine={"vcpus": 2, "memory": "1G"}, api={"socket": path}), devices=[dev])
    with ApiServer(path, CORE_ROUTES).start(vm):
        yield path, vm


def ctl(capsys, *args):
    status = main(["ctl", *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_info_human_and_json(served, capsys):
    path, vm = served
    status, out, err = ctl(capsys, "--api-sock", path, "info")
    assert status == 0, err
    assert "state:    running" in out
    assert "vcpus:    2" in out
    assert "memory:   1G" in out
    assert "data (blk)  virtio-mmio 0xd0000000+0x200  gsi 5" in out
    # --json and --api-sock work after the command too.
    status, out, err = ctl(capsys, "info", "--json", "--api-sock", path)
    assert status == 0
    info = json.loads(out)
    assert info["config"]["api"]["socket"] == path
    assert info["devices"][0]["id"] == "data"


def test_actions(served, capsys):
    path, vm = served
    assert ctl(capsys, "--api-sock", path, "pause")[:2] == (0, "paused\n")
    assert ctl(capsys, "--api-sock", path, "resume")[:2] == (0, "running\n")
    status, out, _ = ctl(capsys, "--api-sock", path, "shutdown")
    assert status == 0 and "power button pressed" in out
    status, out, _ = ctl(capsys, "--api-sock", path, "--json", "stop")
    assert status == 0 and json.loads(out) == {"state": "stopping"}
    assert vm.calls == ["pause", "resume", "shutdown", "stop"]
    status, out, err = ctl(capsys, "--api-sock", path, "pause")
    assert status == 1 and out == ""
    assert err.strip() == "vmmkit: error: PUT /vm/pause: the VM is stopping: only a running VM can be paused"


def test_call_reaches_any_route(served, capsys):
    path, vm = served
    status, out, _ = ctl(capsys, "--api-sock", path, "call", "get", "vm")
    assert status == 0 and json.loads(out)["state"] == "running"
    status, out, _ = ctl(capsys, "--api-sock", path, "call", "PUT", "/vm/pause", "{}")
    assert status == 0 and json.loads(out) == {"state": "paused"}
    status, _, err = ctl(capsys, "--api-sock", path, "call", "PUT", "/vm/pause", "{nope")
    assert status == 2 and "not JSON" in err
    status, _, err = ctl(capsys, "--api-sock", path, "call", "GET", "/missing")
    assert status == 1 and "no such endpoint" in err


def test_missing_or_dead_socket_is_one_line_and_nonzero(tmp_path, capsys):
    path = str(tmp_path / "gone.sock")
    status, out, err = ctl(capsys, "--api-sock", path, "info")
    assert status == 1 and out == ""
    assert err == f"vmmkit: error: no API socket at {path} (is the VM running with --api-sock {path}?)\n"
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()
    status, _, err = ctl(capsys, "--api-sock", path, "pause")
    assert status == 1 and err.count("\n") == 1 and "nothing is listening" in err
    status, _, err = ctl(capsys, "info")
    assert status == 1 and "--api-sock" in err


def test_run_refuses_a_live_socket_before_boot(served, tmp_path, capsys):
    path, _ = served
    config = tmp_path / "vm.toml"
    config.write_text("")
    status = main(["run", str(config), "--api-sock", path])
    _, err = capsys.readouterr()
    assert status == 2
    assert "is in use" in err and path in err
    # The same from the TOML's [api] table.
    config.write_text(f'[api]\nsocket = "{path}"\n')
    status = main(["run", str(config)])
    _, err = capsys.readouterr()
    assert status == 2 and "is in use" in err


def test_run_rejects_a_bad_socket_path(tmp_path, capsys):
    config = tmp_path / "vm.toml"
    config.write_text("")
    status = main(["run", str(config), "--api-sock", "/" + "x" * 120])
    _, err = capsys.readouterr()
    assert status == 2 and "--api-sock" in err and "at most 107" in err
    status = main(["run", str(config), "--api-sock", str(tmp_path)])
    _, err = capsys.readouterr()
    assert status == 2 and "directory" in err
    config.write_text('[api]\nsocket = 3\n')
    status = main(["run", str(config)])
    _, err = capsys.readouterr()
    assert status == 2 and "[api] socket" in err
    assert os.listdir(tmp_path) == ["vm.toml"]


def test_plugins_add_ctl_commands(served, capsys):
    from vmmkit.cli import make_parser
    from vmmkit.hookspecs import hookimpl
    from vmmkit.plugins import Plugins

    class CtlPlugin:
        @hookimpl
        def vmmkit_ctl_commands(self, subparsers):
            p = subparsers.add_parser("vcpus", help="print the vCPU count")
            p.set_defaults(ctl_func=lambda client, args: print(client.call("GET", "/vm")["vcpus"]) or 0)

    path, _ = served
    parser = make_parser(Plugins(entry_points=False, extra=[("ctlplugin", CtlPlugin())]))
    args = parser.parse_args(["ctl", "--api-sock", path, "vcpus"])
    assert args.func(args) == 0
    assert capsys.readouterr().out == "2\n"
