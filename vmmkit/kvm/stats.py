"""KVM's binary statistics (KVM_GET_STATS_FD), and what they tell devices about the guest's vCPUs.

Since Linux 5.14 a VM or vCPU file descriptor hands out a read-only file of
counters: a header, one descriptor per statistic (its name and where its
value is), and the values, read with ``pread`` at any time. A device loop in
C uses two of each vCPU's: ``blocking`` (the vCPU is halted, waiting for an
interrupt) and ``halt_exits``. Together they say whether the guest is busy
or waiting, which decides whether an interrupt is worth raising at once
(see ``native/virtio_serve.c``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from typing import Dict, List, Optional

from .._native import ffi

log = logging.getLogger("vmmkit.kvm")

#: _IO(KVMIO, 0xce), <linux/kvm.h>.
KVM_GET_STATS_FD = 0xAECE
# struct kvm_stats_header: flags, name_size, num_desc, id_offset, desc_offset, data_offset.
_HEADER = struct.Struct("<IIIIII")
# struct kvm_stats_desc, before its name: flags, exponent, size, offset, bucket_size.
_DESC = struct.Struct("<IhHII")


class KvmStats:
    """One KVM statistics file: its values by name, at offsets that stay fixed for the file's life."""

    def __init__(self, stats_fd: int) -> None:
        """Read the layout of the statistics file *stats_fd* (owned from now on); raises ValueError if malformed."""
        self.fd = stats_fd
        try:
            self.offsets = self._parse()
        except (OSError, ValueError, struct.error):
            os.close(self.fd)
            raise

    @classmethod
    def open(cls, kvm_fd: int) -> "KvmStats":
        """The statistics of the VM or vCPU behind *kvm_fd*; raises OSError where the kernel has none."""
        return cls(fcntl.ioctl(kvm_fd, KVM_GET_STATS_FD))

    def _parse(self) -> Dict[str, int]:
        _flags, name_size, count, _id_off, desc_off, data_off = _HEADER.unpack(os.pread(self.fd, _HEADER.size, 0))
        if not 0 < name_size <= 4096 or count > 65536:
            raise ValueError(f"implausible KVM statistics header: name size {name_size}, {count} entries")
        size = _DESC.size + name_size
        table = os.pread(self.fd, size * count, desc_off)
        offsets = {}
        for i in range(count):
            entry = table[i * size:(i + 1) * size]
            _f, _e, _n, offset, _b = _DESC.unpack_from(entry)
            name = entry[_DESC.size:].split(b"\0", 1)[0].decode()
            offsets[name] = data_off + offset
        return offsets

    def read(self, name: str) -> int:
        """The current value of statistic *name* (its first word, for a histogram)."""
        return struct.unpack("<Q", os.pread(self.fd, 8, self.offsets[name]))[0]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VcpuActivity:
    """Where C code can see whether the guest's vCPUs run or wait: each vCPU's statistics file.

    The VM makes one before its devices and adds each vCPU as it creates it;
    devices get it through their :class:`~vmmkit.virtio.device.NativeInterrupt`.
    Empty (``known`` False) where the kernel lacks the statistics: devices then
    act as if the guest might be waiting.
    """

    NEEDED = ("blocking", "halt_exits")

    def __init__(self) -> None:
        self._stats: List[KvmStats] = []
        self._fds = ffi.new("int32_t[]", 0)
        self.blocking_offset = self.halts_offset = 0
        self._unavailable: Optional[str] = None

    def add(self, vcpu_fd: int) -> None:
        """Take in one more vCPU (its KVM fd); where its statistics cannot be had, the activity stays unknown."""
        if self._unavailable is not None:
            return
        try:
            stats = KvmStats.open(vcpu_fd)
        except (OSError, ValueError, struct.error) as exc:
            self._give_up(f"KVM_GET_STATS_FD: {exc}")
            return
        self.add_stats(stats)

    def add_stats(self, stats: KvmStats) -> None:
        """Take in one more vCPU's statistics file (owned from now on)."""
        if self._unavailable is not None:
            stats.close()
            return
        missing = [n for n in self.NEEDED if n not in stats.offsets]
        offsets = tuple(stats.offsets.get(n, 0) for n in self.NEEDED)
        if missing or (self._stats and offsets != (self.blocking_offset, self.halts_offset)):
            stats.close()
            self._give_up(f"no {', '.join(missing)} statistic" if missing else "vCPU statistics differ in layout")
            return
        self.blocking_offset, self.halts_offset = offsets
        self._stats.append(stats)
        self._fds = ffi.new("int32_t[]", [s.fd for s in self._stats])

    def _give_up(self, why: str) -> None:
        log.debug("vCPU activity unknown (%s): interrupts are not held for a busy guest", why)
        self._unavailable = why
        self.close()

    @property
    def known(self) -> bool:
        return bool(self._stats)

    @property
    def c_fds(self):
        """The vCPUs' statistics fds as a cffi ``int32_t[]`` (kept alive by this object)."""
        return self._fds

    def __len__(self) -> int:
        return len(self._stats)

    def blocking(self) -> List[bool]:
        """Each vCPU's ``blocking`` flag now (for tests and inspection)."""
        return [bool(s.read("blocking")) for s in self._stats]

    def close(self) -> None:
        for s in self._stats:
            s.close()
        self._stats = []
        self._fds = ffi.new("int32_t[]", 0)
