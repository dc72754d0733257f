"""`VMMKIT_EXIT_STATS=1 vmmkit run ...`: count the vCPU exits that reach Python, per port and address.

A debugging aid for device authors and for boot-time work: every exit to
Python costs a KVM_RUN round trip plus interpreter time, so the table says
which device accesses are worth an ioeventfd, a batched interface or a
native path. Printed to stderr when the process exits.
"""

from __future__ import annotations

import atexit
import collections
import sys
import threading
import time

_counts: collections.Counter = collections.Counter()
_seconds: collections.Counter = collections.Counter()
_lock = threading.Lock()


def counting(index: int, pio_read, pio_write, mmio_read, mmio_write):
    """Wrap the bus accessors of vCPU *index* so that each call is counted and timed."""
    if not _counts:
        atexit.register(report)

    def wrap(kind, fn):
        def counted(addr, arg):
            t0 = time.perf_counter()
            try:
                return fn(addr, arg)
            finally:
                key = (kind, addr)
                with _lock:
                    _counts[key] += 1
                    _seconds[key] += time.perf_counter() - t0
        return counted
    return wrap("pio-in", pio_read), wrap("pio-out", pio_write), wrap("mmio-read", mmio_read), wrap("mmio-write", mmio_write)


def report(file=sys.stderr) -> None:
    """Print the busiest exits first."""
    total = sum(_counts.values())
    print(f"vmmkit exit stats: {total} exits to Python, {sum(_seconds.values()):.3f}s in device handlers", file=file)
    for (kind, addr), n in _counts.most_common(25):
        print(f"  {kind:10} {addr:#10x} {n:8} {_seconds[(kind, addr)] * 1e3:9.1f} ms", file=file)
