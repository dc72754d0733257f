"""/dev/kvm: the KVM system object."""

from __future__ import annotations

import errno
import os

from .._native import ffi, lib
from ..errors import VmmkitError
from ..hostkvm import kvm_status


class KvmError(VmmkitError):
    """A KVM call failed; the message names the call and the reason."""


def check(ret: int, what: str) -> int:
    """Turn a ``-errno`` return of the native wrappers into KvmError."""
    if ret < 0:
        raise KvmError(f"{what} failed: {os.strerror(-ret)} (errno {-ret})")
    return ret


class Kvm:
    """An open /dev/kvm. Refuses hosts whose KVM cannot boot a stock kernel (PVM), saying why."""

    API_VERSION = 12

    def __init__(self, path: str = "/dev/kvm", *, allow_pvm: bool = False):
        status = kvm_status(path)
        if not status.usable and not (allow_pvm and status.kind == "pvm"):
            raise KvmError(f"cannot run a guest here: {status.reason}")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(f"cannot open {path}: {exc.strerror}") from None
        version = check(lib.vmm_ioctl_val(self.fd, lib.KVM_GET_API_VERSION, 0), "KVM_GET_API_VERSION")
        if version != self.API_VERSION:
            raise KvmError(f"{path} speaks KVM API {version}, vmmkit needs {self.API_VERSION}")
        for cap, name in ((lib.KVM_CAP_IRQCHIP, "in-kernel irqchip"), (lib.KVM_CAP_USER_MEMORY, "user memory"),
                          (lib.KVM_CAP_IRQFD, "irqfd"), (lib.KVM_CAP_IOEVENTFD, "ioeventfd"),
                          (lib.KVM_CAP_IMMEDIATE_EXIT, "immediate exit"), (lib.KVM_CAP_EXT_CPUID, "CPUID2")):
            if self.check_extension(cap) <= 0:
                raise KvmError(f"this host's KVM lacks {name}, which vmmkit needs")
        self.vcpu_mmap_size = check(lib.vmm_ioctl_val(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0), "KVM_GET_VCPU_MMAP_SIZE")

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when unsupported, else a capability-specific value."""
        return max(0, lib.vmm_ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap))

    def max_vcpus(self) -> int:
        """The most vCPUs one VM may have on this host."""
        return self.check_extension(lib.KVM_CAP_MAX_VCPUS) or 4

    def supported_cpuid(self) -> list[dict]:
        """KVM_GET_SUPPORTED_CPUID as a list of entry dicts (function, index, flags, eax..edx)."""
        n = 256
        while True:
            cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
            cpuid.nent = n
            ret = lib.vmm_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, cpuid)
            if ret == -errno.E2BIG and n < 4096:
                n *= 2
                continue
            check(ret, "KVM_GET_SUPPORTED_CPUID")
            return [{k: getattr(cpuid.entries[i], k) for k in ("function", "index", "flags", "eax", "ebx", "ecx", "edx")}
                    for i in range(cpuid.nent)]

    def create_vm(self):
        """A new VM (see KvmVm)."""
        from .vm import KvmVm
        return KvmVm(self)

    def close(self) -> None:
        """Close /dev/kvm (VMs keep their own fds)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
