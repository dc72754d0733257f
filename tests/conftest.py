"""Shared test setup. Guest routing (lab or here) comes from vmmkit's pytest plugin."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG_EXAMPLE = os.path.join(ROOT, "examples", "vmmkit-virtio-rng")


@pytest.fixture(scope="session")
def rng_plugin():
    """The example third-party plugin, installed with pip into this environment as a user would.

    Offline (no build isolation, no index), so that it also works inside the KVM lab.
    Returns the example's directory.
    """
    try:
        importlib.metadata.distribution("vmmkit-virtio-rng")
    except importlib.metadata.PackageNotFoundError:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                               "--no-index", RNG_EXAMPLE], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        importlib.invalidate_caches()
    return RNG_EXAMPLE
