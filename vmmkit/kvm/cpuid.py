"""Per-vCPU CPUID from what KVM supports: APIC ids, topology, and the hypervisor bits.

Every vCPU gets KVM_GET_SUPPORTED_CPUID with its own initial APIC id filled in
and a flat topology (one socket, N cores, one thread each), so the guest's
view agrees with the MADT (APIC id = vCPU index).
"""

from __future__ import annotations

LEAF1_ECX_TSC_DEADLINE = 1 << 24
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_HTT = 1 << 28


def _bits_for(count: int) -> int:
    """Bits needed to number *count* items (the APIC-id shift of a topology level)."""
    return max(0, (count - 1).bit_length())


def vcpu_cpuid(supported: list[dict], index: int, vcpus: int) -> list[dict]:
    """The CPUID entries for vCPU *index* of *vcpus*."""
    out = []
    for entry in supported:
        e = dict(entry)
        fn, sub = e["function"], e["index"]
        if fn == 1:
            # Initial APIC id, and the logical processor count of the package.
            e["ebx"] = (e["ebx"] & 0x0000FFFF) | (index << 24) | (min(vcpus, 255) << 16)
            e["ecx"] |= LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE
            e["edx"] = e["edx"] | LEAF1_EDX_HTT if vcpus > 1 else e["edx"] & ~LEAF1_EDX_HTT
        elif fn in (0xB, 0x1F):
            # Extended topology: level 0 = thread (1 per core), level 1 = core.
            if sub == 0:
                e["eax"], e["ebx"], e["ecx"] = 0, 1, (1 << 8) | sub
            elif sub == 1:
                e["eax"], e["ebx"], e["ecx"] = _bits_for(vcpus), vcpus, (2 << 8) | sub
            else:
                e["eax"], e["ebx"], e["ecx"] = 0, 0, sub
            e["edx"] = index
        elif fn == 4:
            # Intel deterministic cache parameters: cores per package in EAX[31:26].
            e["eax"] = (e["eax"] & 0x03FFFFFF) | ((min(vcpus, 64) - 1) << 26)
        elif fn == 0x80000008:
            # AMD: number of cores minus one in ECX[7:0], APIC id size in ECX[15:12].
            e["ecx"] = (e["ecx"] & ~0xF0FF) | ((vcpus - 1) & 0xFF) | (_bits_for(vcpus) << 12)
        elif fn == 0x8000001E:
            # AMD extended APIC id / core id, one thread per core.
            e["eax"] = index
            e["ebx"] = (e["ebx"] & ~0xFFFF) | (index & 0xFF)
            e["ecx"] = e["ecx"] & ~0x7FF
        out.append(e)
    return out
