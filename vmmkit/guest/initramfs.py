"""Assembling an initramfs from Debian packages: busybox, kernel modules, programs with their libraries.

Both the default guest and the KVM lab are busybox initramfs images; this
module holds what they share. Everything is written straight into a newc cpio
archive (no staging tree, no root needed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from .. import paths
from . import apt, deb, elfdeps, kmod
from .cpio import CpioWriter

BASE_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "lib", "lib64", "etc", "proc", "sys",
             "dev", "tmp", "root", "run", "mnt", "var", "lib/x86_64-linux-gnu")
LIB_DIR = "lib/x86_64-linux-gnu"
PROGRAM_DIRS = ("usr/bin/", "usr/sbin/", "bin/", "sbin/")
# Device nodes in the image, there before devtmpfs is mounted: (name, major, minor, mode).
CHAR_DEVICES = (("dev/console", 5, 1, 0o600), ("dev/null", 1, 3, 0o666))


class InitramfsBuilder:
    """Collects the parts of a busybox initramfs and writes them as one cpio archive."""

    def __init__(self, out_path: str, work_dir: str, progress=lambda s: None):
        self.out_path = out_path
        self.work_dir = work_dir
        self.progress = progress
        self._file = open(out_path + ".tmp", "wb")
        self.cpio = CpioWriter(self._file)
        for d in BASE_DIRS:
            self.cpio.add_dirs(d)
        for name, major, minor, mode in CHAR_DEVICES:
            self.cpio.add_chardev(name, major, minor, mode)
        self.cpio.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        self.cpio.add_file("etc/group", b"root:x:0:\n")

    def add_busybox(self, busybox_deb: str) -> None:
        """Add the static busybox and a symlink for each of its applets."""
        dest = os.path.join(self.work_dir, "busybox")
        deb.extract(busybox_deb, dest, want=lambda n: n.endswith("bin/busybox"))
        path = os.path.join(dest, "bin", "busybox")
        if not os.path.exists(path):
            path = os.path.join(dest, "usr", "bin", "busybox")
        self.cpio.add_path("bin/busybox", path)
        # The static binary runs on any x86-64 host; asking it is the only
        # reliable applet list, as it differs between Debian releases.
        listing = subprocess.run([path, "--list-full"], stdout=subprocess.PIPE, text=True, check=True).stdout
        for applet in listing.split():
            if applet in self.cpio or applet == "bin/busybox" or "/" not in applet:
                continue
            self.cpio.add_dirs(os.path.dirname(applet))
            self.cpio.add_symlink(applet, "/bin/busybox")

    def add_modules(self, moddir: str, release: str, wanted: list[str]) -> list[str]:
        """Add *wanted* modules and their dependencies; return the load order.

        The order is also written to ``etc/vmmkit/modules`` (paths relative to
        ``lib/modules/<release>``), which the /init scripts read.
        """
        index = kmod.ModuleIndex(moddir)
        order = index.load_order(wanted, builtin=kmod.read_builtin(moddir))
        rels = []
        for name in order:
            rel = index.path(name)
            target = f"lib/modules/{release}/{rel}"
            self.cpio.add_dirs(os.path.dirname(target))
            self.cpio.add_path(target, os.path.join(moddir, rel))
            rels.append(rel)
        self.cpio.add_file(f"lib/modules/{release}/modules.dep", index.modules_dep(order).encode())
        self.cpio.add_dirs("etc/vmmkit")
        self.cpio.add_file("etc/vmmkit/modules", ("\n".join(rels) + "\n").encode())
        return order

    def add_programs(self, packages: list[str], debs_dir: str) -> list[str]:
        """Add the programs of Debian *packages* with the shared libraries they load.

        Library packages are taken from the packages' Depends, one level at a
        time, until every DT_NEEDED soname is found; only the libraries that are
        actually needed enter the image.
        """
        if not packages:
            return []
        stage = os.path.join(self.work_dir, "programs")
        paths = apt.download(packages, debs_dir, self.progress)
        programs: dict[str, str] = {}  # initramfs name -> staged path
        for pkg in packages:
            names = deb.extract(paths[pkg], stage, want=lambda n: n.startswith(PROGRAM_DIRS))
            for name in names:
                full = os.path.join(stage, name)
                if os.path.isfile(full) and not os.path.islink(full):
                    programs[name] = full
        libs = self._resolve_libraries(packages, programs, stage, debs_dir)
        added = []
        for name, full in sorted(programs.items()):
            # Debian is usr-merged; keep both views so scripts find /sbin/mkfs.ext4.
            if name in self.cpio:
                continue
            self.cpio.add_dirs(os.path.dirname(name))
            self.cpio.add_path(name, full)
            added.append("/" + name)
        for soname, full in sorted(libs.items()):
            target = f"{LIB_DIR}/{soname}"
            if target not in self.cpio:
                self.cpio.add_path(target, os.path.realpath(full))
        if "lib64/ld-linux-x86-64.so.2" not in self.cpio and "ld-linux-x86-64.so.2" in libs:
            self.cpio.add_symlink("lib64/ld-linux-x86-64.so.2", f"/{LIB_DIR}/ld-linux-x86-64.so.2")
        return added

    def _resolve_libraries(self, packages, programs, stage, debs_dir) -> dict[str, str]:
        available: dict[str, str] = {}  # soname -> staged path
        fetched: set[str] = set(packages)
        frontier = list(packages)

        def needs_of(paths):
            out = set()
            for p in paths:
                with open(p, "rb") as f:
                    needed, interp = elfdeps.elf_needs(f.read())
                out.update(needed)
                if interp:
                    out.add(os.path.basename(interp))
            return out

        def closure():
            want = needs_of(programs.values())
            done: dict[str, str] = {}
            todo = list(want)
            while todo:
                so = todo.pop()
                if so in done or so not in available:
                    continue
                done[so] = available[so]
                todo.extend(needs_of([available[so]]) - set(done))
            missing = {so for so in want | {n for p in done.values() for n in needs_of([p])} if so not in done}
            return done, missing

        for _level in range(12):
            done, missing = closure()
            if not missing:
                return done
            candidates = []
            for pkg in frontier:
                for dep in apt.depends(pkg):
                    if dep not in fetched and (dep.startswith("lib") or dep.startswith("zlib")):
                        candidates.append(dep)
                        fetched.add(dep)
            if not candidates:
                break
            self.progress(f"libraries for {', '.join(packages)}: {', '.join(candidates)}")
            paths = apt.download(candidates, debs_dir, self.progress)
            for pkg in candidates:
                for name in deb.extract(paths[pkg], stage, want=lambda n: ".so" in os.path.basename(n)):
                    full = os.path.join(stage, name)
                    if os.path.exists(full):
                        available.setdefault(os.path.basename(name), full)
            frontier = candidates
        done, missing = closure()
        if missing:
            raise apt.AptError(f"cannot find libraries {', '.join(sorted(missing))} needed by {', '.join(packages)}")
        return done

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a file, creating its parent directories."""
        self.cpio.add_dirs(os.path.dirname(name))
        self.cpio.add_file(name, data, mode)

    def finish(self) -> None:
        """Write the trailer and move the archive into place atomically."""
        self.cpio.finish()
        self._file.close()
        os.replace(self.out_path + ".tmp", self.out_path)

    def abort(self) -> None:
        """Drop a half-written archive."""
        self._file.close()
        if os.path.exists(self.out_path + ".tmp"):
            os.unlink(self.out_path + ".tmp")


def unpack_kernel(kernel_deb: str, work_dir: str) -> tuple[str, str, str]:
    """Extract a linux-image .deb; return (vmlinuz path, modules dir, release)."""
    dest = os.path.join(work_dir, "kernel")
    deb.extract(kernel_deb, dest, want=lambda n: n.startswith(("boot/vmlinuz-", "lib/modules/", "usr/lib/modules/")))
    boot = os.path.join(dest, "boot")
    images = [f for f in os.listdir(boot) if f.startswith("vmlinuz-")] if os.path.isdir(boot) else []
    if len(images) != 1:
        raise deb.DebError(f"{kernel_deb}: expected one boot/vmlinuz-*, found {images}")
    release = images[0][len("vmlinuz-"):]
    moddir = os.path.join(dest, "lib", "modules", release)
    if not os.path.isdir(moddir):
        moddir = os.path.join(dest, "usr", "lib", "modules", release)
    return os.path.join(boot, images[0]), moddir, release


def build_machine(dest_dir: str, kernel_pkg: str, busybox_pkg: str, modules: list[str], init: bytes,
                  extras: list[str] = (), progress=lambda s: None, files=()) -> str:
    """Build ``vmlinuz`` and ``initramfs.cpio`` into *dest_dir* from Debian packages; return the kernel release.

    The guest and the lab are both this: a Debian kernel, busybox, some of
    the kernel's modules, an /init, and optionally other packages' programs.
    *files* are more files for the initramfs, as ``(name, data, mode)``.
    """
    os.makedirs(dest_dir, exist_ok=True)
    debs = apt.download([kernel_pkg, busybox_pkg], paths.debs_dir(), progress)
    with new_work_dir(paths.cache_dir()) as work:
        progress(f"unpacking {kernel_pkg}")
        vmlinuz, moddir, release = unpack_kernel(debs[kernel_pkg], work)
        builder = InitramfsBuilder(os.path.join(dest_dir, "initramfs.cpio"), work, progress)
        try:
            builder.add_busybox(debs[busybox_pkg])
            builder.add_modules(moddir, release, modules)
            builder.add_programs(list(extras), paths.debs_dir())
            for name, data, mode in files:
                builder.add_file(name, data, mode)
            builder.add_file("init", init, 0o755)
            builder.finish()
        except BaseException:
            builder.abort()
            raise
        shutil.copyfile(vmlinuz, os.path.join(dest_dir, "vmlinuz"))
    return release


def new_work_dir(parent: str) -> tempfile.TemporaryDirectory:
    """A scratch directory next to the cache (same filesystem, cheap renames)."""
    os.makedirs(parent, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=".build-", dir=parent)
