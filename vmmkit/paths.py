"""Where vmmkit keeps what it builds and downloads."""

from __future__ import annotations

import os


def cache_dir() -> str:
    """vmmkit's cache: $VMMKIT_CACHE, else $XDG_CACHE_HOME/vmmkit, else ~/.cache/vmmkit."""
    explicit = os.environ.get("VMMKIT_CACHE")
    if explicit:
        return os.path.abspath(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vmmkit")


def debs_dir() -> str:
    """Downloaded .deb files, shared by the guest and lab builders."""
    return os.path.join(cache_dir(), "debs")
