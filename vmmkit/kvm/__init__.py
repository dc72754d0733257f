"""KVM through cffi: the system (/dev/kvm), VMs and vCPUs.

Struct layouts and ioctl numbers come from <linux/kvm.h> via the compiled
``vmmkit._native`` module; every ioctl call releases the GIL.
"""

from .system import Kvm, KvmError
from .vcpu import Vcpu
from .vm import KvmVm

__all__ = ["Kvm", "KvmError", "KvmVm", "Vcpu"]
