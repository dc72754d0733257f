"""cffi build script for vmmkit._native: KVM structures, ioctl numbers, the vCPU exit
decoder, the virtio-blk and virtio-vsock data paths (virtio_blk.c, virtio_vsock.c) and
the native serving loops (virtio_serve.c).

API mode: the C compiler reads <linux/kvm.h>, so struct layouts and ioctl
numbers come from the kernel headers rather than being written out by hand.
Run by setuptools at install time (``cffi_modules`` in setup.py).

io_uring comes from liburing (Debian: liburing-dev). Without it (or with
VMMKIT_NO_URING=1 in the environment) the module still builds, and the block
data path falls back to its thread pool.
"""

import os
import shlex
import subprocess
import sys
import tempfile

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
struct vmm_fast_mmio { uint64_t addr; uint32_t *word; uint32_t kind; };
struct vmm_fast_table { struct vmm_fast_mmio *entries; uint32_t n; uint64_t hits; };
int vmm_run(int fd, struct kvm_run *run, struct vmm_exit *out, struct vmm_fast_table *fast);
uint32_t vmm_isr_or(uint32_t *isr, uint32_t bits);
uint32_t vmm_isr_and(uint32_t *isr, uint32_t bits);
#define VMM_FAST_READ32 ...
#define VMM_FAST_ACK32 ...
void vmm_set_mmio_data(struct kvm_run *run, const uint8_t *data, uint32_t len);
void vmm_set_immediate_exit(struct kvm_run *run, uint8_t value);
void vmm_mb(void);
int vmm_set_thread_name(const char *name);
int vmm_fallocate(int fd, int mode, int64_t offset, int64_t len);

/* virtio_blk.c */
struct vmm_region { uint64_t gpa; uint64_t size; uint8_t *host; uint8_t *dirty; uint64_t dirty_len; };
struct vmm_mem { struct vmm_region *regions; uint32_t nregions; uint32_t *logging; };
struct vmm_vq {
    uint64_t desc_addr; uint64_t avail_addr; uint64_t used_addr; uint32_t size;
    uint16_t next_avail; uint16_t next_used; uint16_t signalled_used; uint8_t event_idx; uint8_t indirect;
};
struct vmm_blk {
    int fd; uint8_t read_only; uint8_t direct; uint64_t sectors; uint8_t serial[20];
    uint8_t *bounce; uint64_t bounce_len;
    uint64_t io_errors; int last_errno; uint64_t bounced; uint64_t requests; uint32_t max_inflight;
    uint32_t mem_align;
    uint64_t started; uint64_t inflight_sum; uint64_t rw_requests; uint64_t rw_segments;
    uint64_t pool_delay_ns;
};
struct vmm_blk_io;
int vmm_bitmap_set_range(uint8_t *bm, uint64_t len, uint64_t first, uint64_t last);
void vmm_bitmap_take(uint8_t *bm, uint8_t *out, uint64_t len);
struct vmm_blk_io *vmm_blk_io_new(int kind, uint32_t depth, uint32_t threads, int *err);
int vmm_blk_io_kind(struct vmm_blk_io *io);
void vmm_blk_io_free(struct vmm_blk_io *io);
int vmm_have_uring(void);
int vmm_blk_io_eventfd(struct vmm_blk_io *io);
uint32_t vmm_blk_inflight(struct vmm_blk_io *io);
int vmm_blk_submit(struct vmm_mem *mem, struct vmm_vq *vq, struct vmm_blk *blk, struct vmm_blk_io *io,
                   char *err, size_t errlen);
int vmm_blk_complete(struct vmm_mem *mem, struct vmm_vq *vq, struct vmm_blk *blk, struct vmm_blk_io *io,
                     char *err, size_t errlen);
void vmm_blk_wait(struct vmm_blk_io *io, struct vmm_blk *blk);

/* virtio_vsock.c */
struct vmm_vsock_rx {
    int fd; uint8_t hdr[44]; uint64_t budget; uint32_t max_payload; uint32_t max_packets;
    uint32_t *isr; int irq_fd;
    uint64_t bytes; uint32_t packets; uint32_t too_small; int32_t stop; int32_t err_no; uint32_t reads;
    uint32_t early_irqs;
};
struct vmm_vsock_conn {
    uint32_t local_port; uint32_t peer_port; int fd; uint32_t room;
    uint64_t bytes; uint64_t sent; uint32_t packets; uint32_t buf_alloc; uint32_t fwd_cnt;
};
struct vmm_vsock_tx {
    uint64_t guest_cid; struct vmm_vsock_conn *conns; uint32_t nconns; uint32_t max_payload;
    uint32_t max_packets; uint8_t *spill;
    uint32_t packets; int32_t stop; int32_t spill_conn; uint32_t spill_len; int32_t err_no;
};
int vmm_vsock_rx(struct vmm_mem *mem, struct vmm_vq *vq, struct vmm_vsock_rx *rx, char *err, size_t errlen);
int vmm_vsock_tx(struct vmm_mem *mem, struct vmm_vq *vq, struct vmm_vsock_tx *tx, char *err, size_t errlen);
/* virtio_serve.c */
struct vmm_serve {
    int kick_fd; int stop_fd[2]; uint32_t *isr; int irq_fd; uint32_t *table_gen; uint32_t mem_gen;
    uint32_t lazy_min; uint32_t coalesce_min; uint32_t coalesce_shift; uint64_t coalesce_floor_ns;
    uint64_t coalesce_max_ns;
    const int32_t *vcpu_fds; uint32_t nvcpus; uint32_t blocking_off; uint32_t halts_off; uint32_t busy_shift;
    uint64_t busy_poll_ns; uint32_t busy_lazy; uint64_t busy_floor_ns;
    int32_t stop; uint64_t wakeups; uint64_t interrupts; uint64_t coalesced; uint64_t busy_held;
    uint64_t busy_unarmed;
};
int vmm_blk_serve(struct vmm_mem *mem, struct vmm_vq *vq, struct vmm_blk *blk, struct vmm_blk_io *io,
                  struct vmm_serve *s, char *err, size_t errlen);
struct vmm_vsock_lconn {
    uint32_t local_port; uint32_t peer_port; int fd; uint32_t rx_cnt; uint32_t tx_cnt; uint32_t fwd_cnt;
    uint32_t last_fwd_sent; uint32_t peer_buf_alloc; uint32_t peer_fwd_cnt; uint8_t readable; uint8_t owe_credit;
    uint8_t credit_requested;
};
struct pollfd;
struct vmm_vsock_serve {
    struct vmm_serve srv; int rx_kick_fd; int py_fd; uint64_t guest_cid; uint32_t buf_alloc;
    uint32_t credit_below; uint32_t max_payload; uint32_t max_packets; struct vmm_vsock_lconn *conns;
    uint32_t nconns; struct vmm_vsock_conn *tx_table; uint8_t *spill; struct pollfd *pfd;
    uint64_t tx_irq_defer_ns; int32_t conn; int32_t spill_conn; uint32_t spill_len; int32_t err_no;
};
int vmm_vsock_serve(struct vmm_mem *mem, struct vmm_vq *rxq, struct vmm_vq *txq, struct vmm_vsock_serve *v,
                    char *err, size_t errlen);
size_t vmm_pollfd_size(void);
#define VMM_SERVE_STOP_PYTHON ...
#define VMM_SERVE_STOP_CONTROL ...
#define VMM_SERVE_STOP_RECALL ...
#define VMM_SERVE_STOP_BROKEN ...
#define VMM_VSOCK_STOP_BUDGET ...
#define VMM_VSOCK_STOP_EMPTY ...
#define VMM_VSOCK_STOP_AGAIN ...
#define VMM_VSOCK_STOP_EOF ...
#define VMM_VSOCK_STOP_ERROR ...
#define VMM_VSOCK_STOP_PYTHON ...
#define VMM_VSOCK_STOP_SPILL ...
#define VMM_IO_SYNC ...
#define VMM_IO_URING ...
#define VMM_IO_THREADS ...
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



def _have_liburing() -> bool:
    """Whether liburing's header and library are there: compile and link a probe."""
    if os.environ.get("VMMKIT_NO_URING"):
        return False
    cc = shlex.split(os.environ.get("CC", "cc"))
    probe = "#include <liburing.h>\nint main(void) { struct io_uring r; return io_uring_queue_init(1, &r, 0); }\n"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.c")
        with open(src, "w") as f:
            f.write(probe)
        try:
            done = subprocess.run(cc + [src, "-o", os.path.join(d, "probe"), "-luring"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            return False
    return done.returncode == 0


def _read(name: str) -> str:
    # #line keeps compiler messages pointing at the real file and line.
    with open(os.path.join(HERE, name)) as f:
        return f'#line 1 "{name}"\n' + f.read()


HAVE_URING = _have_liburing()
if not HAVE_URING:
    print("vmmkit: liburing not found (apt-get install liburing-dev): building the block "
          "data path without io_uring; it will use its thread pool", file=sys.stderr)

ffibuilder = FFI()
ffibuilder.cdef(CDEF + "".join(f"#define {name} ...\n" for name in CONSTANTS))
# The last #line hands the rest (cffi's generated wrappers) back to _native.c.
ffibuilder.set_source("vmmkit._native", SOURCE + _read("kvm_native.c") + "\n" + _read("virtio_blk.c")
                      + "\n" + _read("virtio_vsock.c") + "\n" + _read("virtio_serve.c") + '\n#line 1 "_native.c"\n',
                      extra_compile_args=["-O2"],
                      define_macros=[("VMM_HAVE_URING", "1")] if HAVE_URING else [],
                      libraries=(["uring"] if HAVE_URING else []) + ["pthread"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
