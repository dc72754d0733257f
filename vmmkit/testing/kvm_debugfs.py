"""KVM's per-VM counters in debugfs, for guest tests and benchmarks.

KVM counts, for each VM of any VMM, what its vCPUs cost: exits, injected
interrupts, halts, emulated instructions. They are files under
``/sys/kernel/debug/kvm/<pid>-<fd>/``. Reading them needs root and debugfs,
which :func:`unavailable` mounts when it is not yet.

:func:`emulation_livelock` tells a guest that went silent because its vCPU
is caught in KVM's instruction emulator (the KVM lab's emulated CPU can do
that: docs/lab.md) from one that is waiting or running normally.
"""

from __future__ import annotations

import glob
import os
import subprocess
import time
from typing import Dict, Iterable, List, Optional

DEBUGFS = "/sys/kernel/debug"
KVM_DIR = os.path.join(DEBUGFS, "kvm")

#: The words a failure message carries when the guest's vCPU was found caught in KVM's
#: instruction emulator (see :func:`emulation_livelock`).
EMULATION_LIVELOCK = "the guest's vCPU is caught in KVM's instruction emulator"
#: Over the sampled second, at least this many instructions emulated, each with a page fault
#: injected into the guest. A guest running normally with nested paging has KVM inject almost
#: none: its page faults never leave the guest.
LIVELOCK_MIN_EMULATIONS = 1000


def unavailable() -> Optional[str]:
    """None when per-VM counters can be read here (mounting debugfs if needed), else why not."""
    if not os.path.isdir(KVM_DIR):
        try:
            proc = subprocess.run(["mount", "-t", "debugfs", "none", DEBUGFS], capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"cannot mount debugfs at {DEBUGFS}: {exc}"
        if proc.returncode != 0 and not os.path.isdir(KVM_DIR):
            return f"cannot mount debugfs at {DEBUGFS}: {proc.stderr.strip() or proc.returncode}"
    if not os.path.isdir(KVM_DIR):
        return f"{KVM_DIR} is missing (is the kvm module loaded?)"
    return None


def vm_dirs(pid: int) -> List[str]:
    """The debugfs directories of process *pid*'s VMs (a VMM has one)."""
    return glob.glob(os.path.join(KVM_DIR, f"{pid}-*"))


def counters(pid: int, names: Iterable[str]) -> Dict[str, int]:
    """Counters *names* of process *pid*'s VMs, summed over them; 0 for one this kernel lacks.

    Raises RuntimeError when the process has no VM (yet, or any more).
    """
    dirs = vm_dirs(pid)
    if not dirs:
        raise RuntimeError(f"no KVM VM of process {pid} in {KVM_DIR}")
    out = dict.fromkeys(names, 0)
    for d in dirs:
        for name in out:
            try:
                with open(os.path.join(d, name)) as f:
                    out[name] += int(f.read())
            except FileNotFoundError:  # an older kernel without this counter
                pass
    return out


def emulation_livelock(pid: int, seconds: float = 1.0) -> Optional[str]:
    """Whether process *pid*'s guest vCPU is caught in KVM's instruction emulator: a message, else None.

    The sign, over *seconds*: KVM emulated thousands of instructions and
    injected a page fault into the guest with nearly every one. With
    nested paging the guest's own page faults never reach KVM, so this is
    KVM failing to emulate one instruction again and again (in the lab,
    always the same one, with interrupts pending that the guest never
    takes). None too when the counters cannot be read.
    """
    names = ("exits", "insn_emulation", "pf_guest")
    if unavailable() is not None:
        return None
    try:
        before = counters(pid, names)
        time.sleep(seconds)
        after = counters(pid, names)
    except RuntimeError:
        return None
    grew = {k: after[k] - before[k] for k in names}
    emulated, faults = grew["insn_emulation"], grew["pf_guest"]
    if emulated < LIVELOCK_MIN_EMULATIONS * seconds or faults < 0.9 * emulated:
        return None
    return (f"{EMULATION_LIVELOCK}: in {seconds:g}s KVM emulated {emulated} instructions and injected "
            f"{faults} page faults into the guest ({grew['exits']} exits)")
