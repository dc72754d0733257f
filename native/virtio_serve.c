/* Native serving loops: a device's whole busy path in C, GIL released.
 *
 * A device worker (vmmkit/epoll.py) normally wakes Python for every guest
 * kick and every finished I/O. With a serving loop, the worker's first wake
 * enters C and stays there: C polls the queue's kick eventfd and the I/O
 * executor's completion eventfd, serves the ring, and raises the used-buffer
 * interrupt itself (the InterruptStatus bit, then the irqfd). It returns to
 * Python as soon as the worker's kill or pause fd becomes readable (pause,
 * reset and stop stay Python's), when Python has something to catch up on
 * (the guest memory table changed, so it rebuilds the C view; a host I/O
 * error to report) and then calls again, or when the driver broke the ring.
 *
 * The transport's InterruptStatus word lives in C memory so that both sides
 * update it with atomic operations (vmmkit/virtio/mmio.py): Python on the vCPU
 * thread when the driver reads or acknowledges it, C here. */

#include <poll.h>
#include <time.h>

/* InterruptStatus updates (return the new value). */
static uint32_t vmm_isr_or(uint32_t *isr, uint32_t bits)
{
    return __atomic_or_fetch(isr, bits, __ATOMIC_SEQ_CST);
}

static uint32_t vmm_isr_and(uint32_t *isr, uint32_t bits)
{
    return __atomic_and_fetch(isr, bits, __ATOMIC_SEQ_CST);
}

/* Raise the used-buffer interrupt: the status bit first, so the driver's
 * handler, woken by the irqfd, finds it set. */
static void vmm_irq_used(uint32_t *isr, int irq_fd)
{
    vmm_isr_or(isr, 1);
    vmm_efd_signal(irq_fd);
}

/* What a serving loop waits on and how it raises interrupts. */
struct vmm_serve {
    int kick_fd;                /* the queue's notify eventfd (non-blocking) */
    int stop_fd[2];             /* the worker's kill and pause fds: readable = back to Python */
    uint32_t *isr;              /* the transport's InterruptStatus */
    int irq_fd;                 /* the device's irqfd */
    uint32_t *table_gen;        /* GuestMemory's region-table generation */
    uint32_t mem_gen;           /* the generation the C view was built from */
    /* out */
    uint32_t lazy_min;          /* no kicks asked for while this many requests are in flight (0: always) */
    long coalesce_ns;           /* how long an interrupt may wait for more completions (0: not at all) */
    int32_t stop;               /* VMM_SERVE_STOP_* */
    uint64_t wakeups;
    uint64_t interrupts;
};

#define VMM_SERVE_STOP_CONTROL 0    /* kill or pause: Python's turn */
#define VMM_SERVE_STOP_RECALL 1     /* the region table changed or I/O errors to report: call again */
#define VMM_SERVE_STOP_BROKEN 2     /* the driver broke the ring (err says how) */

static void vmm_drain_fd(int fd)
{
    uint64_t v;
    ssize_t r;
    do
        r = read(fd, &v, sizeof(v));
    while (r < 0 && errno == EINTR);
}

/* Wait up to ns nanoseconds for fd to become readable: 1 if it did. */
static int vmm_wait_readable(int fd, long ns)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    struct timespec t = {.tv_sec = 0, .tv_nsec = ns};
    int r;
    do
        r = ppoll(&p, 1, &t, NULL);
    while (r < 0 && errno == EINTR);
    return r > 0;
}

/* One round of work on virtio-blk's queue: take what is posted, answer what
 * finished, and again while chains wait for the slots just freed, or while
 * nothing is in flight any more but no kick was asked for (a chain posted
 * meanwhile would wait for ever). With s->coalesce_ns, an interrupt due
 * while more requests are in flight waits that long (once) for them to
 * finish too, so the guest takes one interrupt for both. 0, or -1 when the
 * driver broke the ring. */
static int vmm_blk_round(struct vmm_mem *mem, struct vmm_vq *vq, struct vmm_blk *blk, struct vmm_blk_io *io,
                         struct vmm_serve *s, char *err, size_t errlen)
{
    char scratch[8];
    int irq = 0, waited = 0, rc = 0;
    for (;;) {
        if (vmm_blk_submit(mem, vq, blk, io, err, errlen) < 0) {
            /* The chains taken before the bad one are answered first. */
            irq |= vmm_blk_complete(mem, vq, blk, io, scratch, sizeof(scratch)) > 0;
            rc = -1;
            break;
        }
        int done = vmm_blk_complete(mem, vq, blk, io, err, errlen);
        if (done < 0) {
            rc = -1;
            break;
        }
        irq |= done & 1;
        if (done & 2)
            continue;
        if (irq && !waited && s->coalesce_ns && io->efd >= 0 && vmm_blk_inflight(io)) {
            waited = 1;
            if (vmm_wait_readable(io->efd, s->coalesce_ns))
                continue;
        }
        if (io->armed || vmm_blk_inflight(io))
            break;
    }
    if (irq) {
        vmm_irq_used(s->isr, s->irq_fd);
        s->interrupts++;
    }
    return rc;
}

/* Serve virtio-blk's queue until Python is needed. Returns 0 (s->stop says
 * why) or -1 when the driver broke the ring: err says how; the chains taken
 * before the bad one are answered. */
static int vmm_blk_serve(struct vmm_mem *mem, struct vmm_vq *vq, struct vmm_blk *blk, struct vmm_blk_io *io,
                         struct vmm_serve *s, char *err, size_t errlen)
{
    struct pollfd p[4] = {
        {.fd = s->kick_fd, .events = POLLIN},
        {.fd = s->stop_fd[0], .events = POLLIN},
        {.fd = s->stop_fd[1], .events = POLLIN},
        {.fd = io->efd, .events = POLLIN},
    };
    nfds_t n = io->efd >= 0 ? 4 : 3;
    uint64_t io_errors = blk->io_errors;
    int rc = 0;
    s->stop = VMM_SERVE_STOP_CONTROL;
    io->lazy_min = s->lazy_min;
    for (;;) {
        if (s->table_gen && __atomic_load_n(s->table_gen, __ATOMIC_ACQUIRE) != s->mem_gen) {
            s->stop = VMM_SERVE_STOP_RECALL;
            break;
        }
        if (vmm_blk_round(mem, vq, blk, io, s, err, errlen) < 0) {
            s->stop = VMM_SERVE_STOP_BROKEN;
            rc = -1;
            break;
        }
        if (blk->io_errors != io_errors) {
            s->stop = VMM_SERVE_STOP_RECALL;
            break;
        }
        int r;
        do
            r = poll(p, n, -1);
        while (r < 0 && errno == EINTR);
        if (r < 0) {
            s->stop = VMM_SERVE_STOP_BROKEN;
            rc = vmm_fail(err, errlen, "internal error: poll: %s", strerror(errno));
            break;
        }
        s->wakeups++;
        if ((p[1].revents | p[2].revents) & (POLLIN | POLLERR | POLLHUP | POLLNVAL))
            break;  /* not consumed: the Python loop handles it */
        if (p[0].revents & POLLIN)
            vmm_drain_fd(s->kick_fd);
    }
    /* Python's own calls (drain, the plain path) always ask for kicks. A
     * chain the driver posts from now on, while no kick was asked for, must
     * not wait for a completion that may never come: kick ourselves, so the
     * worker looks at the ring again when it gets back to serving. */
    io->lazy_min = 0;
    if (!rc && !io->armed)
        vmm_efd_signal(s->kick_fd);
    return rc;
}
