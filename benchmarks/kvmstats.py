"""KVM's own per-VM counters, read at moments the guest marks: what each VMM costs the guest per request.

In an emulated lab the guest's CPU is the bottleneck, so what a VMM makes the
guest pay (exits, injected interrupts, halts and wake-ups) decides its speed
more than its own copying does. KVM counts these per VM, for any VMM, in
debugfs (``/sys/kernel/debug/kvm/<pid>-<fd>/``). A guest command prints
``@@kvm <label>`` lines; :class:`MarkWatcher` reads the counters of the VM
when each such line arrives, so a benchmark can give both VMMs' counts for
the same stretch of guest work (one fio job, one transfer).

Reading them needs root and debugfs (mounted here when it is not yet).

Each reading also carries the VMM process's CPU time from /proc
(:data:`CPU_FIELDS`): time in guest mode, the rest of its vCPU threads'
time (KVM handling exits, and the VMM's own exit handlers), and its other
threads' time. Whether the guest's vCPU is saturated says whether a device
can go faster at all, or only cost the guest less.
"""

from __future__ import annotations

import glob
import os
import time
from typing import Callable, Dict, Optional

from vmmkit.testing import kvm_debugfs

#: The counters we report, in table order.
FIELDS = ("exits", "mmio_exits", "io_exits", "irq_injections", "halt_exits", "halt_wakeup",
          "halt_successful_poll", "irq_window_exits")
#: Column headings of the counters in the benchmarks' tables.
LABELS = {"exits": "exits", "mmio_exits": "mmio", "io_exits": "pio", "irq_injections": "irqs",
          "halt_exits": "halts", "halt_wakeup": "wakeups", "halt_successful_poll": "polled",
          "irq_window_exits": "irqwin"}
#: The VMM's CPU time in each reading, in milliseconds: wall clock, guest mode, the rest of the
#: vCPU threads (the threads that ran guest code), every other thread.
CPU_FIELDS = ("wall_ms", "guest_ms", "vcpu_host_ms", "vmm_ms")
#: The line prefix a guest prints to have the counters read (then a label, then anything).
MARK = b"@@kvm "

Counters = Dict[str, int]


def available() -> Optional[str]:
    """None when per-VM counters can be read here (mounting debugfs if needed), else why not."""
    return kvm_debugfs.unavailable()


def thread_times(stat: str) -> tuple[int, int]:
    """(CPU ticks, of which in guest mode) from one /proc/<pid>/task/<tid>/stat line."""
    # Fields after the parenthesised name (which may hold spaces): utime and stime are
    # fields 14 and 15 of the line, guest_time field 43; utime includes guest_time.
    f = stat[stat.rindex(")") + 2:].split()
    return int(f[11]) + int(f[12]), int(f[40])


def cpu_times(pid: int) -> Counters:
    """Process *pid*'s CPU time so far, as :data:`CPU_FIELDS` (threads that ended since are not counted)."""
    tick = 1000 / os.sysconf("SC_CLK_TCK")
    guest = vcpu = other = 0
    for path in glob.glob(f"/proc/{pid}/task/*/stat"):
        try:
            with open(path) as f:
                total, in_guest = thread_times(f.read())
        except (OSError, ValueError, IndexError):  # the thread ended meanwhile
            continue
        if in_guest:
            guest += in_guest
            vcpu += total - in_guest
        else:
            other += total
    return {"wall_ms": int(time.monotonic() * 1000), "guest_ms": int(guest * tick),
            "vcpu_host_ms": int(vcpu * tick), "vmm_ms": int(other * tick)}


def read(pid: int) -> Counters:
    """The counters of process *pid*'s VMs (summed over them; a VMM has one), and its :func:`cpu_times`."""
    out = kvm_debugfs.counters(pid, FIELDS)
    out.update(cpu_times(pid))
    return out


def delta(after: Counters, before: Counters) -> Counters:
    """What each counter (and CPU time, where both readings have it) grew by."""
    return {k: after[k] - before[k] for k in (*FIELDS, *CPU_FIELDS) if k in after and k in before}


def busy(d: Counters) -> tuple[float, float]:
    """From a :func:`delta`: the share of one CPU the vCPU threads used, and the other threads' share."""
    wall = max(d["wall_ms"], 1)
    return (d["guest_ms"] + d["vcpu_host_ms"]) / wall, d["vmm_ms"] / wall


class MarkWatcher:
    """A file-like sink for a guest command's output that reads the VM's counters at each ``@@kvm`` line.

    *pid* is the VMM's process id (set later through :attr:`pid` when it is
    not known at creation). Everything is forwarded to *out*; :attr:`marks`
    maps each label to ``(counters, rest of the line)``. With *reader* None
    the marks are passed over (counters cannot be read here).
    """

    def __init__(self, out=None, pid: Optional[int] = None,
                 reader: Optional[Callable[[int], Counters]] = read) -> None:
        self.out = out
        self.pid = pid
        self.marks: Dict[str, tuple] = {}
        self._reader = reader
        self._line = b""

    def write(self, data: bytes) -> int:
        if self.out is not None:
            self.out.write(data)
        self._line += data
        *lines, self._line = self._line.split(b"\n")
        for line in lines:
            line = line.rstrip(b"\r")
            if line.startswith(MARK) and self.pid is not None and self._reader is not None:
                label, _, rest = line[len(MARK):].decode(errors="replace").partition(" ")
                self.marks[label] = (self._reader(self.pid), rest)
        return len(data)

    def flush(self) -> None:
        pass
