/* The virtio-vsock stream data path: bulk bytes between guest buffers and
 * host Unix sockets, with the GIL released (plugins/vsock/native.py).
 *
 * Compiled in the same unit as virtio_blk.c, whose queue walker, segment
 * helpers and dirty marking it shares. The Python device keeps every
 * decision that is not bulk data: handshakes, control packets, credit
 * bookkeeping, resets. It hands this code one connection at a time for rx
 * (host -> guest) and a table of the connections whose guest data may go
 * straight to their sockets for tx (guest -> host). Anything this code does
 * not take is left on the ring, untouched, for the Python path, which
 * stays the reference (plugins/vsock/datapath.py).
 */

#include <sys/socket.h>

#define VMM_VSOCK_HDR 44
#define VMM_VSOCK_HOST_CID 2
#define VMM_VSOCK_TYPE_STREAM 1
#define VMM_VSOCK_OP_RW 5
#define VMM_VSOCK_OP_CREDIT_UPDATE 6
#define VMM_VSOCK_OP_CREDIT_REQUEST 7

/* How a burst ended (vmm_vsock_rx.stop / vmm_vsock_tx.stop). */
#define VMM_VSOCK_STOP_BUDGET 0     /* credit, payload budget or packet budget used up */
#define VMM_VSOCK_STOP_EMPTY 1      /* the driver posted no more chains */
#define VMM_VSOCK_STOP_AGAIN 2      /* rx: the socket had nothing more (EAGAIN or a short read) */
#define VMM_VSOCK_STOP_EOF 3        /* rx: the host closed its side of the stream */
#define VMM_VSOCK_STOP_ERROR 4      /* the socket failed: err_no says how (chain not taken) */
#define VMM_VSOCK_STOP_PYTHON 5     /* tx: the next chain is one for the Python path */
#define VMM_VSOCK_STOP_SPILL 6      /* tx: a socket took part of a packet; the rest is in the spill buffer */

/* One rx burst: guest-bound data of one connection. hdr is the header every
 * packet carries (op RW, the connection's ports, buf_alloc, fwd_cnt); its len
 * field is filled in per packet. */
struct vmm_vsock_rx {
    int fd;
    uint8_t hdr[VMM_VSOCK_HDR];
    uint64_t budget;            /* bytes the guest has credit for */
    uint32_t max_payload;       /* per packet */
    uint32_t max_packets;       /* per burst: other connections get their turn */
    /* The used-buffer interrupt (NULL: the caller raises it): given, the first
     * recvmsg's packets are published, and the interrupt the driver wants for
     * them raised, before the next recvmsg, so that a guest waiting for data
     * starts on it while the rest of the burst is copied. */
    uint32_t *isr;
    int irq_fd;
    /* out */
    uint64_t bytes;
    uint32_t packets;
    uint32_t too_small;         /* chains too short for a header, answered with length 0 */
    int32_t stop;
    int32_t err_no;
    uint32_t reads;             /* recvmsg calls */
    uint32_t early_irqs;        /* interrupts raised here (with isr) */
};

/* A connection whose RW packets from the guest may go straight to its
 * socket: established, not shut by the guest for sending, nothing buffered. */
struct vmm_vsock_conn {
    uint32_t local_port;        /* the host's port: the packet's dst_port */
    uint32_t peer_port;         /* the guest's port: the packet's src_port */
    int fd;
    uint32_t room;              /* bytes the guest may still send before it overruns its credit */
    /* out */
    uint64_t bytes;             /* payload taken from the guest */
    uint64_t sent;              /* of which the socket took */
    uint32_t packets;
    uint32_t buf_alloc;         /* the guest's credit fields from its last packet */
    uint32_t fwd_cnt;
};

struct vmm_vsock_tx {
    uint64_t guest_cid;
    struct vmm_vsock_conn *conns;
    uint32_t nconns;
    uint32_t max_payload;
    uint32_t max_packets;
    uint8_t *spill;             /* max_payload bytes */
    /* out */
    uint32_t packets;
    int32_t stop;
    int32_t spill_conn;         /* STOP_SPILL: the connection, and what its socket did not take */
    uint32_t spill_len;
    int32_t err_no;             /* STOP_SPILL with spill_len > 0 after a socket error: the errno */
};

static uint32_t vmm_le32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t vmm_le64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static uint16_t vmm_le16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* The next posted chain's head without taking it, or -1 when none is posted
 * (after re-arming avail_event and looking once more), or -2 on a broken ring. */
static int vmm_vsock_peek(struct vmm_q *q, char *err, size_t errlen)
{
    uint32_t pending = 0;
    if (vmm_q_pending(q, &pending, err, errlen))
        return -2;
    if (!pending) {
        if (q->vq->event_idx) {
            __atomic_store_n((uint16_t *)(q->used + 4 + 8ull * q->size), q->vq->next_avail, __ATOMIC_RELAXED);
            vmm_mark(q->mem, q->used_r, q->used_off + 4 + 8ull * q->size, 2);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
        }
        if (vmm_q_pending(q, &pending, err, errlen))
            return -2;
        if (!pending)
            return -1;
    }
    return vmm_q_avail_head(q, 0);
}

/* Put one used entry (not yet published: see vmm_vsock_publish). */
static void vmm_vsock_used(struct vmm_q *q, uint16_t head, uint32_t len)
{
    uint32_t us = q->vq->next_used % q->size;
    uint32_t *elem = (uint32_t *)(q->used + 4 + 8ull * us);
    __atomic_store_n(&elem[0], (uint32_t)head, __ATOMIC_RELAXED);
    __atomic_store_n(&elem[1], len, __ATOMIC_RELAXED);
    vmm_mark(q->mem, q->used_r, q->used_off + 4 + 8ull * us, 8);
    q->vq->next_avail++;
    q->vq->next_used++;
}

/* Publish used.idx (release: the entries and the data are visible first);
 * returns 1 if the driver wants an interrupt. */
static int vmm_vsock_publish(struct vmm_q *q, uint32_t added)
{
    if (added) {
        __atomic_store_n((uint16_t *)(q->used + 2), q->vq->next_used, __ATOMIC_RELEASE);
        vmm_mark(q->mem, q->used_r, q->used_off + 2, 2);
    }
    return vmm_q_needs_interrupt(q);
}

static int vmm_vsock_segs_cap(struct vmm_seg **segs, uint32_t *cap, uint32_t size)
{
    if (*cap >= size)
        return 0;
    struct vmm_seg *s = realloc(*segs, sizeof(*s) * size);
    if (!s)
        return -1;
    *segs = s;
    *cap = size;
    return 0;
}

/* Scratch the calls share per thread: each device has one worker thread,
 * and a queue holds at most VMM_MAX_QUEUE descriptors per chain. */
static __thread struct vmm_seg *vmm_vsock_segs;
static __thread uint32_t vmm_vsock_segs_n;
static __thread struct iovec vmm_vsock_iov[VMM_IOV_MAX];
static __thread struct vmm_ioreg vmm_vsock_reg[VMM_IOV_MAX];

/* Set up the ring and the scratch space for a burst; -1 (err says why) when the ring is not in guest RAM. */
static int vmm_vsock_open(struct vmm_q *q, struct vmm_mem *mem, struct vmm_vq *vq, char *err, size_t errlen)
{
    if (vmm_q_setup(q, mem, vq, err, errlen))
        return -1;
    if (vmm_vsock_segs_cap(&vmm_vsock_segs, &vmm_vsock_segs_n, q->size))
        return vmm_fail(err, errlen, "internal error: out of memory for a queue of %u", q->size);
    return 0;
}

/* Walk the next posted chain into the scratch segments without taking it:
 * 1 when there is one, 0 when none is posted, -1 when the ring is broken. */
static int vmm_vsock_next(struct vmm_q *q, struct vmm_chain *c, char *err, size_t errlen)
{
    int head = vmm_vsock_peek(q, err, errlen);
    if (head == -1)
        return 0;
    if (head < 0 || vmm_q_walk(q, (uint16_t)head, vmm_vsock_segs, c, err, errlen))
        return -1;
    return 1;
}

/* The next-but-k posted chain's head without taking it, or -1 when fewer
 * than k + 1 are posted; k = 0 re-arms avail_event as vmm_vsock_peek does. */
static int vmm_vsock_peek_at(struct vmm_q *q, uint32_t k, char *err, size_t errlen)
{
    if (k == 0)
        return vmm_vsock_peek(q, err, errlen);
    uint32_t pending = 0;
    if (vmm_q_pending(q, &pending, err, errlen))
        return -2;
    if (pending <= k)
        return -1;
    return vmm_q_avail_head(q, k);
}

/* Chains one recvmsg fills: a guest's rx buffers are small (Linux posts
 * 4 KiB ones), and one system call per buffer was what host-to-guest
 * throughput paid for most. */
#define VMM_VSOCK_RX_BATCH 16

/* rx: fill the guest's rx buffers from one connection's socket until its
 * credit, the packet budget, the buffers or the socket's bytes run out.
 * Returns -1 when the ring is broken (err says how: NEEDS_RESET), else 1 if
 * the driver wants an interrupt, 0 if not. A chain is only taken once bytes
 * landed in it, so EAGAIN, EOF and errors leave the ring as it was.
 *
 * Each round reads into the payload areas of up to VMM_VSOCK_RX_BATCH posted
 * chains at once (one iovec array, one recvmsg), then gives each chain that
 * got bytes its header, in ring order; the chains the bytes did not reach
 * stay posted. */
static int vmm_vsock_rx(struct vmm_mem *mem, struct vmm_vq *vq, struct vmm_vsock_rx *rx, char *err, size_t errlen)
{
    if (err && errlen)
        err[0] = 0;
    rx->bytes = 0;
    rx->packets = rx->too_small = 0;
    rx->stop = VMM_VSOCK_STOP_BUDGET;
    rx->err_no = 0;
    rx->reads = 0;
    rx->early_irqs = 0;
    int early = rx->isr != NULL;
    struct vmm_q q;
    if (vmm_vsock_open(&q, mem, vq, err, errlen))
        return -1;
    uint32_t added = 0;
    int bad = 0;
    struct {
        uint16_t head;
        uint32_t iov, niov;     /* its payload iovecs in vmm_vsock_iov / vmm_vsock_reg */
        uint64_t room;
    } slot[VMM_VSOCK_RX_BATCH];
    while (rx->packets < rx->max_packets && rx->budget > rx->bytes) {
        /* Gather: the payload areas of the next posted chains, within the budgets. */
        uint32_t n = 0, niov = 0;
        uint64_t total = 0;
        while (n < VMM_VSOCK_RX_BATCH && rx->packets + n < rx->max_packets && rx->budget - rx->bytes > total) {
            struct vmm_chain c;
            int head = vmm_vsock_peek_at(&q, n, err, errlen);
            if (head == -1)
                break;
            if (head < 0 || vmm_q_walk(&q, (uint16_t)head, vmm_vsock_segs, &c, err, errlen)) {
                bad = 1;
                break;
            }
            struct vmm_seg *w = vmm_vsock_segs + c.nr;
            if (c.wlen < VMM_VSOCK_HDR + 1) {
                if (n)
                    break;  /* answered in the next round, after the bytes before it */
                /* As the Python path: a buffer that cannot hold a packet is returned empty. */
                rx->too_small++;
                vmm_vsock_used(&q, c.head, 0);
                added++;
                continue;
            }
            uint32_t space = VMM_IOV_MAX - niov;
            if (n && c.nw > space)
                break;  /* a long chain starts the next round */
            uint64_t room = c.wlen - VMM_VSOCK_HDR;
            if (room > rx->max_payload)
                room = rx->max_payload;
            if (room > rx->budget - rx->bytes - total)
                room = rx->budget - rx->bytes - total;
            /* At most VMM_IOV_MAX segments in a round; a longer chain just gets a shorter packet. */
            uint32_t k = vmm_segs_slice(w, c.nw < space ? c.nw : space, VMM_VSOCK_HDR, room,
                                        vmm_vsock_iov + niov, vmm_vsock_reg + niov);
            room = 0;
            for (uint32_t i = 0; i < k; i++)
                room += vmm_vsock_iov[niov + i].iov_len;
            if (!room)
                break;  /* cannot happen (wlen > HDR, and a first chain has all its segments) */
            slot[n].head = c.head;
            slot[n].iov = niov;
            slot[n].niov = k;
            slot[n].room = room;
            niov += k;
            total += room;
            n++;
        }
        if (bad)
            break;
        if (!n) {
            /* Gathering only stops short of a first chain when none is posted. */
            rx->stop = VMM_VSOCK_STOP_EMPTY;
            break;
        }
        struct msghdr msg = {.msg_iov = vmm_vsock_iov, .msg_iovlen = niov};
        ssize_t got;
        do
            got = recvmsg(rx->fd, &msg, MSG_DONTWAIT);
        while (got < 0 && errno == EINTR);
        rx->reads++;
        if (got < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                rx->stop = VMM_VSOCK_STOP_AGAIN;
            } else {
                rx->stop = VMM_VSOCK_STOP_ERROR;
                rx->err_no = errno;
            }
            break;
        }
        if (got == 0) {
            rx->stop = VMM_VSOCK_STOP_EOF;
            break;
        }
        /* Hand out what landed, chain by chain in ring order: mark it, then the
         * header (with that packet's length) in front of it. The chain is walked
         * again for its header: the guest may have changed its descriptors since,
         * and the new ones are checked as the first were. */
        uint64_t left = (uint64_t)got;
        for (uint32_t i = 0; i < n && left; i++) {
            uint64_t len = slot[i].room < left ? slot[i].room : left;
            vmm_ioreg_mark(mem, vmm_vsock_reg + slot[i].iov, slot[i].niov, len);
            struct vmm_chain c;
            if (vmm_q_walk(&q, slot[i].head, vmm_vsock_segs, &c, err, errlen)) {
                bad = 1;
                break;
            }
            uint8_t hdr[VMM_VSOCK_HDR];
            memcpy(hdr, rx->hdr, sizeof(hdr));
            uint32_t len32 = (uint32_t)len;
            memcpy(hdr + 24, &len32, 4);
            vmm_segs_write(mem, vmm_vsock_segs + c.nr, c.nw, 0, hdr, sizeof(hdr));
            vmm_vsock_used(&q, slot[i].head, VMM_VSOCK_HDR + len32);
            added++;
            rx->bytes += len;
            rx->packets++;
            left -= len;
        }
        if (bad)
            break;
        if (early && added) {
            early = 0;
            if (vmm_vsock_publish(&q, added)) {
                vmm_isr_or(rx->isr, 1);
                vmm_efd_signal(rx->irq_fd);
                rx->early_irqs++;
            }
            added = 0;
        }
        if ((uint64_t)got < total) {
            /* Most likely drained: let epoll say when there is more, as the Python path does. */
            rx->stop = VMM_VSOCK_STOP_AGAIN;
            break;
        }
    }
    int irq = vmm_vsock_publish(&q, added);
    return bad ? -1 : irq;
}

static struct vmm_vsock_conn *vmm_vsock_find(struct vmm_vsock_tx *tx, uint32_t local_port, uint32_t peer_port)
{
    for (uint32_t i = 0; i < tx->nconns; i++)
        if (tx->conns[i].local_port == local_port && tx->conns[i].peer_port == peer_port)
            return &tx->conns[i];
    return NULL;
}

/* tx: take the guest's packets while each is stream data (or a credit update)
 * for a connection in the table and fits its credit, and write the payload
 * straight to that connection's socket. Stops, leaving the chain on the ring, at the first
 * packet that is anything else (STOP_PYTHON). A socket that takes only part
 * of a payload (or fails) ends the burst with the chain taken and the rest
 * of its payload in spill (STOP_SPILL): the Python side buffers it, or
 * resets the connection when err_no is set. Returns -1 when the ring is
 * broken, else 1 if the driver wants an interrupt, 0 if not. */
static int vmm_vsock_tx(struct vmm_mem *mem, struct vmm_vq *vq, struct vmm_vsock_tx *tx, char *err, size_t errlen)
{
    if (err && errlen)
        err[0] = 0;
    tx->packets = 0;
    tx->stop = VMM_VSOCK_STOP_BUDGET;
    tx->spill_conn = -1;
    tx->spill_len = 0;
    tx->err_no = 0;
    for (uint32_t i = 0; i < tx->nconns; i++) {
        struct vmm_vsock_conn *k = &tx->conns[i];
        k->bytes = k->sent = 0;
        k->packets = 0;
    }
    struct vmm_q q;
    if (vmm_vsock_open(&q, mem, vq, err, errlen))
        return -1;
    uint32_t added = 0;
    int bad = 0;
    while (tx->packets < tx->max_packets) {
        struct vmm_chain c;
        int got_chain = vmm_vsock_next(&q, &c, err, errlen);
        if (got_chain <= 0) {
            bad = got_chain < 0;
            tx->stop = VMM_VSOCK_STOP_EMPTY;
            break;
        }
        uint16_t head = c.head;
        uint8_t hdr[VMM_VSOCK_HDR];
        if (c.rlen < VMM_VSOCK_HDR || vmm_segs_read(vmm_vsock_segs, c.nr, 0, hdr, sizeof(hdr)) != sizeof(hdr)) {
            tx->stop = VMM_VSOCK_STOP_PYTHON;
            break;
        }
        uint32_t len = vmm_le32(hdr + 24);
        uint16_t op = vmm_le16(hdr + 30);
        struct vmm_vsock_conn *k = NULL;
        /* Stream data, and the credit updates the guest sends as it reads
         * (they only carry its credit fields, taken below as for data). */
        if (vmm_le64(hdr) == tx->guest_cid && vmm_le64(hdr + 8) == VMM_VSOCK_HOST_CID
                && vmm_le16(hdr + 28) == VMM_VSOCK_TYPE_STREAM
                && (op == VMM_VSOCK_OP_RW || (op == VMM_VSOCK_OP_CREDIT_UPDATE && len == 0))
                && len <= tx->max_payload && len <= c.rlen - VMM_VSOCK_HDR)
            k = vmm_vsock_find(tx, vmm_le32(hdr + 20), vmm_le32(hdr + 16));
        if (!k || len > k->room) {
            /* Not ours, or a credit overrun: the Python path answers it (with a reset). */
            tx->stop = VMM_VSOCK_STOP_PYTHON;
            break;
        }
        ssize_t sent = 0;
        int e = 0;
        if (len) {
            /* At most VMM_IOV_MAX segments: what they miss goes through the spill buffer. */
            uint32_t n = vmm_segs_slice(vmm_vsock_segs, c.nr < VMM_IOV_MAX ? c.nr : VMM_IOV_MAX, VMM_VSOCK_HDR,
                                        len, vmm_vsock_iov, vmm_vsock_reg);
            struct msghdr msg = {.msg_iov = vmm_vsock_iov, .msg_iovlen = n};
            do
                sent = sendmsg(k->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
            while (sent < 0 && errno == EINTR);
            if (sent < 0) {
                e = (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : errno;
                sent = 0;
            }
        }
        k->buf_alloc = vmm_le32(hdr + 36);
        k->fwd_cnt = vmm_le32(hdr + 40);
        k->bytes += len;
        k->sent += (uint64_t)sent;
        k->packets++;
        tx->packets++;
        vmm_vsock_used(&q, head, 0);
        added++;
        if ((uint64_t)sent < len) {
            tx->spill_conn = (int32_t)(k - tx->conns);
            tx->spill_len = (uint32_t)vmm_segs_read(vmm_vsock_segs, c.nr, VMM_VSOCK_HDR + (uint64_t)sent, tx->spill,
                                                    len - (uint64_t)sent);
            tx->err_no = e;
            tx->stop = VMM_VSOCK_STOP_SPILL;
            break;
        }
    }
    int irq = vmm_vsock_publish(&q, added);
    return bad ? -1 : irq;
}
