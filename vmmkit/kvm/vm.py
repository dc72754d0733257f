"""A KVM VM: memory slots, the in-kernel irqchip and PIT, irqfd and ioeventfd."""

from __future__ import annotations

import fcntl
import os
import struct

from .._native import ffi, lib
from ..boot import layout
from .stats import VcpuActivity
from .system import KvmError, check


class FastMmio:
    """MMIO registers that the vCPU threads answer in C, without an exit to Python.

    Each is a 32-bit word in C memory (a cffi ``uint32_t *``) that a read
    returns (``READ32``) or a write clears bits of (``ACK32``): what virtio-MMIO's
    InterruptStatus and InterruptACK need, which the guest touches on every
    interrupt. ``native/kvm_native.c`` (``vmm_run``) looks exits up in
    :attr:`table`; anything else there goes to Python as before. Registers are
    added before the vCPUs run; :attr:`hits` counts the exits answered in C.
    """

    READ32 = lib.VMM_FAST_READ32
    ACK32 = lib.VMM_FAST_ACK32

    def __init__(self) -> None:
        self.table = ffi.new("struct vmm_fast_table *")
        self._entries: list = []
        self._arrays: list = []  # every array ever published: a vCPU in KVM_RUN may still hold an old one

    def add(self, addr: int, word, kind: int) -> None:
        """Answer 4-byte accesses to guest-physical *addr* from *word* (``READ32`` or ``ACK32``)."""
        if kind not in (self.READ32, self.ACK32):
            raise ValueError(f"unknown fast MMIO kind {kind}")
        self._entries.append((addr, word, kind))
        array = ffi.new("struct vmm_fast_mmio[]", len(self._entries))
        for entry, (a, w, k) in zip(array, self._entries):
            entry.addr, entry.word, entry.kind = a, w, k
        self._arrays.append(array)
        self.table.entries, self.table.n = array, len(self._entries)

    @property
    def hits(self) -> int:
        """Exits answered in C so far."""
        return self.table.hits


#: <linux/kvm.h>: the per-VM halt-poll capability (Linux 5.15), and _IOW(KVMIO, 0xa3, struct kvm_enable_cap).
KVM_CAP_HALT_POLL = 182
KVM_ENABLE_CAP = 0x4068AEA3
_ENABLE_CAP = struct.Struct("=II4Q64x")  # cap, flags, args[4], pad[64]


class KvmVm:
    """One KVM VM file descriptor and the VM-wide ioctls vmmkit uses."""

    def __init__(self, kvm):
        self.kvm = kvm
        self.fd = check(lib.vmm_ioctl_val(kvm.fd, lib.KVM_CREATE_VM, 0), "KVM_CREATE_VM")
        self.vcpus = []
        #: Registers the vCPUs answer in C (see :class:`FastMmio`).
        self.fast_mmio = FastMmio()
        #: Whether the vCPUs run or wait, for devices' C loops (see :class:`~vmmkit.kvm.stats.VcpuActivity`).
        self.vcpu_activity = VcpuActivity()

    def setup_x86(self) -> None:
        """TSS and identity-map addresses (needed by Intel), the in-kernel irqchip and PIT."""
        check(lib.vmm_ioctl_val(self.fd, lib.KVM_SET_TSS_ADDR, layout.KVM_TSS_ADDR), "KVM_SET_TSS_ADDR")
        addr = ffi.new("uint64_t *", layout.KVM_IDENTITY_MAP_ADDR)
        check(lib.vmm_ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, addr), "KVM_SET_IDENTITY_MAP_ADDR")
        check(lib.vmm_ioctl_val(self.fd, lib.KVM_CREATE_IRQCHIP, 0), "KVM_CREATE_IRQCHIP")
        pit = ffi.new("struct kvm_pit_config *")
        pit.flags = lib.KVM_PIT_SPEAKER_DUMMY
        check(lib.vmm_ioctl(self.fd, lib.KVM_CREATE_PIT2, pit), "KVM_CREATE_PIT2")

    def set_halt_poll_ns(self, ns: int) -> None:
        """Let KVM poll up to *ns* nanoseconds for a wake-up before a halted vCPU of this VM sleeps.

        Replaces the kvm module's halt_poll_ns for this VM only (KVM still
        grows and shrinks each vCPU's window within it); 0 turns polling off.
        Raises KvmError where KVM lacks KVM_CAP_HALT_POLL.
        """
        if lib.vmm_ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, KVM_CAP_HALT_POLL) <= 0:
            raise KvmError("this host's KVM cannot set a VM's halt polling (KVM_CAP_HALT_POLL, Linux 5.15 or later)")
        try:
            fcntl.ioctl(self.fd, KVM_ENABLE_CAP, _ENABLE_CAP.pack(KVM_CAP_HALT_POLL, 0, ns, 0, 0, 0))
        except OSError as exc:
            raise KvmError(f"KVM_ENABLE_CAP(KVM_CAP_HALT_POLL, {ns}): {exc.strerror}") from None

    def set_user_memory_region(self, slot: int, flags: int, gpa: int, size: int, host_addr: int) -> None:
        """Map (or with size 0, unmap) a slot of guest memory."""
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot, region.flags = slot, flags
        region.guest_phys_addr, region.memory_size, region.userspace_addr = gpa, size, host_addr
        check(lib.vmm_ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region), f"KVM_SET_USER_MEMORY_REGION slot {slot}")

    def get_dirty_log(self, slot: int, npages: int) -> bytes:
        """The guest-written pages of *slot* since the last call (one bit per page, 64-bit words)."""
        size = ((npages + 63) // 64) * 8
        bitmap = ffi.new("uint8_t[]", size)
        log = ffi.new("struct kvm_dirty_log *")
        log.slot = slot
        log.dirty_bitmap = bitmap
        check(lib.vmm_ioctl(self.fd, lib.KVM_GET_DIRTY_LOG, log), f"KVM_GET_DIRTY_LOG slot {slot}")
        return bytes(ffi.buffer(bitmap, size))

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        """Let writes to eventfd *fd* inject an edge on *gsi* without leaving the kernel."""
        arg = ffi.new("struct kvm_irqfd *")
        arg.fd, arg.gsi = fd, gsi
        arg.flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        check(lib.vmm_ioctl(self.fd, lib.KVM_IRQFD, arg), f"KVM_IRQFD gsi {gsi}")

    def ioeventfd(self, fd: int, addr: int, length: int, *, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        """Turn guest writes to *addr* into eventfd signals, handled without a vCPU exit to userspace."""
        arg = ffi.new("struct kvm_ioeventfd *")
        arg.addr, arg.len, arg.fd = addr, length, fd
        flags = 0
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
            arg.datamatch = datamatch
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        arg.flags = flags
        check(lib.vmm_ioctl(self.fd, lib.KVM_IOEVENTFD, arg), f"KVM_IOEVENTFD {addr:#x}")

    def irq_line(self, gsi: int, level: int) -> None:
        """Set an interrupt line's level (KVM_IRQ_LINE)."""
        arg = ffi.new("struct kvm_irq_level *")
        arg.irq, arg.level = gsi, level
        check(lib.vmm_ioctl(self.fd, lib.KVM_IRQ_LINE, arg), f"KVM_IRQ_LINE {gsi}")

    def create_vcpu(self, index: int):
        """A new vCPU with APIC id *index*."""
        from .vcpu import Vcpu
        vcpu = Vcpu(self, index)
        self.vcpus.append(vcpu)
        self.vcpu_activity.add(vcpu.fd)
        return vcpu

    def close(self) -> None:
        """Close the VM and its vCPUs."""
        self.vcpu_activity.close()
        for vcpu in self.vcpus:
            vcpu.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class EventFd:
    """A non-blocking eventfd, used with irqfd and ioeventfd."""

    def __init__(self):
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self) -> int:
        """The descriptor, so an EventFd can be polled directly."""
        return self.fd

    def signal(self) -> None:
        """Add one to the counter (for an irqfd: inject an interrupt)."""
        os.eventfd_write(self.fd, 1)

    def drain(self) -> int:
        """Read and reset the counter; 0 when it was not signalled."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        """Close the descriptor (once)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


__all__ = ["KvmVm", "EventFd", "KvmError"]
