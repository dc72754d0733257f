/* vmmkit's native helpers: ioctl wrappers that report errno, and the vCPU
 * exit decoder. cffi releases the GIL around every call into this file, so a
 * vCPU blocked in KVM_RUN never holds up the other threads. */
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <linux/kvm.h>

struct vmm_exit {
    uint32_t reason;
    uint8_t io_direction;     /* KVM_EXIT_IO_IN / _OUT */
    uint8_t io_size;
    uint16_t io_port;
    uint32_t io_count;
    uint64_t io_data_offset;  /* offset of the data in the kvm_run mapping */
    uint64_t mmio_phys_addr;
    uint32_t mmio_len;
    uint8_t mmio_is_write;
    uint8_t mmio_data[8];
    uint32_t system_event_type;
    uint64_t hw_reason;       /* fail_entry / hw exit reason */
    uint32_t internal_suberror;
};

static long vmm_ioctl(int fd, unsigned long request, void *arg)
{
    long r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

static long vmm_ioctl_val(int fd, unsigned long request, unsigned long arg)
{
    long r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

/* The transport's InterruptStatus word (vmmkit/virtio/mmio.py) is shared by
 * vCPU threads, device loops in C and Python: every change is atomic. Both
 * return the new value. */
static uint32_t vmm_isr_or(uint32_t *isr, uint32_t bits)
{
    return __atomic_or_fetch(isr, bits, __ATOMIC_SEQ_CST);
}

static uint32_t vmm_isr_and(uint32_t *isr, uint32_t bits)
{
    return __atomic_and_fetch(isr, bits, __ATOMIC_SEQ_CST);
}

/* MMIO registers answered inside vmm_run, without going back to Python:
 * virtio-MMIO's InterruptStatus (read) and InterruptACK (write), which the
 * guest touches on every interrupt. The words are shared with C device loops
 * and Python (vmmkit/virtio/mmio.py), so they are accessed atomically. */
#define VMM_FAST_READ32 1           /* a 32-bit read answers the word */
#define VMM_FAST_ACK32 2            /* a 32-bit write clears its bits in the word */

struct vmm_fast_mmio {
    uint64_t addr;
    uint32_t *word;
    uint32_t kind;
};

struct vmm_fast_table {
    struct vmm_fast_mmio *entries;
    uint32_t n;
    uint64_t hits;              /* exits answered here (not atomic: a statistic) */
};

/* Answer an MMIO exit from the table: 1 if it was, 0 if Python must. */
static int vmm_fast_mmio(struct kvm_run *run, struct vmm_fast_table *t)
{
    if (run->mmio.len != 4)
        return 0;
    for (uint32_t i = 0; i < t->n; i++) {
        struct vmm_fast_mmio *e = &t->entries[i];
        if (e->addr != run->mmio.phys_addr)
            continue;
        if (!run->mmio.is_write && e->kind == VMM_FAST_READ32) {
            uint32_t v = __atomic_load_n(e->word, __ATOMIC_SEQ_CST);
            memcpy(run->mmio.data, &v, 4);
        } else if (run->mmio.is_write && e->kind == VMM_FAST_ACK32) {
            uint32_t v;
            memcpy(&v, run->mmio.data, 4);
            vmm_isr_and(e->word, ~v);
        } else {
            return 0;
        }
        t->hits++;
        return 1;
    }
    return 0;
}

/* KVM_RUN until an exit Python must see (those in *fast are answered here),
 * decoded. Returns 0, or -errno (-EINTR when kicked: a kick sets
 * immediate_exit, which the next KVM_RUN honours even between two runs of
 * this loop). */
static int vmm_run(int fd, struct kvm_run *run, struct vmm_exit *out, struct vmm_fast_table *fast)
{
    for (;;) {
        long r = ioctl(fd, KVM_RUN, 0);
        if (r < 0)
            return -errno;
        if (!fast || run->exit_reason != KVM_EXIT_MMIO || !vmm_fast_mmio(run, fast))
            break;
    }
    memset(out, 0, sizeof(*out));
    out->reason = run->exit_reason;
    switch (run->exit_reason) {
    case KVM_EXIT_IO:
        out->io_direction = run->io.direction;
        out->io_size = run->io.size;
        out->io_port = run->io.port;
        out->io_count = run->io.count;
        out->io_data_offset = run->io.data_offset;
        break;
    case KVM_EXIT_MMIO:
        out->mmio_phys_addr = run->mmio.phys_addr;
        out->mmio_len = run->mmio.len;
        out->mmio_is_write = run->mmio.is_write;
        memcpy(out->mmio_data, run->mmio.data, 8);
        break;
    case KVM_EXIT_SYSTEM_EVENT:
        out->system_event_type = run->system_event.type;
        break;
    case KVM_EXIT_FAIL_ENTRY:
        out->hw_reason = run->fail_entry.hardware_entry_failure_reason;
        break;
    case KVM_EXIT_UNKNOWN:
        out->hw_reason = run->hw.hardware_exit_reason;
        break;
    case KVM_EXIT_INTERNAL_ERROR:
        out->internal_suberror = run->internal.suberror;
        break;
    }
    return 0;
}

/* The answer to an MMIO read exit, copied in before the next KVM_RUN. */
static void vmm_set_mmio_data(struct kvm_run *run, const uint8_t *data, uint32_t len)
{
    if (len > 8)
        len = 8;
    memcpy(run->mmio.data, data, len);
}

static void vmm_set_immediate_exit(struct kvm_run *run, uint8_t value)
{
    run->immediate_exit = value;
}

/* A full memory barrier, for the Python virtqueue: x86 may order a store to
 * the used ring after a later load of the driver's event index, and the
 * virtio notification-suppression protocol needs them in program order. */
static void vmm_mb(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* fallocate(2) with its mode flags (punch hole, zero range), which Python's
 * os module does not expose; returns 0 or -errno. */
static int vmm_fallocate(int fd, int mode, int64_t offset, int64_t len)
{
    return fallocate(fd, mode, offset, len) == 0 ? 0 : -errno;
}

/* The calling thread's kernel name (what ps -L and core dumps show), at most
 * 15 bytes; here rather than through ctypes, whose import costs a second in
 * the lab. Returns 0 or -errno. */
static int vmm_set_thread_name(const char *name)
{
    return prctl(PR_SET_NAME, (unsigned long)name, 0, 0, 0) == 0 ? 0 : -errno;
}
