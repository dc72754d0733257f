"""Kernel module dependencies, resolved from the modules themselves.

Debian's kernel packages do not ship ``modules.dep`` (``depmod`` makes it at
install time), so the builders read each module's ``.modinfo`` ELF section:
its ``name=`` and ``depends=`` entries are what depmod would have used. The
result is a load order (dependencies first) for the initramfs's /init, and a
``modules.dep`` text for tools that want one.
"""

from __future__ import annotations

import os
import struct

from ..errors import VmmkitError


class ModuleError(VmmkitError):
    """A module is missing or its file cannot be parsed."""


def modinfo(blob: bytes, *, path: str = "<module>") -> dict[str, list[str]]:
    """Return the ``.modinfo`` key/value pairs of an ELF64 kernel module.

    Keys may repeat (``alias=``), so values are lists.
    """
    if blob[:4] != b"\x7fELF" or len(blob) < 64 or blob[4] != 2 or blob[5] != 1:
        raise ModuleError(f"{path}: not a 64-bit little-endian ELF kernel module")
    shoff, = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", blob, 0x3A)
    if shentsize < 64 or shoff + shnum * shentsize > len(blob) or shstrndx >= shnum:
        raise ModuleError(f"{path}: section table out of bounds")

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", blob, shoff + i * shentsize)
        if offset + size > len(blob):
            raise ModuleError(f"{path}: section {i} out of bounds")
        return name, offset, size

    _, str_off, str_size = section(shstrndx)
    for i in range(shnum):
        name_off, offset, size = section(i)
        if name_off >= str_size:
            continue
        end = blob.find(b"\0", str_off + name_off, str_off + str_size)
        if end < 0 or blob[str_off + name_off:end] != b".modinfo":
            continue
        info: dict[str, list[str]] = {}
        for entry in blob[offset:offset + size].split(b"\0"):
            if b"=" in entry:
                key, _, value = entry.decode("utf-8", "replace").partition("=")
                info.setdefault(key, []).append(value)
        return info
    raise ModuleError(f"{path}: no .modinfo section")


def canonical(name: str) -> str:
    """Module names treat '-' and '_' alike; the kernel stores '_'."""
    return name.replace("-", "_")


class ModuleIndex:
    """All modules under a ``lib/modules/<release>`` tree, by canonical name."""

    def __init__(self, moddir: str):
        self.moddir = moddir
        self.paths: dict[str, str] = {}  # name -> path relative to moddir
        for root, _dirs, files in os.walk(moddir):
            for fname in files:
                if fname.endswith(".ko"):
                    rel = os.path.relpath(os.path.join(root, fname), moddir)
                    self.paths[canonical(fname[:-3])] = rel
        self._deps: dict[str, list[str]] = {}

    def depends(self, name: str) -> list[str]:
        """Direct dependencies of module *name*, from its ``depends=`` entry."""
        name = canonical(name)
        if name not in self._deps:
            rel = self.path(name)
            with open(os.path.join(self.moddir, rel), "rb") as f:
                info = modinfo(f.read(), path=rel)
            deps = [canonical(d) for v in info.get("depends", []) for d in v.split(",") if d]
            self._deps[name] = deps
        return self._deps[name]

    def path(self, name: str) -> str:
        """Path of module *name* relative to the module directory."""
        try:
            return self.paths[canonical(name)]
        except KeyError:
            raise ModuleError(f"kernel module {name!r} not found under {self.moddir}") from None

    def load_order(self, wanted: list[str], *, builtin: set[str] = frozenset()) -> list[str]:
        """Modules to insert, dependencies first, each once.

        Names in *builtin* (from ``modules.builtin``) are compiled into the
        kernel and are skipped silently, so a wanted list stays valid across
        kernel flavours that build a driver in or out.
        """
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = visiting, 2 = done

        def visit(name: str, chain: tuple[str, ...]) -> None:
            name = canonical(name)
            if name in builtin or state.get(name) == 2:
                return
            if state.get(name) == 1:
                raise ModuleError("module dependency cycle: " + " -> ".join(chain + (name,)))
            state[name] = 1
            for dep in self.depends(name):
                visit(dep, chain + (name,))
            state[name] = 2
            order.append(name)

        for name in wanted:
            visit(name, ())
        return order

    def modules_dep(self, names: list[str]) -> str:
        """A ``modules.dep`` text for *names* (each with its full dependency list)."""
        lines = []
        for name in names:
            deps = self.load_order([name])[:-1]
            lines.append(f"{self.path(name)}: " + " ".join(self.path(d) for d in reversed(deps)))
        return "\n".join(lines) + "\n"


def read_builtin(moddir: str) -> set[str]:
    """Names listed in ``modules.builtin`` (kernel/…/foo.ko -> foo), if the file exists."""
    path = os.path.join(moddir, "modules.builtin")
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {canonical(os.path.basename(line.strip())[:-3]) for line in f if line.strip().endswith(".ko")}
