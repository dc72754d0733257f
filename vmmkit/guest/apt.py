"""Fetching Debian packages with ``apt-get download`` into vmmkit's cache.

Only apt's downloader is used (no root, no dpkg database changes): the .deb
files land in a cache directory and are unpacked by :mod:`vmmkit.guest.deb`.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from typing import Callable

from ..errors import VmmkitError

Progress = Callable[[str], None]


class AptError(VmmkitError):
    """apt is missing, or a package cannot be found or fetched."""


NO_APT_HINT = (
    "vmmkit builds its default guest from Debian packages with apt-get, which this machine "
    "lacks. Give the guest yourself instead: set [boot] kernel = \"path/to/bzImage\" and "
    "[boot] initrd = \"path/to/initramfs\" in the VM's TOML file."
)


def require_apt() -> None:
    """Raise AptError with a hint when apt-get / apt-cache are not on PATH."""
    for tool in ("apt-get", "apt-cache"):
        if shutil.which(tool) is None:
            raise AptError(NO_APT_HINT)


def _run(args: list[str]) -> str:
    proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise AptError(f"{' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def candidate_version(package: str) -> str:
    """The version apt would install for *package*; AptError when it has none."""
    require_apt()
    out = _run(["apt-cache", "policy", package])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                return version
    raise AptError(
        f"apt knows no installable version of {package!r}; run 'apt-get update' "
        "(and check that Debian's main archive is in the apt sources)")


def depends(package: str) -> list[str]:
    """Direct hard dependencies of *package* (first alternative of each).

    Virtual packages (shown as ``<name>``) are skipped: the builders only follow
    library packages, which are always real.
    """
    out = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts",
                "--no-breaks", "--no-replaces", "--no-enhances", package])
    deps, skip_alt = [], False
    for line in out.splitlines():
        stripped = line.strip()
        if stripped.startswith(("Depends:", "PreDepends:", "|Depends:", "|PreDepends:")):
            name = stripped.split(":", 1)[1].strip()
            if not skip_alt and not name.startswith("<"):
                deps.append(name.split(":")[0])
            # "|Depends" introduces alternatives: keep the first, drop the rest.
            skip_alt = stripped.startswith("|")
    return deps


def resolve_kernel_package(meta: str) -> str:
    """Map a meta package (``linux-image-cloud-amd64``) to the versioned image package."""
    for dep in depends(meta):
        if dep.startswith("linux-image-"):
            return dep
    raise AptError(f"{meta} depends on no linux-image package")


def download(packages: list[str], cache_dir: str, progress: Progress = lambda s: None) -> dict[str, str]:
    """Download *packages* into *cache_dir* unless already there; return name -> .deb path.

    A package already cached at apt's candidate version is not fetched again,
    which makes a second guest build an offline no-op.
    """
    require_apt()
    os.makedirs(cache_dir, exist_ok=True)
    paths, missing = {}, []
    for pkg in packages:
        version = candidate_version(pkg)
        # apt names files name_version_arch.deb with ':' in the epoch escaped.
        pattern = os.path.join(cache_dir, f"{pkg}_{version.replace(':', '%3a')}_*.deb")
        found = glob.glob(pattern)
        if found:
            paths[pkg] = found[0]
        else:
            missing.append((pkg, pattern))
    if missing:
        progress(f"downloading {', '.join(p for p, _ in missing)}")
        proc = subprocess.run(["apt-get", "download", "-q"] + [p for p, _ in missing],
                              cwd=cache_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise AptError(f"apt-get download {' '.join(p for p, _ in missing)} failed:\n{proc.stdout.strip()}")
        for pkg, pattern in missing:
            found = glob.glob(pattern)
            if not found:
                raise AptError(f"apt-get download gave no file for {pkg} (looked for {os.path.basename(pattern)})")
            paths[pkg] = found[0]
    return paths
