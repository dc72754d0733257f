"""The ``vmmkit`` entry points of the installed distributions, cached between runs.

Finding entry points means reading the metadata of every installed
distribution (importlib.metadata, which also pulls in the email and zipfile
packages). That is most of the start-up time of `vmmkit run` on a slow
filesystem, and the answer only changes when something is installed or
removed, which changes the modification time of the directory it lands in.
So the answer is kept in the cache, keyed on every import-path directory's
modification time, and computed afresh when any of them moved.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import attrs

from . import paths

CACHE_VERSION = 2


@attrs.frozen
class EntryPoint:
    """One ``name = module[:attr]`` line of a distribution's entry points."""

    name: str
    value: str
    distribution: str | None
    version: str | None

    def load(self):
        """Import the module (and fetch the attribute) it names."""
        module, _, attr = self.value.partition(":")
        obj = importlib.import_module(module.strip())
        for part in filter(None, attr.strip().split(".")):
            obj = getattr(obj, part)
        return obj


def _key() -> list:
    key = []
    for entry in sys.path:
        try:
            key.append([entry, os.stat(entry or ".").st_mtime_ns])
        except OSError:
            key.append([entry, None])
    return key


def _cache_file() -> str:
    return os.path.join(paths.cache_dir(), "entry-points.json")


def _scan(group: str) -> list[EntryPoint]:
    import importlib.metadata as md
    found = []
    for ep in md.entry_points(group=group):
        dist = getattr(ep, "dist", None)
        found.append(EntryPoint(ep.name, ep.value, dist.name if dist else None, dist.version if dist else None))
    return found


#: Answers kept: one per interpreter, group and import path (`vmmkit`, `python -m vmmkit`
#: and pytest each start with a different sys.path[0]), so they do not evict each other.
CACHE_ENTRIES = 8


def entry_points(group: str) -> list[EntryPoint]:
    """The entry points of *group*, from the cache when nothing was installed or removed since."""
    key = [CACHE_VERSION, sys.executable, group, _key()]
    entries: list = []
    try:
        with open(_cache_file()) as f:
            entries = [e for e in json.load(f)["entries"] if isinstance(e, dict)]
        for entry in entries:
            if entry.get("key") == key:
                return [EntryPoint(*row) for row in entry["entry_points"]]
    except (OSError, ValueError, KeyError, TypeError):
        entries = []
    found = _scan(group)
    entries = [{"key": key, "entry_points": [attrs.astuple(ep) for ep in found]}] + entries[:CACHE_ENTRIES - 1]
    try:
        os.makedirs(paths.cache_dir(), exist_ok=True)
        tmp = f"{_cache_file()}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"entries": entries}, f)
        os.replace(tmp, _cache_file())
    except OSError:
        pass  # a read-only cache only costs speed
    return found
