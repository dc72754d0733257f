"""Finding and loading plugins: the ``vmmkit`` entry-point group, with faults isolated.

A plugin whose import fails, or whose declaration hook raises, is recorded
with its name and cause and left out; the others still load, and a VM that
does not need the broken one still boots.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any, Callable

import attrs
import pluggy

from . import hookspecs
from .errors import VmmkitError

GROUP = "vmmkit"

#: Kinds and features that plugins outside vmmkit provide, and how to get them:
#: an unknown kind in a TOML file is answered with the install command.
KNOWN_PACKAGES = {
    "virtio-rng": "pip install vmmkit-virtio-rng  (examples/vmmkit-virtio-rng in the vmmkit source)",
}


@attrs.frozen
class DeviceKind:
    """A device kind a plugin provides: its TOML name, schema class and factory."""

    name: str
    schema: type
    create: Callable[[Any, Any], Any]
    description: str = ""


@attrs.frozen
class Feature:
    """A feature table a plugin provides: its TOML name and schema class."""

    name: str
    schema: type
    description: str = ""


@attrs.frozen
class PluginInfo:
    """One plugin as found: where it came from, and why it failed if it did."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    error: str | None = None


class PluginError(VmmkitError):
    """A plugin needed by this VM is broken or missing."""


class Plugins:
    """The plugin manager plus what the plugins declared."""

    def __init__(self, *, disable=(), entry_points: bool = True, extra: list = ()):
        self.pm = pluggy.PluginManager("vmmkit")
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.disabled = set(disable)
        if entry_points:
            self._load_entry_points()
        for name, obj in extra:
            self.register(name, obj)
        self.kinds: dict[str, DeviceKind] = {}
        self.features: dict[str, Feature] = {}
        self.kind_owner: dict[str, str] = {}
        self._collect()

    def _load_entry_points(self) -> None:
        from .entrypoints import entry_points
        for ep in entry_points(GROUP):
            if ep.name in self.disabled or ep.name in self.infos:
                continue
            dname, version = ep.distribution, ep.version
            try:
                obj = ep.load()
            except Exception as exc:  # a broken third-party plugin must not take vmmkit down
                self.infos[ep.name] = PluginInfo(ep.name, ep.value, dname, version,
                                                 f"import failed: {type(exc).__name__}: {exc}")
                continue
            self.pm.register(obj, name=ep.name)
            self.infos[ep.name] = PluginInfo(ep.name, ep.value, dname, version)

    def register(self, name: str, obj) -> None:
        """Register a plugin object directly (custom VMMs and tests)."""
        if name in self.disabled:
            return
        self.pm.register(obj, name=name)
        self.infos[name] = PluginInfo(name, getattr(obj, "__name__", type(obj).__name__), None, None)

    def _collect(self) -> None:
        for hook, target in (("vmmkit_device_kinds", self.kinds), ("vmmkit_features", self.features)):
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                try:
                    items = impl.function() or []
                except Exception as exc:
                    self._fail(impl.plugin_name, f"{hook} raised {type(exc).__name__}: {exc}")
                    continue
                for item in items:
                    target[item.name] = item
                    if hook == "vmmkit_device_kinds":
                        self.kind_owner[item.name] = impl.plugin_name

    def _fail(self, name: str, why: str) -> None:
        info = self.infos.get(name)
        self.infos[name] = attrs.evolve(info, error=why) if info else PluginInfo(name, "?", None, None, why)
        try:
            self.pm.unregister(name=name)
        except ValueError:
            pass

    def device_schemas(self) -> dict[str, type]:
        """Each device kind's TOML schema, for :func:`vmmkit.config.load_config` and ``VmSpec.build``."""
        return {name: kind.schema for name, kind in self.kinds.items()}

    def feature_schemas(self) -> dict[str, type]:
        """Each feature table's schema."""
        return {name: feature.schema for name, feature in self.features.items()}

    def hints(self) -> dict[str, str]:
        """For kinds no loaded plugin provides: the package to install, or the disabled or broken plugin."""
        hints = dict(KNOWN_PACKAGES)
        for name in self.disabled:
            hints.setdefault(name, f"it may come from plugin {name!r}, disabled in [plugins] disable")
        return hints

    def broken(self) -> dict[str, str]:
        """Plugins that failed, with the cause."""
        return {n: i.error for n, i in self.infos.items() if i.error}

    def call(self, hook: str, **kwargs) -> list:
        """Call a lifecycle hook; an exception names the plugin that raised it."""
        results = []
        for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):
            args = {k: kwargs[k] for k in impl.argnames if k in kwargs}
            try:
                res = impl.function(**args)
            except VmmkitError:
                raise
            except Exception as exc:
                tb = "".join(traceback.format_exception(exc)[-3:])
                raise PluginError(f"plugin {impl.plugin_name!r} failed in {hook}: {type(exc).__name__}: {exc}\n{tb}") from exc
            if res is not None:
                results.append(res)
        return results

    def warn_broken(self, file=sys.stderr) -> None:
        """Tell the user about broken plugins, once, without stopping."""
        for name, why in self.broken().items():
            print(f"vmmkit: warning: plugin {name!r} is disabled: {why}", file=file)
