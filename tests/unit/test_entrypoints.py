"""The entry-point cache: reused while nothing is installed, refreshed when an import-path directory changes."""

import os
import sys

import pytest

from vmmkit import entrypoints


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VMMKIT_CACHE", str(tmp_path / "cache"))
    site = tmp_path / "site"
    (site / "demo-1.0.dist-info").mkdir(parents=True)
    (site / "demo-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n")
    (site / "demo-1.0.dist-info" / "entry_points.txt").write_text("[vmmkit-test]\ndemo = json:loads\n")
    monkeypatch.setattr(sys, "path", [str(site)] + sys.path)
    return site


def test_found_then_served_from_the_cache(cache, monkeypatch):
    first = entrypoints.entry_points("vmmkit-test")
    assert [(e.name, e.value, e.distribution, e.version) for e in first] == [("demo", "json:loads", "demo", "1.0")]
    assert first[0].load()("[1]") == [1]
    monkeypatch.setattr(entrypoints, "_scan", lambda group: pytest.fail("rescanned with nothing installed"))
    assert entrypoints.entry_points("vmmkit-test") == first


def test_an_install_invalidates_the_cache(cache):
    entrypoints.entry_points("vmmkit-test")
    (cache / "other-2.0.dist-info").mkdir()
    (cache / "other-2.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: other\nVersion: 2.0\n")
    (cache / "other-2.0.dist-info" / "entry_points.txt").write_text("[vmmkit-test]\nother = os.path\n")
    st = os.stat(cache)
    os.utime(cache, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # coarse-timestamp filesystems
    names = sorted(e.name for e in entrypoints.entry_points("vmmkit-test"))
    assert names == ["demo", "other"]


def test_an_unwritable_cache_still_answers(cache, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("VMMKIT_CACHE", str(blocker / "sub"))
    assert [e.name for e in entrypoints.entry_points("vmmkit-test")] == ["demo"]


def test_different_import_paths_do_not_evict_each_other(cache, monkeypatch):
    entrypoints.entry_points("vmmkit-test")
    base = list(sys.path)
    monkeypatch.setattr(sys, "path", base + ["/nonexistent-a"])
    entrypoints.entry_points("vmmkit-test")
    monkeypatch.setattr(entrypoints, "_scan", lambda group: pytest.fail("rescanned an import path seen before"))
    monkeypatch.setattr(sys, "path", base)
    assert [e.name for e in entrypoints.entry_points("vmmkit-test")] == ["demo"]
