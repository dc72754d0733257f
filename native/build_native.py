"""cffi build script for vmmkit._native: KVM structures, ioctl numbers and the vCPU exit decoder.

API mode: the C compiler reads <linux/kvm.h>, so struct layouts and ioctl
numbers come from the kernel headers rather than being written out by hand.
Run by setuptools at install time (``cffi_modules`` in setup.py).
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = r"""
struct kvm_regs { uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags; };
struct kvm_segment { uint64_t base; uint32_t limit; uint16_t selector; uint8_t type, present, dpl, db, s, l, g, avl, unusable; ...; };
struct kvm_dtable { uint64_t base; uint16_t limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    uint64_t interrupt_bitmap[...];
};
struct kvm_fpu { uint8_t fpr[8][16]; uint16_t fcw; uint16_t fsw; uint8_t ftwx; uint16_t last_opcode; uint64_t last_ip; uint64_t last_dp; uint8_t xmm[16][16]; uint32_t mxcsr; ...; };
struct kvm_cpuid_entry2 { uint32_t function, index, flags, eax, ebx, ecx, edx; ...; };
struct kvm_cpuid2 { uint32_t nent; struct kvm_cpuid_entry2 entries[]; ...; };
struct kvm_msr_entry { uint32_t index; uint64_t data; ...; };
struct kvm_msrs { uint32_t nmsrs; struct kvm_msr_entry entries[]; ...; };
struct kvm_msr_list { uint32_t nmsrs; uint32_t indices[]; };
struct kvm_userspace_memory_region { uint32_t slot, flags; uint64_t guest_phys_addr, memory_size, userspace_addr; };
struct kvm_irqfd { uint32_t fd, gsi, flags, resamplefd; ...; };
struct kvm_ioeventfd { uint64_t datamatch, addr; uint32_t len; int32_t fd; uint32_t flags; ...; };
struct kvm_pit_config { uint32_t flags; ...; };
struct kvm_irq_level { uint32_t irq; uint32_t level; ...; };
struct kvm_dirty_log { uint32_t slot; void *dirty_bitmap; ...; };
struct kvm_lapic_state { char regs[...]; };
struct kvm_mp_state { uint32_t mp_state; };
struct kvm_run;

struct vmm_exit {
    uint32_t reason; uint8_t io_direction; uint8_t io_size; uint16_t io_port; uint32_t io_count;
    uint64_t io_data_offset; uint64_t mmio_phys_addr; uint32_t mmio_len; uint8_t mmio_is_write;
    uint8_t mmio_data[8]; uint32_t system_event_type; uint64_t hw_reason; uint32_t internal_suberror;
};

long vmm_ioctl(int fd, unsigned long request, void *arg);
long vmm_ioctl_val(int fd, unsigned long request, unsigned long arg);
int vmm_run(int fd, struct kvm_run *run, struct vmm_exit *out);
void vmm_set_mmio_data(struct kvm_run *run, const uint8_t *data, uint32_t len);
void vmm_set_immediate_exit(struct kvm_run *run, uint8_t value);
void vmm_mb(void);
int vmm_fallocate(int fd, int mode, int64_t offset, int64_t len);
"""

CONSTANTS = """
KVM_API_VERSION KVM_GET_API_VERSION KVM_CREATE_VM KVM_GET_VCPU_MMAP_SIZE KVM_CHECK_EXTENSION
KVM_GET_SUPPORTED_CPUID KVM_GET_MSR_INDEX_LIST KVM_CREATE_VCPU KVM_SET_USER_MEMORY_REGION
KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR KVM_CREATE_IRQCHIP KVM_CREATE_PIT2 KVM_IRQFD KVM_IOEVENTFD
KVM_IRQ_LINE KVM_GET_DIRTY_LOG KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS
KVM_GET_FPU KVM_SET_FPU KVM_SET_CPUID2 KVM_GET_MSRS KVM_SET_MSRS KVM_GET_LAPIC KVM_SET_LAPIC
KVM_GET_MP_STATE KVM_SET_MP_STATE KVM_SET_GSI_ROUTING
KVM_EXIT_UNKNOWN KVM_EXIT_EXCEPTION KVM_EXIT_IO KVM_EXIT_HYPERCALL KVM_EXIT_DEBUG KVM_EXIT_HLT
KVM_EXIT_MMIO KVM_EXIT_IRQ_WINDOW_OPEN KVM_EXIT_SHUTDOWN KVM_EXIT_FAIL_ENTRY KVM_EXIT_INTR
KVM_EXIT_INTERNAL_ERROR KVM_EXIT_SYSTEM_EVENT KVM_EXIT_IO_IN KVM_EXIT_IO_OUT
KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
KVM_CAP_IRQCHIP KVM_CAP_USER_MEMORY KVM_CAP_SET_TSS_ADDR KVM_CAP_EXT_CPUID KVM_CAP_IRQFD KVM_CAP_IOEVENTFD
KVM_CAP_PIT2 KVM_CAP_IMMEDIATE_EXIT KVM_CAP_NR_MEMSLOTS KVM_CAP_MAX_VCPUS
KVM_MEM_LOG_DIRTY_PAGES KVM_PIT_SPEAKER_DUMMY KVM_IRQFD_FLAG_DEASSIGN
KVM_IOEVENTFD_FLAG_DATAMATCH KVM_IOEVENTFD_FLAG_PIO KVM_IOEVENTFD_FLAG_DEASSIGN
KVM_MAX_CPUID_ENTRIES KVM_MP_STATE_RUNNABLE KVM_MP_STATE_UNINITIALIZED
FALLOC_FL_KEEP_SIZE FALLOC_FL_PUNCH_HOLE FALLOC_FL_ZERO_RANGE
""".split()

SOURCE = "#define _GNU_SOURCE\n#include <fcntl.h>\n#include <errno.h>\n#include <linux/falloc.h>\n#include <linux/kvm.h>\n#ifndef KVM_MAX_CPUID_ENTRIES\n#define KVM_MAX_CPUID_ENTRIES 256\n#endif\n"

ffibuilder = FFI()
ffibuilder.cdef(CDEF + "".join(f"#define {name} ...\n" for name in CONSTANTS))
with open(os.path.join(HERE, "kvm_native.c")) as f:
    ffibuilder.set_source("vmmkit._native", SOURCE + f.read(), extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
