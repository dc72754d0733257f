"""What the host's /dev/kvm can do: hardware KVM, PVM, or nothing.

A PVM host (the ``kvm_pvm`` module: KVM without hardware virtualization)
creates VMs but runs only PVM-enlightened guest kernels; a stock kernel spins
forever in its decompressor. vmmkit checks this up front and points at
``vmmkit lab`` instead of hanging.
"""

from __future__ import annotations

import os

import attrs


@attrs.frozen
class KvmStatus:
    """The verdict on the host's KVM: ``usable`` means a stock kernel can boot."""

    usable: bool
    kind: str       # "hardware", "pvm", "missing", "denied", "no-virt"
    reason: str


def _cpu_flags(root: str = "/") -> set[str]:
    try:
        with open(os.path.join(root, "proc/cpuinfo")) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def kvm_status(dev: str = "/dev/kvm", *, root: str = "/") -> KvmStatus:
    """Tell whether this host's KVM can boot a stock Linux kernel, and why not.

    *root* lets tests point /sys and /proc at a fake tree.
    """
    lab = "run it inside the KVM lab instead: vmmkit lab -- <command>"
    if os.path.exists(os.path.join(root, "sys/module/kvm_pvm")):
        return KvmStatus(False, "pvm",
                         f"{dev} is PVM (the kvm_pvm module: KVM without hardware virtualization), "
                         f"which runs only PVM-enlightened guest kernels, not a stock kernel; {lab}")
    if not os.path.exists(dev):
        return KvmStatus(False, "missing", f"{dev} does not exist (is the kvm_intel or kvm_amd module loaded?); {lab}")
    if not os.access(dev, os.R_OK | os.W_OK):
        return KvmStatus(False, "denied", f"{dev} is not readable and writable by this user "
                         "(add yourself to the 'kvm' group, or run as root)")
    if not ({"vmx", "svm"} & _cpu_flags(root)):
        return KvmStatus(False, "no-virt", f"this CPU shows no vmx or svm flag, so {dev} cannot run a stock kernel; {lab}")
    return KvmStatus(True, "hardware", "hardware KVM")


def in_lab() -> bool:
    """True inside `vmmkit lab` (the lab's /init exports VMMKIT_IN_LAB)."""
    return os.environ.get("VMMKIT_IN_LAB") == "1"
