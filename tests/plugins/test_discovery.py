"""Plugins as users meet them: discovery through entry points, `vmmkit plugins`, selection, faults."""

import json
import subprocess
import sys
import textwrap

import pytest

from vmmkit.config import ConfigError, load_config
from vmmkit.hookspecs import hookimpl
from vmmkit.plugins import DeviceKind, Plugins

VMMKIT = [sys.executable, "-m", "vmmkit"]


def plugins_json():
    proc = subprocess.run(VMMKIT + ["plugins", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return {row["name"]: row for row in json.loads(proc.stdout)}


def test_built_in_plugins_come_through_the_entry_point_group():
    rows = plugins_json()
    for name in ("blk", "platform", "serial"):
        assert rows[name]["distribution"] == "vmmkit", rows[name]
        assert rows[name]["error"] is None
    assert rows["blk"]["kinds"] == ["blk"]
    assert "vmmkit_device_kinds" in rows["blk"]["hooks"]
    assert "vmmkit_vm_setup_platform" in rows["serial"]["hooks"]


def test_built_in_plugins_are_not_a_generic_top_level_package():
    proc = subprocess.run([sys.executable, "-c", "import plugins"], capture_output=True, cwd="/")
    assert proc.returncode != 0


def test_a_pip_installed_third_party_plugin_is_found(rng_plugin):
    row = plugins_json()["virtio-rng"]
    assert row["distribution"] == "vmmkit-virtio-rng" and row["version"] == "0.1.0"
    assert row["kinds"] == ["virtio-rng"]
    text = subprocess.run(VMMKIT + ["plugins"], capture_output=True, text=True).stdout
    assert "virtio-rng  (vmmkit_virtio_rng, vmmkit-virtio-rng 0.1.0)" in text


def test_the_example_plugins_own_unit_tests_pass_with_vmmkits_helpers(rng_plugin):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not guest",
                           "tests"], cwd=rng_plugin, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 passed" in proc.stdout


def load(tmp_path, text, plugins):
    path = tmp_path / "vm.toml"
    path.write_text(textwrap.dedent(text))
    return load_config(str(path), device_kinds={k: v.schema for k, v in plugins.kinds.items()},
                       hints=plugins.hints())


def test_an_unknown_kind_fails_before_boot_listing_the_known_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, '[[device]]\nkind = "blkk"\npath = "x"\n', Plugins())
    text = str(err.value)
    assert "vm.toml" in text and "unknown device kind 'blkk'" in text and "blk" in text
    assert "did you mean 'blk'" in text


def test_an_unknown_kind_names_the_package_that_provides_it(tmp_path):
    plugins = Plugins(disable=["virtio-rng"])
    with pytest.raises(ConfigError) as err:
        load(tmp_path, '[[device]]\nkind = "virtio-rng"\n', plugins)
    assert "vmmkit-virtio-rng" in str(err.value)


def test_a_plugins_own_keys_are_checked_with_file_and_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, '[[device]]\nkind = "blk"\npath = "/dev/null"\nread_onyl = true\n', Plugins())
    text = str(err.value)
    assert "vm.toml" in text and "read_onyl" in text and "read_only" in text


class BrokenInHook:
    """A plugin whose declaration hook raises."""

    @hookimpl
    def vmmkit_device_kinds(self):
        raise RuntimeError("boom in a hook")


class GoodExtra:
    @hookimpl
    def vmmkit_device_kinds(self):
        return [DeviceKind("good", object, lambda vm, spec: None)]


def test_a_plugin_raising_in_a_hook_is_reported_by_name_and_the_others_load():
    plugins = Plugins(extra=[("broken", BrokenInHook()), ("good", GoodExtra())])
    assert "boom in a hook" in plugins.broken()["broken"]
    assert "good" in plugins.kinds and "blk" in plugins.kinds


def test_disable_turns_a_plugin_off():
    plugins = Plugins(disable=["blk"])
    assert "blk" not in plugins.kinds and "blk" not in plugins.infos
    assert "serial" in plugins.infos


def broken_distribution(tmp_path):
    """A site directory holding an installed distribution whose vmmkit entry point cannot be imported."""
    site = tmp_path / "site"
    info = site / "vmmkit_broken-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vmmkit-broken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[vmmkit]\nbroken = vmmkit_broken_plugin\n")
    (site / "vmmkit_broken_plugin.py").write_text("raise ImportError('this plugin needs libfoo')\n")
    return str(site)


def test_a_plugin_that_fails_to_import_is_named_with_its_cause(tmp_path):
    env = {"PYTHONPATH": broken_distribution(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(VMMKIT + ["plugins", "--json"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    assert "ImportError: this plugin needs libfoo" in rows["broken"]["error"]
    assert rows["broken"]["distribution"] == "vmmkit-broken"
    assert rows["blk"]["error"] is None
    text = subprocess.run(VMMKIT + ["plugins"], capture_output=True, text=True, env=env).stdout
    assert "broken" in text and "needs libfoo" in text


def test_a_disabled_plugins_kind_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "vm.toml"
    path.write_text('[plugins]\ndisable = ["blk"]\n\n[[device]]\nkind = "blk"\npath = "/dev/null"\n')
    proc = subprocess.run(VMMKIT + ["run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown device kind 'blk'" in proc.stderr and "disabled" in proc.stderr


def test_every_thread_a_vm_starts_calls_the_thread_start_hook():
    from vmmkit import threads
    from vmmkit.config import VmSpec
    from vmmkit.vm import Vm

    seen = []

    class Recorder:
        @hookimpl
        def vmmkit_thread_start(self, role, name):
            seen.append((role, name))

    vm = Vm(VmSpec(), plugins=Plugins(extra=[("recorder", Recorder())]))
    try:
        threads.start_thread(threads.ROLE_DEVICE, "device:test", lambda: None).join()
    finally:
        vm.close()
    threads.start_thread(threads.ROLE_DEVICE, "device:after", lambda: None).join()
    assert seen == [("device", "device:test")]
