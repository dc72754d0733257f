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
    uint32_t lazy_min;          /* no kicks asked for while this many requests are in flight (0: always) */
    /* Interrupt coalescing (blk): while at least coalesce_min (0: never)
     * requests are in flight, an interrupt the driver wants may wait for more
     * completions, up to the average request latency >> coalesce_shift,
     * capped at coalesce_max_ns; a wait shorter than coalesce_floor_ns is not
     * worth a timer, and the interrupt goes at once. */
    uint32_t coalesce_min;
    uint32_t coalesce_shift;
    uint64_t coalesce_floor_ns;
    uint64_t coalesce_max_ns;
    /* While the guest is busy: KVM's statistics of each vCPU (KVM_GET_STATS_FD),
     * and where in them its "blocking" flag and its halt_exits count are (0
     * vCPUs: not known). While no vCPU is halted, an interrupt may wait for
     * more completions with any request in flight, up to the latency >>
     * busy_shift (capped as above); the vCPUs are looked at again at every wake
     * and at least every busy_poll_ns, and the interrupt goes as soon as one
     * halts. */
    const int32_t *vcpu_fds;
    uint32_t nvcpus;
    uint32_t blocking_off;
    uint32_t halts_off;
    uint32_t busy_shift;
    uint64_t busy_poll_ns;
    /* blk: while the guest is busy (as above, and no halt since the last
     * look), ask for no kick with any request in flight: its completion
     * brings the loop back to the ring, and so does a look every
     * busy_poll_ns, which asks for kicks again once a vCPU halts. */
    uint32_t busy_lazy;
    /* blk: while the guest is busy and streaming (the last interrupt carried
     * two or more completions), an interrupt waits at least this long (not
     * capped by coalesce_max_ns: the hold ends as soon as a vCPU halts), even with no
     * request left in flight: a device faster than the guest leaves nothing
     * in flight, yet the busy guest goes on posting, and each interrupt would
     * carry one completion. A guest with one request at a time never streams,
     * so it keeps its interrupt at once (0: only the latency rule). */
    uint64_t busy_floor_ns;
    /* out */
    int32_t stop;               /* VMM_SERVE_STOP_* */
    uint64_t wakeups;
    uint64_t interrupts;
    uint64_t coalesced;         /* interrupts that waited and took more completions with them */
    uint64_t busy_held;         /* of the interrupts that waited, those held because the guest was busy */
    uint64_t busy_unarmed;      /* rounds that asked for no kick because the guest was busy */
};

#define VMM_SERVE_STOP_CONTROL 0    /* kill or pause: Python's turn */
#define VMM_SERVE_STOP_RECALL 1     /* the region table changed or I/O errors to report: call again */
#define VMM_SERVE_STOP_BROKEN 2     /* the driver broke the ring (err says how) */

/* One round of work on virtio-blk's queue: take what is posted, answer what
 * finished, and again while chains wait for the slots just freed, or while
 * nothing is in flight any more but no kick was asked for (a chain posted
 * meanwhile would wait for ever). *irq is set if the driver wants an
 * interrupt for what the round answered. 0, or -1 when the driver broke the
 * ring. */
static int vmm_blk_round(struct vmm_mem *mem, struct vmm_vq *vq, struct vmm_blk *blk, struct vmm_blk_io *io,
                         int *irq, char *err, size_t errlen)
{
    char scratch[8];
    for (;;) {
        if (vmm_blk_submit(mem, vq, blk, io, err, errlen) < 0) {
            /* The chains taken before the bad one are answered first. */
            int done = vmm_blk_complete(mem, vq, blk, io, scratch, sizeof(scratch));
            *irq |= done > 0 && (done & 1);
            return -1;
        }
        int done = vmm_blk_complete(mem, vq, blk, io, err, errlen);
        if (done < 0)
            return -1;
        *irq |= done & 1;
        if (done & 2)
            continue;
        if (io->armed || vmm_blk_inflight(io))
            return 0;
    }
}

/* Whether the driver still wants an interrupt for the used entries after
 * index *from*: with VIRTIO_RING_F_EVENT_IDX it may have found them by itself
 * while the interrupt waited, and moved used_event past them. */
static int vmm_irq_still_wanted(struct vmm_mem *mem, struct vmm_vq *vq, uint16_t from)
{
    char scratch[8];
    struct vmm_q q;
    if (!vq->event_idx || vmm_q_setup(&q, mem, vq, scratch, sizeof(scratch)))
        return 1;
    uint16_t new_idx = vq->next_used;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return vmm_need_event(vmm_q_used_event(&q), new_idx, from);
}

/* Whether any vCPU of the guest is halted (blocking in KVM), or cannot be
 * looked at; *halts gets the sum of their halt exits so far. */
static int vmm_guest_waits(const struct vmm_serve *s, uint64_t *halts)
{
    uint64_t sum = 0;
    for (uint32_t i = 0; i < s->nvcpus; i++) {
        uint64_t blocking, n;
        if (pread(s->vcpu_fds[i], &blocking, sizeof(blocking), s->blocking_off) != (ssize_t)sizeof(blocking)
            || pread(s->vcpu_fds[i], &n, sizeof(n), s->halts_off) != (ssize_t)sizeof(n) || blocking)
            return 1;
        sum += n;
    }
    *halts = sum;
    return 0;
}

/* Serve virtio-blk's queue until Python is needed. Returns 0 (s->stop says
 * why) or -1 when the driver broke the ring: err says how; the chains taken
 * before the bad one are answered.
 *
 * Interrupts: every one costs the guest several exits (the injection, its
 * InterruptStatus read and ACK, its EOI), which is most of what a request
 * costs a guest whose CPU is the bottleneck. So with many requests in flight
 * an interrupt the driver wants may wait a short while (a small fraction of
 * the average request latency, so the requests' latency grows by at most
 * that fraction) for more completions to go with it. Never with few in
 * flight, unless the guest is busy: a guest waiting on one request gets it
 * at once, but one whose vCPUs all run (no halt since the interrupt fell
 * due) is not waiting, and takes its completions together a little later
 * (s->busy_*); one that streams waits at least busy_floor_ns, with requests
 * in flight or not. Nothing is left owed when the loop returns.
 *
 * Kicks cost the guest an exit each too: the loop asks for none while
 * lazy_min requests are in flight, or while the guest is busy and any is
 * (s->busy_lazy); a completion, or the look at the vCPUs every busy_poll_ns,
 * brings it back to the ring. */
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
    /* streaming: the last interrupt carried two or more completions; held_empty: the interrupt
     * owed now waits on with nothing in flight (the busy floor). */
    int rc = 0, owed = 0, irqs = 0, held_busy = 0, streaming = 0, held_empty = 0;
    uint16_t owed_from = 0;
    uint64_t deadline = 0, halts = 0, now_halts = 0, lazy_halts = UINT64_MAX;
    s->stop = VMM_SERVE_STOP_CONTROL;
    io->lazy_min = s->lazy_min;
    for (;;) {
        if (s->table_gen && __atomic_load_n(s->table_gen, __ATOMIC_ACQUIRE) != s->mem_gen) {
            s->stop = VMM_SERVE_STOP_RECALL;
            break;
        }
        uint16_t from = vq->signalled_used;
        int irq = 0;
        /* Busy: no vCPU blocks now, and none halted since the last look (a
         * halt in between may have been the guest waiting on a request it
         * posted without a kick). */
        io->lazy_busy = 0;
        if (s->busy_lazy && s->nvcpus) {
            uint64_t h;
            int busy = !vmm_guest_waits(s, &h);
            io->lazy_busy = busy && h == lazy_halts;
            lazy_halts = busy ? h : UINT64_MAX;
        }
        int r = vmm_blk_round(mem, vq, blk, io, &irq, err, errlen);
        int unarmed = io->lazy_busy && !io->armed && vmm_blk_inflight(io);
        s->busy_unarmed += unarmed;
        if (irq && !owed) {
            uint64_t delay = 0;
            held_busy = held_empty = 0;
            int stream = streaming && s->busy_floor_ns;
            if (s->coalesce_min && (vmm_blk_inflight(io) || stream)) {
                if (s->nvcpus && !vmm_guest_waits(s, &halts)) {
                    held_busy = 1;
                    held_empty = stream;
                    delay = io->latency_ns >> s->busy_shift;
                } else if (vmm_blk_inflight(io) >= s->coalesce_min) {
                    delay = io->latency_ns >> s->coalesce_shift;
                }
            }
            if (delay > s->coalesce_max_ns)
                delay = s->coalesce_max_ns;
            if (held_empty && delay < s->busy_floor_ns)
                delay = s->busy_floor_ns;
            owed = 1;
            owed_from = from;
            deadline = delay && delay >= s->coalesce_floor_ns ? io->now + delay : 0;
            irqs = 0;
        }
        irqs += irq;
        int go = 0;
        if (owed) {
            if (r < 0 || !deadline || (!vmm_blk_inflight(io) && !held_empty) || vmm_now_ns() >= deadline)
                go = 1;
            else if (held_busy)
                go = vmm_guest_waits(s, &now_halts) || now_halts != halts;
            else
                go = vmm_blk_inflight(io) < s->coalesce_min;
        }
        if (go) {
            if (vmm_irq_still_wanted(mem, vq, owed_from)) {
                vmm_irq_used(s->isr, s->irq_fd);
                s->interrupts++;
                int more = deadline && vq->next_used != (uint16_t)(owed_from + 1);
                streaming = (uint16_t)(vq->next_used - owed_from) >= 2;
                s->coalesced += more;
                s->busy_held += more && held_busy;
            }
            owed = 0;
        }
        if (r < 0) {
            s->stop = VMM_SERVE_STOP_BROKEN;
            rc = -1;
            break;
        }
        if (blk->io_errors != io_errors) {
            s->stop = VMM_SERVE_STOP_RECALL;
            break;
        }
        struct timespec ts, *timeout = NULL;
        if (owed || unarmed) {
            uint64_t left = UINT64_MAX;
            if (owed) {
                uint64_t now = vmm_now_ns();
                left = deadline > now ? deadline - now : 0;
            }
            if ((unarmed || held_busy) && left > s->busy_poll_ns)
                left = s->busy_poll_ns;  /* to see the guest halt */
            ts.tv_sec = (time_t)(left / 1000000000ull);
            ts.tv_nsec = (long)(left % 1000000000ull);
            timeout = &ts;
        }
        do
            r = ppoll(p, n, timeout, NULL);
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
    if (owed) {
        vmm_irq_used(s->isr, s->irq_fd);
        s->interrupts++;
    }
    /* Python's own calls (drain, the plain path) always ask for kicks. A
     * chain the driver posts from now on, while no kick was asked for, must
     * not wait for a completion that may never come: kick ourselves, so the
     * worker looks at the ring again when it gets back to serving. */
    io->lazy_min = 0;
    io->lazy_busy = 0;
    if (!rc && !io->armed)
        vmm_efd_signal(s->kick_fd);
    return rc;
}

/* ----- virtio-vsock ----- */

/* A connection the vsock loop serves: established, nothing buffered, both
 * directions open. Counters as the Python device keeps them (u32, wrapping). */
struct vmm_vsock_lconn {
    uint32_t local_port;
    uint32_t peer_port;
    int fd;
    uint32_t rx_cnt;            /* bytes sent to the guest */
    uint32_t tx_cnt;            /* bytes the guest sent */
    uint32_t fwd_cnt;           /* of those, bytes its socket took */
    uint32_t last_fwd_sent;     /* fwd_cnt as the guest last heard it */
    uint32_t peer_buf_alloc;
    uint32_t peer_fwd_cnt;
    uint8_t readable;           /* the socket may have bytes */
    uint8_t owe_credit;         /* a CREDIT_UPDATE is due (in and out) */
    uint8_t credit_requested;   /* a CREDIT_REQUEST went out since the guest last gave room */
};

struct vmm_vsock_serve {
    struct vmm_serve srv;       /* kick_fd: the tx queue's */
    int rx_kick_fd;
    int py_fd;                  /* the worker loop's epoll fd: readable = something for Python */
    uint64_t guest_cid;
    uint32_t buf_alloc;         /* what we advertise per connection */
    uint32_t credit_below;      /* send CREDIT_UPDATE once the guest's view of our room is below this */
    uint32_t max_payload;
    uint32_t max_packets;       /* per rx burst: connections take turns */
    struct vmm_vsock_lconn *conns;
    uint32_t nconns;
    struct vmm_vsock_conn *tx_table;  /* nconns entries of scratch */
    uint8_t *spill;             /* max_payload bytes */
    struct pollfd *pfd;         /* 5 + nconns entries of scratch */
    uint64_t tx_irq_defer_ns;   /* how long a tx-only interrupt may wait for an rx one (0: never) */
    /* out, for VMM_SERVE_STOP_PYTHON */
    int32_t conn;               /* the connection whose stream ended or failed (-1: none) */
    int32_t spill_conn;         /* as vmm_vsock_tx: a socket took part of a packet */
    uint32_t spill_len;
    int32_t err_no;
};

#define VMM_SERVE_STOP_PYTHON 3     /* vsock: a packet, a spill or a stream's end for the Python path */

static void vmm_vsock_hdr(uint8_t *h, uint64_t guest_cid, const struct vmm_vsock_lconn *c, uint16_t op,
                          uint32_t buf_alloc)
{
    uint64_t host = VMM_VSOCK_HOST_CID;
    uint16_t type = VMM_VSOCK_TYPE_STREAM;
    memset(h, 0, VMM_VSOCK_HDR);
    memcpy(h, &host, 8);
    memcpy(h + 8, &guest_cid, 8);
    memcpy(h + 16, &c->local_port, 4);
    memcpy(h + 20, &c->peer_port, 4);
    memcpy(h + 28, &type, 2);
    memcpy(h + 30, &op, 2);
    memcpy(h + 36, &buf_alloc, 4);
    memcpy(h + 40, &c->fwd_cnt, 4);
}

/* A header-only packet into the next rx buffer: 1 (and *irq), 0 when the
 * guest posted none, -1 when the ring is broken. */
static int vmm_vsock_ctl(struct vmm_mem *mem, struct vmm_vq *vq, const uint8_t *hdr, int *irq, char *err,
                         size_t errlen)
{
    struct vmm_q q;
    if (vmm_vsock_open(&q, mem, vq, err, errlen))
        return -1;
    uint32_t added = 0;
    int placed = 0;
    for (;;) {
        struct vmm_chain c;
        int got = vmm_vsock_next(&q, &c, err, errlen);
        if (got < 0)
            return -1;
        if (!got)
            break;
        if (c.wlen < VMM_VSOCK_HDR) {
            vmm_vsock_used(&q, c.head, 0);  /* as the Python path: too small, returned empty */
            added++;
            continue;
        }
        vmm_segs_write(mem, vmm_vsock_segs + c.nr, c.nw, 0, hdr, VMM_VSOCK_HDR);
        vmm_vsock_used(&q, c.head, VMM_VSOCK_HDR);
        added++;
        placed = 1;
        break;
    }
    *irq |= vmm_vsock_publish(&q, added);
    return placed;
}

static uint32_t vmm_vsock_credit(const struct vmm_vsock_lconn *c)
{
    uint32_t in_flight = c->rx_cnt - c->peer_fwd_cnt;
    return in_flight < c->peer_buf_alloc ? c->peer_buf_alloc - in_flight : 0;
}

/* Used tx entries the driver has not taken back yet, as far as the device
 * can tell: those past used_event, where it last asked to be woken. */
static uint32_t vmm_vsock_tx_backlog(struct vmm_mem *mem, struct vmm_vq *vq)
{
    char scratch[8];
    struct vmm_q q;
    if (!vq->event_idx || vmm_q_setup(&q, mem, vq, scratch, sizeof(scratch)))
        return UINT32_MAX;  /* nothing to go by: treat it as urgent */
    return (uint16_t)(vq->next_used - vmm_q_used_event(&q));
}

/* Serve established vsock connections both ways until Python is needed:
 * guest data to the sockets (tx, with the guest's credit updates), socket
 * data to the guest (rx, within its credit), and CREDIT_UPDATE packets when
 * the guest's view of our room runs low. Returns 0 (s->stop says why: see
 * VMM_SERVE_STOP_*) or -1 when the driver broke a ring (err says how).
 *
 * Interrupts: the device has one, for both queues. An interrupt for used tx
 * buffers only lets the driver free them (its flow control is the credit,
 * which comes on rx), so while the driver has few of them to take back it
 * waits, up to tx_irq_defer_ns, for the next rx interrupt to carry it: an
 * echo's reply, the next data, a credit update. A request and its answer
 * then cost the guest one interrupt, not two. Nothing is left owed on
 * return. */
static int vmm_vsock_serve(struct vmm_mem *mem, struct vmm_vq *rxq, struct vmm_vq *txq, struct vmm_vsock_serve *v,
                           char *err, size_t errlen)
{
    struct vmm_serve *s = &v->srv;
    struct pollfd *p = v->pfd;
    s->stop = VMM_SERVE_STOP_CONTROL;
    v->conn = v->spill_conn = -1;
    v->spill_len = 0;
    v->err_no = 0;
    int rx_empty = 0;   /* the guest has no rx buffer posted: wait for its rx kick */
    /* The connection set is fixed for the call (vmm_vsock_tx only writes a
     * burst's results into the table), and so are the first five poll entries. */
    for (uint32_t i = 0; i < v->nconns; i++) {
        struct vmm_vsock_conn *t = &v->tx_table[i];
        t->local_port = v->conns[i].local_port;
        t->peer_port = v->conns[i].peer_port;
        t->fd = v->conns[i].fd;
        t->room = v->buf_alloc;  /* nothing is buffered for these connections */
    }
    p[0] = (struct pollfd){.fd = s->stop_fd[0], .events = POLLIN};
    p[1] = (struct pollfd){.fd = s->stop_fd[1], .events = POLLIN};
    p[2] = (struct pollfd){.fd = v->py_fd, .events = POLLIN};
    p[3] = (struct pollfd){.fd = v->rx_kick_fd, .events = POLLIN};
    p[4] = (struct pollfd){.fd = s->kick_fd, .events = POLLIN};
    int tx_owed = 0, rc = 0;
    uint64_t tx_deadline = 0;
    for (;;) {
        if (s->table_gen && __atomic_load_n(s->table_gen, __ATOMIC_ACQUIRE) != s->mem_gen) {
            s->stop = VMM_SERVE_STOP_RECALL;
            goto out;
        }
        int irq = 0, irq_tx = 0, r;
        /* Guest -> host. */
        struct vmm_vsock_tx tx = {.guest_cid = v->guest_cid, .conns = v->tx_table, .nconns = v->nconns,
                                  .max_payload = v->max_payload, .max_packets = 1u << 30, .spill = v->spill};
        r = vmm_vsock_tx(mem, txq, &tx, err, errlen);
        if (r < 0)
            goto broken;
        irq_tx = r;
        for (uint32_t i = 0; i < v->nconns; i++) {
            struct vmm_vsock_conn *t = &v->tx_table[i];
            struct vmm_vsock_lconn *c = &v->conns[i];
            if (!t->packets)
                continue;
            c->peer_buf_alloc = t->buf_alloc;
            c->peer_fwd_cnt = t->fwd_cnt;
            c->tx_cnt += (uint32_t)t->bytes;
            c->fwd_cnt += (uint32_t)t->sent;
            if (vmm_vsock_credit(c))
                c->credit_requested = 0;  /* ask again at the next stall, not while there is still no room */
        }
        if (tx.stop == VMM_VSOCK_STOP_PYTHON || tx.stop == VMM_VSOCK_STOP_SPILL) {
            v->spill_conn = tx.stop == VMM_VSOCK_STOP_SPILL ? tx.spill_conn : -1;
            v->spill_len = tx.stop == VMM_VSOCK_STOP_SPILL ? tx.spill_len : 0;
            v->err_no = tx.stop == VMM_VSOCK_STOP_SPILL ? tx.err_no : 0;
            s->stop = VMM_SERVE_STOP_PYTHON;
        }
        /* Host -> guest: data within the guest's credit, and credit updates. */
        for (uint32_t i = 0; i < v->nconns && !rx_empty && s->stop == VMM_SERVE_STOP_CONTROL; i++) {
            struct vmm_vsock_lconn *c = &v->conns[i];
            uint32_t credit = vmm_vsock_credit(c);
            if (c->readable && credit) {
                struct vmm_vsock_rx rx = {.fd = c->fd, .budget = credit, .max_payload = v->max_payload,
                                          .max_packets = v->max_packets, .isr = s->isr, .irq_fd = s->irq_fd};
                vmm_vsock_hdr(rx.hdr, v->guest_cid, c, VMM_VSOCK_OP_RW, v->buf_alloc);
                r = vmm_vsock_rx(mem, rxq, &rx, err, errlen);
                if (r < 0)
                    goto broken;
                irq |= r;
                if (rx.early_irqs) {
                    /* The device has one interrupt: it carried the used tx buffers too,
                     * those of this round (published before) and any that waited. */
                    s->interrupts += rx.early_irqs;
                    s->coalesced += tx_owed;
                    tx_owed = irq_tx = 0;
                }
                if (rx.packets) {
                    c->rx_cnt += (uint32_t)rx.bytes;
                    c->last_fwd_sent = c->fwd_cnt;  /* every header carried it */
                    c->owe_credit = 0;
                }
                if (rx.stop == VMM_VSOCK_STOP_EMPTY) {
                    rx_empty = 1;
                } else if (rx.stop == VMM_VSOCK_STOP_AGAIN) {
                    c->readable = 0;
                } else if (rx.stop == VMM_VSOCK_STOP_EOF || rx.stop == VMM_VSOCK_STOP_ERROR) {
                    v->conn = (int32_t)i;  /* the Python path reads the end (or the error) itself */
                    s->stop = VMM_SERVE_STOP_PYTHON;
                    break;
                }
            }
            uint32_t seen = c->tx_cnt - c->last_fwd_sent;
            if (seen > v->buf_alloc)
                seen = v->buf_alloc;
            if (c->fwd_cnt != c->last_fwd_sent && v->buf_alloc - seen < v->credit_below)
                c->owe_credit = 1;
            /* Stalled with bytes to give and no room: ask, once per stall (the guest also
             * sends updates by itself as it reads). */
            int ask = c->readable && !vmm_vsock_credit(c) && !c->credit_requested;
            if ((c->owe_credit || ask) && !rx_empty) {
                uint8_t h[VMM_VSOCK_HDR];
                vmm_vsock_hdr(h, v->guest_cid, c, ask ? VMM_VSOCK_OP_CREDIT_REQUEST : VMM_VSOCK_OP_CREDIT_UPDATE,
                              v->buf_alloc);
                r = vmm_vsock_ctl(mem, rxq, h, &irq, err, errlen);
                if (r < 0)
                    goto broken;
                if (r) {
                    c->owe_credit = 0;  /* a CREDIT_REQUEST carries fwd_cnt too */
                    c->last_fwd_sent = c->fwd_cnt;
                    c->credit_requested |= ask;
                } else {
                    rx_empty = 1;
                }
            }
        }
        if (irq_tx && !tx_owed) {
            tx_owed = 1;
            tx_deadline = vmm_now_ns() + v->tx_irq_defer_ns;
        }
        if (tx_owed && !irq && (!v->tx_irq_defer_ns || s->stop != VMM_SERVE_STOP_CONTROL
                                || vmm_vsock_tx_backlog(mem, txq) >= txq->size / 4 || vmm_now_ns() >= tx_deadline))
            irq = 1;
        if (irq) {
            vmm_irq_used(s->isr, s->irq_fd);
            s->interrupts++;
            s->coalesced += tx_owed && !irq_tx;  /* a tx interrupt that waited went with this one */
            tx_owed = 0;
        }
        if (s->stop != VMM_SERVE_STOP_CONTROL)
            return 0;
        /* Wait: for kicks, for sockets with bytes the guest has room for, for Python's events. */
        int busy = 0;
        nfds_t n = 5;
        for (uint32_t i = 0; i < v->nconns; i++) {
            struct vmm_vsock_lconn *c = &v->conns[i];
            int want = !c->readable && vmm_vsock_credit(c);
            busy |= c->readable && vmm_vsock_credit(c) && !rx_empty;
            /* A negative fd is skipped: no spurious POLLHUP spin (Python's epoll reports hangups). */
            p[n++] = (struct pollfd){.fd = want ? c->fd : -1, .events = POLLIN};
        }
        struct timespec ts = {0, 0}, *timeout = busy ? &ts : NULL;
        if (tx_owed && !busy) {
            uint64_t now = vmm_now_ns(), left = tx_deadline > now ? tx_deadline - now : 0;
            ts.tv_sec = (time_t)(left / 1000000000ull);
            ts.tv_nsec = (long)(left % 1000000000ull);
            timeout = &ts;
        }
        do
            r = ppoll(p, n, timeout, NULL);
        while (r < 0 && errno == EINTR);
        if (r < 0) {
            vmm_fail(err, errlen, "internal error: poll: %s", strerror(errno));
            goto broken;
        }
        s->wakeups++;
        if ((p[0].revents | p[1].revents) & (POLLIN | POLLERR | POLLHUP | POLLNVAL))
            goto out;
        if (p[3].revents & POLLIN) {
            vmm_drain_fd(v->rx_kick_fd);
            rx_empty = 0;
        }
        if (p[4].revents & POLLIN)
            vmm_drain_fd(s->kick_fd);
        for (uint32_t i = 0; i < v->nconns; i++)
            if (p[5 + i].revents & (POLLIN | POLLHUP | POLLERR))
                v->conns[i].readable = 1;
        if (p[2].revents) {
            /* The kicks just drained are in that epoll too: only what is left is Python's. */
            struct pollfd e = {.fd = v->py_fd, .events = POLLIN};
            if (poll(&e, 1, 0) > 0)
                goto out;
        }
    }
broken:
    s->stop = VMM_SERVE_STOP_BROKEN;
    rc = -1;
out:
    if (tx_owed) {
        vmm_irq_used(s->isr, s->irq_fd);
        s->interrupts++;
    }
    return rc;
}

/* sizeof(struct pollfd), for the Python side's scratch array. */
static size_t vmm_pollfd_size(void)
{
    return sizeof(struct pollfd);
}
