"""A KVM vCPU: registers, CPUID, MSRs, LAPIC, and KVM_RUN with decoded exits."""

from __future__ import annotations

import errno
import mmap
import os
import struct

from .._native import ffi, lib
from .system import check

# MSRs Linux expects a firmware to have set on the boot CPU.
MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1 << 0
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE_WRITEBACK = (1 << 11) | 6

# LAPIC registers (offsets in the 1 KiB kvm_lapic_state).
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_EXTINT = 0x7
APIC_MODE_NMI = 0x4

SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")

KVM_MP_STATE_HALTED = 3
RFLAGS_IF = 1 << 9
APIC_TPR = 0x80
APIC_ISR = 0x100  # eight 32-bit words, 16 bytes apart; IRR the same from 0x200
APIC_IRR = 0x200


def _apic_vectors(regs: bytes, base: int) -> list[int]:
    """The vectors set in a 256-bit LAPIC register (ISR or IRR)."""
    out = []
    for word in range(8):
        value, = struct.unpack_from("<I", regs, base + 16 * word)
        out.extend(32 * word + bit for bit in range(32) if value >> bit & 1)
    return out


class Vcpu:
    """One vCPU. Its methods are called only from its own thread, except kick()."""

    def __init__(self, vm, index: int):
        self.vm = vm
        self.index = index
        self.fd = check(lib.vmm_ioctl_val(vm.fd, lib.KVM_CREATE_VCPU, index), f"KVM_CREATE_VCPU {index}")
        self.run_map = mmap.mmap(self.fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_ptr = ffi.cast("struct kvm_run *", ffi.from_buffer(self.run_map))
        self._exit = ffi.new("struct vmm_exit *")
        self._fast = vm.fast_mmio.table

    # --- registers ---
    def set_regs(self, values: dict) -> None:
        """KVM_SET_REGS from a dict of kvm_regs field names (others zero)."""
        regs = ffi.new("struct kvm_regs *")
        for key, value in values.items():
            setattr(regs, key, value)
        check(lib.vmm_ioctl(self.fd, lib.KVM_SET_REGS, regs), "KVM_SET_REGS")

    def get_regs(self) -> dict:
        """KVM_GET_REGS as a dict."""
        regs = ffi.new("struct kvm_regs *")
        check(lib.vmm_ioctl(self.fd, lib.KVM_GET_REGS, regs), "KVM_GET_REGS")
        return {name: getattr(regs, name) for name, _ in ffi.typeof("struct kvm_regs").fields}

    def set_sregs(self, values: dict) -> None:
        """Read-modify-write the special registers, keeping apic_base and the interrupt bitmap."""
        sregs = ffi.new("struct kvm_sregs *")
        check(lib.vmm_ioctl(self.fd, lib.KVM_GET_SREGS, sregs), "KVM_GET_SREGS")
        for key, value in values.items():
            if key in SEGMENTS:
                seg = getattr(sregs, key)
                for field, v in value.items():
                    setattr(seg, field, v)
            elif key in ("gdt", "idt"):
                table = getattr(sregs, key)
                table.base, table.limit = value["base"], value["limit"]
            else:
                setattr(sregs, key, value)
        check(lib.vmm_ioctl(self.fd, lib.KVM_SET_SREGS, sregs), "KVM_SET_SREGS")

    def setup_fpu(self) -> None:
        """The x87/SSE state a firmware leaves: default control word and MXCSR."""
        fpu = ffi.new("struct kvm_fpu *")
        fpu.fcw = 0x37F
        fpu.mxcsr = 0x1F80
        check(lib.vmm_ioctl(self.fd, lib.KVM_SET_FPU, fpu), "KVM_SET_FPU")

    def set_cpuid(self, entries: list[dict]) -> None:
        """KVM_SET_CPUID2 (must precede SET_SREGS: long mode needs the LM bit)."""
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        cpuid.nent = len(entries)
        for i, entry in enumerate(entries):
            for key, value in entry.items():
                setattr(cpuid.entries[i], key, value)
        check(lib.vmm_ioctl(self.fd, lib.KVM_SET_CPUID2, cpuid), "KVM_SET_CPUID2")

    def set_msrs(self, values: dict[int, int]) -> None:
        """KVM_SET_MSRS; all must be accepted."""
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(values), "entries": len(values)})
        msrs.nmsrs = len(values)
        for i, (index, data) in enumerate(values.items()):
            msrs.entries[i].index = index
            msrs.entries[i].data = data
        done = check(lib.vmm_ioctl(self.fd, lib.KVM_SET_MSRS, msrs), "KVM_SET_MSRS")
        if done != len(values):
            bad = list(values)[done]
            check(-errno.EINVAL, f"KVM_SET_MSRS (MSR {bad:#x} refused)")

    def setup_lapic_lint(self) -> None:
        """LINT0 as ExtINT and LINT1 as NMI, as a BIOS programs them (virtual wire mode)."""
        lapic = ffi.new("struct kvm_lapic_state *")
        check(lib.vmm_ioctl(self.fd, lib.KVM_GET_LAPIC, lapic), "KVM_GET_LAPIC")
        buf = ffi.buffer(lapic.regs)
        for reg, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
            value, = struct.unpack_from("<I", buf, reg)
            value = (value & ~0x700) | (mode << 8)
            struct.pack_into("<I", buf, reg, value)
        check(lib.vmm_ioctl(self.fd, lib.KVM_SET_LAPIC, lapic), "KVM_SET_LAPIC")

    def inspect(self) -> dict:
        """Where the vCPU is and what interrupts wait for it, for finding out why a guest hangs.

        Only while the vCPU is out of KVM_RUN (a paused VM). ``halted``: in
        HLT, waiting for an interrupt; ``cr2``: the address of the guest's
        last page fault; ``lapic_irr`` / ``lapic_isr``: the vectors pending
        and in service at its local APIC.
        """
        regs = self.get_regs()
        sregs = ffi.new("struct kvm_sregs *")
        check(lib.vmm_ioctl(self.fd, lib.KVM_GET_SREGS, sregs), "KVM_GET_SREGS")
        mp_state = ffi.new("struct kvm_mp_state *")
        check(lib.vmm_ioctl(self.fd, lib.KVM_GET_MP_STATE, mp_state), "KVM_GET_MP_STATE")
        lapic = ffi.new("struct kvm_lapic_state *")
        check(lib.vmm_ioctl(self.fd, lib.KVM_GET_LAPIC, lapic), "KVM_GET_LAPIC")
        apic = bytes(ffi.buffer(lapic.regs))
        return {
            "index": self.index,
            "rip": regs["rip"], "rsp": regs["rsp"], "rflags": regs["rflags"],
            "interrupts_enabled": bool(regs["rflags"] & RFLAGS_IF),
            "cs": sregs.cs.selector, "cr0": sregs.cr0, "cr2": sregs.cr2, "cr3": sregs.cr3, "cr4": sregs.cr4,
            "efer": sregs.efer,
            "halted": mp_state.mp_state == KVM_MP_STATE_HALTED,
            "lapic_tpr": struct.unpack_from("<I", apic, APIC_TPR)[0],
            "lapic_irr": _apic_vectors(apic, APIC_IRR),
            "lapic_isr": _apic_vectors(apic, APIC_ISR),
        }

    # --- running ---
    def run(self):
        """One KVM_RUN. Returns the decoded exit, or None when interrupted by a kick (EINTR).

        The exit is this vCPU's ``struct vmm_exit`` (see native/kvm_native.c),
        reused by every call: read it before the next run(). No object is
        built per exit, as this is the vCPU's hot path. Accesses to the VM's
        :class:`~vmmkit.kvm.vm.FastMmio` registers are answered in C and
        never come back here.
        """
        ret = lib.vmm_run(self.fd, self.run_ptr, self._exit, self._fast)
        if ret == -errno.EINTR or ret == -errno.EAGAIN:
            lib.vmm_set_immediate_exit(self.run_ptr, 0)
            return None
        check(ret, "KVM_RUN")
        return self._exit

    def mmio_write_data(self) -> bytes:
        """The bytes of the current MMIO write exit."""
        return bytes(ffi.buffer(self._exit.mmio_data, self._exit.mmio_len))

    def set_mmio_data(self, data: bytes) -> None:
        """The answer to an MMIO read exit, for the next KVM_RUN."""
        lib.vmm_set_mmio_data(self.run_ptr, data, len(data))

    def request_exit(self) -> None:
        """Make the next (or current, with a signal) KVM_RUN return at once."""
        lib.vmm_set_immediate_exit(self.run_ptr, 1)

    def close(self) -> None:
        """Unmap kvm_run and close the vCPU fd."""
        if self.fd >= 0:
            self.run_ptr = None
            try:
                self.run_map.close()
            except BufferError:
                pass  # a cffi buffer still references it; the fd close below frees KVM's side
            os.close(self.fd)
            self.fd = -1
