/* virtio-blk's per-request data path in C: the split virtqueue walk, request
 * parsing, block I/O (io_uring, a thread pool, or plain syscalls), completion
 * and the interrupt decision, all without the GIL.
 *
 * The Python path (vmmkit/virtio/queue.py and plugins/blk/device.py) is the
 * reference: every check below mirrors one there, in the same order and with
 * the same message, so that a hostile driver gets the same answer from both
 * engines (tests/unit/test_blk_native.py compares them).
 *
 * Safety rules (design contract 5): every guest address goes through
 * vmm_xlate(), which only answers for ranges lying entirely inside one region
 * and is overflow-safe; every value read from guest memory is read once into
 * a local copy (followed by a compiler barrier) before it is checked, so a
 * driver rewriting its descriptors concurrently cannot change a value between
 * the check and the use. Every byte the device writes into guest memory
 * (data, status byte, used ring, avail_event) marks the region's dirty bitmap
 * with atomic ORs while logging is on (contract 4).
 *
 * Concurrency: one device thread serves the queue. vmm_blk_submit() takes
 * the posted chains and starts their I/O without waiting; vmm_blk_complete()
 * answers whatever has finished, in completion order, without blocking; the
 * executor's eventfd (vmm_blk_io_eventfd) says when to call it. Requests in
 * flight use guest memory until they are answered, so before the worker
 * acknowledges a pause, and before a reset frees anything, it calls
 * vmm_blk_wait() and vmm_blk_complete(): after that nothing touches guest
 * memory (contract 3). */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <linux/falloc.h>
#ifdef VMM_HAVE_URING
#include <liburing.h>
#endif

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the virtio data path reads the (little-endian) rings natively: little-endian hosts only"
#endif

#define VMM_PAGE_SHIFT 12
#define VMM_MAX_QUEUE 32768
#define VMM_IOV_MAX 1024            /* UIO_MAXIOV: preadv and io_uring refuse more */

#define VMM_DESC_F_NEXT 1
#define VMM_DESC_F_WRITE 2
#define VMM_DESC_F_INDIRECT 4
#define VMM_AVAIL_F_NO_INTERRUPT 1

#define VMM_SECTOR 512
#define VMM_BLK_T_IN 0
#define VMM_BLK_T_OUT 1
#define VMM_BLK_T_FLUSH 4
#define VMM_BLK_T_GET_ID 8
#define VMM_BLK_T_DISCARD 11
#define VMM_BLK_T_WRITE_ZEROES 13
#define VMM_BLK_S_OK 0
#define VMM_BLK_S_IOERR 1
#define VMM_BLK_S_UNSUPP 2
#define VMM_BLK_ID_BYTES 20
#define VMM_BLK_HEADER 16
#define VMM_BLK_SEGMENT 16
#define VMM_BLK_WZ_F_UNMAP 1
#define VMM_BLK_MAX_DISCARD_SEG 16
#define VMM_BLK_MAX_DISCARD_SECTORS ((1u << 30) / VMM_SECTOR)

#define VMM_IO_SYNC 0
#define VMM_IO_URING 1
#define VMM_IO_THREADS 2
#define VMM_POOL_MAX 16

/* ----- the structures Python fills in (see the cdef in build_native.py) ----- */

/* One guest RAM region: [gpa, gpa + size) is at host[0 .. size). dirty is the
 * region's VMM-side dirty bitmap (dirty_len bytes, bit i = page i). */
struct vmm_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
    uint8_t *dirty;
    uint64_t dirty_len;
};

/* All of guest RAM. logging points at GuestMemory's flag word, which the
 * control plane flips while this code runs: it is read at every write. */
struct vmm_mem {
    struct vmm_region *regions;
    uint32_t nregions;
    uint32_t *logging;
};

/* A split virtqueue's device-side state (vmmkit.virtio.queue.Virtqueue). */
struct vmm_vq {
    uint64_t desc_addr;
    uint64_t avail_addr;
    uint64_t used_addr;
    uint32_t size;
    uint16_t next_avail;
    uint16_t next_used;
    uint16_t signalled_used;
    uint8_t event_idx;
    uint8_t indirect;
};

/* The block backend, plus counters the Python side reads after each call. */
struct vmm_blk {
    int fd;
    uint8_t read_only;
    uint8_t direct;             /* opened O_DIRECT: EINVAL means "misaligned", bounce */
    uint64_t sectors;
    uint8_t serial[20];         /* GET_ID answer, zero padded */
    uint8_t *bounce;            /* page-aligned, bounce_len bytes (a multiple of 4 KiB) */
    uint64_t bounce_len;
    uint64_t io_errors;         /* host I/O errors answered with IOERR */
    int last_errno;
    uint64_t bounced;           /* transfers that went through a bounce buffer */
    uint64_t requests;          /* requests answered */
    uint32_t max_inflight;      /* most requests ever in flight together */
    uint32_t mem_align;         /* O_DIRECT buffer alignment when known (0: let the kernel
                                 * say EINVAL); misaligned transfers bounce without trying */
    uint64_t started;           /* requests taken from the queue */
    uint64_t inflight_sum;      /* over those: requests in flight as each was taken (itself included) */
    uint64_t rw_requests;       /* reads and writes started */
    uint64_t rw_segments;       /* over those: host iovecs, after guest pages that are adjacent were joined */
    uint64_t pool_delay_ns;     /* tests: a slow disk (the thread pool sleeps this long before each request) */
};

struct vmm_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

/* ----- small helpers ----- */

/* After copying guest memory into a local, stop the compiler from re-reading
 * guest memory in place of the copy (a double fetch the guest could race). */
#define VMM_BARRIER() __asm__ __volatile__("" ::: "memory")

static int vmm_fail(char *err, size_t errlen, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* Set bits first..last (inclusive) of a bitmap of len bytes, atomically, so
 * that a concurrent vmm_bitmap_take() never loses a bit. Release ordering:
 * whoever takes the bit (acquire) also sees the guest memory written before
 * it was set. Returns -1 (and sets nothing) for a range outside the bitmap. */
static int vmm_bitmap_set_range(uint8_t *bm, uint64_t len, uint64_t first, uint64_t last)
{
    if (!bm || first > last || (last >> 3) >= len)
        return -1;
    uint64_t fb = first >> 3, lb = last >> 3;
    uint8_t head = (uint8_t)(0xFFu << (first & 7));
    uint8_t tail = (uint8_t)(0xFFu >> (7 - (last & 7)));
    if (fb == lb) {
        __atomic_fetch_or(&bm[fb], (uint8_t)(head & tail), __ATOMIC_RELEASE);
        return 0;
    }
    __atomic_fetch_or(&bm[fb], head, __ATOMIC_RELEASE);
    for (uint64_t i = fb + 1; i < lb; i++)
        __atomic_fetch_or(&bm[i], (uint8_t)0xFF, __ATOMIC_RELEASE);
    __atomic_fetch_or(&bm[lb], tail, __ATOMIC_RELEASE);
    return 0;
}

/* Move a bitmap into out (which may be NULL to just clear it), leaving zeros:
 * each byte is exchanged atomically, so bits set concurrently are either in
 * out or still in bm, never lost. Clean bytes are only loaded, which keeps
 * the common case (a mostly clean bitmap) cheap. */
static void vmm_bitmap_take(uint8_t *bm, uint8_t *out, uint64_t len)
{
    for (uint64_t i = 0; i < len; i++) {
        uint8_t v = __atomic_load_n(&bm[i], __ATOMIC_RELAXED);
        if (v)
            v = __atomic_exchange_n(&bm[i], (uint8_t)0, __ATOMIC_ACQ_REL);
        if (out)
            out[i] = v;
    }
}

/* The region holding all of [gpa, gpa + len), or NULL. A zero-length range
 * must still start inside a region (as GuestMemory.translate insists). The
 * arithmetic never forms gpa + len, so nothing can wrap. */
static struct vmm_region *vmm_xlate(const struct vmm_mem *m, uint64_t gpa, uint64_t len, uint64_t *off)
{
    for (uint32_t i = 0; i < m->nregions; i++) {
        struct vmm_region *r = &m->regions[i];
        if (r->host && gpa >= r->gpa && gpa - r->gpa < r->size) {
            uint64_t o = gpa - r->gpa;
            if (len > r->size - o)
                return NULL;
            *off = o;
            return r;
        }
    }
    return NULL;
}

/* Record that the device wrote [off, off + len) of region r. */
static void vmm_mark(const struct vmm_mem *m, const struct vmm_region *r, uint64_t off, uint64_t len)
{
    if (!len || !m->logging || !__atomic_load_n(m->logging, __ATOMIC_ACQUIRE) || !r->dirty)
        return;
    vmm_bitmap_set_range(r->dirty, r->dirty_len, off >> VMM_PAGE_SHIFT, (off + len - 1) >> VMM_PAGE_SHIFT);
}

/* ----- the split virtqueue ----- */

struct vmm_q {
    const struct vmm_mem *mem;
    struct vmm_vq *vq;
    uint32_t size;
    const uint8_t *desc;
    const uint8_t *avail;
    uint8_t *used;
    struct vmm_region *used_r;
    uint64_t used_off;
};

/* A non-empty piece of a chain: host pointer, length, and where it lives for
 * dirty marking. Zero-length descriptors never become segments (the Python
 * path never touches them either, so their addresses are never checked). */
struct vmm_seg {
    uint8_t *host;
    uint64_t len;
    struct vmm_region *r;
    uint64_t off;
};

struct vmm_chain {
    uint16_t head;
    uint32_t nr, nw;            /* segs[0..nr) readable, segs[nr..nr+nw) writable */
    uint64_t rlen, wlen;
};

/* Re-check the rings Python checked at DRIVER_OK: the region table may have
 * changed since (memory hot-unplug), and C trusts nothing it did not check. */
static int vmm_q_setup(struct vmm_q *q, const struct vmm_mem *mem, struct vmm_vq *vq, char *err, size_t errlen)
{
    uint32_t size = vq->size;
    if (size == 0 || size > VMM_MAX_QUEUE || (size & (size - 1)))
        return vmm_fail(err, errlen, "queue size %u is not a power of two in 1..%u", size, VMM_MAX_QUEUE);
    const char *what[3] = {"descriptor table", "available ring", "used ring"};
    uint64_t addr[3] = {vq->desc_addr, vq->avail_addr, vq->used_addr};
    uint64_t align[3] = {16, 2, 4};
    uint64_t len[3] = {16ull * size, 6 + 2ull * size, 6 + 8ull * size};
    struct vmm_region *r[3];
    uint64_t off[3];
    for (int i = 0; i < 3; i++) {
        if (addr[i] % align[i])
            return vmm_fail(err, errlen, "%s at 0x%llx is not %llu-byte aligned", what[i],
                            (unsigned long long)addr[i], (unsigned long long)align[i]);
        r[i] = vmm_xlate(mem, addr[i], len[i], &off[i]);
        if (!r[i])
            return vmm_fail(err, errlen, "%s at 0x%llx+0x%llx is outside guest RAM", what[i],
                            (unsigned long long)addr[i], (unsigned long long)len[i]);
    }
    q->mem = mem;
    q->vq = vq;
    q->size = size;
    q->desc = r[0]->host + off[0];
    q->avail = r[1]->host + off[1];
    q->used = r[2]->host + off[2];
    q->used_r = r[2];
    q->used_off = off[2];
    return 0;
}

/* How many chains the driver posted that the device has not taken. The
 * acquire load orders it before the reads of ring entries and descriptors. */
static int vmm_q_pending(struct vmm_q *q, uint32_t *pending, char *err, size_t errlen)
{
    uint16_t idx = __atomic_load_n((const uint16_t *)(q->avail + 2), __ATOMIC_ACQUIRE);
    uint32_t p = (uint16_t)(idx - q->vq->next_avail);
    if (p > q->size)
        return vmm_fail(err, errlen, "avail.idx moved %u entries ahead of the device, more than the queue size %u",
                        p, q->size);
    *pending = p;
    return 0;
}

/* The head of the chain posted k places after the next one the device takes
 * (the caller knows, from vmm_q_pending, that it is posted). */
static uint16_t vmm_q_avail_head(const struct vmm_q *q, uint32_t k)
{
    return __atomic_load_n((const uint16_t *)(q->avail + 4 + 2ull * ((q->vq->next_avail + k) % q->size)),
                           __ATOMIC_RELAXED);
}

/* Walk the chain at head into segs (room for q->size entries): Virtqueue._walk. */
static int vmm_q_walk(struct vmm_q *q, uint16_t head, struct vmm_seg *segs, struct vmm_chain *c,
                      char *err, size_t errlen)
{
    uint32_t size = q->size;
    c->head = head;
    c->nr = c->nw = 0;
    c->rlen = c->wlen = 0;
    if (head >= size)
        return vmm_fail(err, errlen, "chain head %u is outside the queue (size %u)", head, size);
    const uint8_t *table = q->desc;
    uint32_t table_len = size, index = head, seen = 0, n = 0;
    int indirect = 0, writable = 0;
    for (;;) {
        /* The spec caps a chain at the queue size; the count also ends loops. */
        if (++seen > size)
            return vmm_fail(err, errlen, "chain from head %u is longer than the queue size %u (a loop?)", head, size);
        struct vmm_desc d;
        memcpy(&d, table + 16ull * index, sizeof(d));
        VMM_BARRIER();
        if (d.flags & VMM_DESC_F_INDIRECT) {
            if (indirect)
                return vmm_fail(err, errlen, "chain from head %u: indirect descriptor inside an indirect table", head);
            if (!q->vq->indirect)
                return vmm_fail(err, errlen, "chain from head %u: indirect descriptor but VIRTIO_F_INDIRECT_DESC "
                                "was not negotiated", head);
            if (d.flags & VMM_DESC_F_NEXT)
                return vmm_fail(err, errlen, "chain from head %u: indirect descriptor with NEXT set", head);
            if (d.len == 0 || d.len % 16)
                return vmm_fail(err, errlen, "chain from head %u: indirect table length %u is not a positive "
                                "multiple of 16", head, d.len);
            uint64_t off;
            struct vmm_region *r = vmm_xlate(q->mem, d.addr, d.len, &off);
            if (!r)
                return vmm_fail(err, errlen, "chain from head %u: indirect table at 0x%llx+0x%x is outside guest RAM",
                                head, (unsigned long long)d.addr, d.len);
            table = r->host + off;
            table_len = d.len / 16;
            index = 0;
            indirect = 1;
            seen--;  /* the indirect descriptor carries no buffer */
            continue;
        }
        struct vmm_region *r = NULL;
        uint64_t off = 0;
        if (d.len) {
            r = vmm_xlate(q->mem, d.addr, d.len, &off);
            if (!r)
                return vmm_fail(err, errlen, "chain from head %u: buffer 0x%llx+0x%x is outside guest RAM",
                                head, (unsigned long long)d.addr, d.len);
        }
        if (d.flags & VMM_DESC_F_WRITE) {
            writable = 1;
            c->wlen += d.len;
            if (d.len) {
                segs[n++] = (struct vmm_seg){r->host + off, d.len, r, off};
                c->nw++;
            }
        } else if (writable) {
            return vmm_fail(err, errlen, "chain from head %u: device-readable buffer after a device-writable one", head);
        } else {
            c->rlen += d.len;
            if (d.len) {
                segs[n++] = (struct vmm_seg){r->host + off, d.len, r, off};
                c->nr++;
            }
        }
        if (!(d.flags & VMM_DESC_F_NEXT))
            return 0;
        if (d.next >= table_len)
            return vmm_fail(err, errlen, "chain from head %u: next index %u is outside its table (%u entries)",
                            head, d.next, table_len);
        index = d.next;
    }
}

/* Copy up to len bytes from offset of the concatenated segments; returns the count. */
static uint64_t vmm_segs_read(const struct vmm_seg *s, uint32_t n, uint64_t offset, uint8_t *dst, uint64_t len)
{
    uint64_t done = 0;
    for (uint32_t i = 0; i < n && done < len; i++) {
        if (offset >= s[i].len) {
            offset -= s[i].len;
            continue;
        }
        uint64_t take = s[i].len - offset;
        if (take > len - done)
            take = len - done;
        memcpy(dst + done, s[i].host + offset, take);
        done += take;
        offset = 0;
    }
    VMM_BARRIER();
    return done;
}

/* Copy src into the concatenated segments at offset, marking what was written. */
static uint64_t vmm_segs_write(const struct vmm_mem *m, const struct vmm_seg *s, uint32_t n, uint64_t offset,
                               const uint8_t *src, uint64_t len)
{
    uint64_t done = 0;
    for (uint32_t i = 0; i < n && done < len; i++) {
        if (offset >= s[i].len) {
            offset -= s[i].len;
            continue;
        }
        uint64_t take = s[i].len - offset;
        if (take > len - done)
            take = len - done;
        memcpy(s[i].host + offset, src + done, take);
        vmm_mark(m, s[i].r, s[i].off + offset, take);
        done += take;
        offset = 0;
    }
    return done;
}

/* ----- requests ----- */

enum { VMM_OP_DONE, VMM_OP_READ, VMM_OP_WRITE, VMM_OP_FLUSH };

/* Where a request slot is: free, answered-to-be (its result is known, it is
 * in the done list), or its I/O is running on the ring or in the pool. */
enum { VMM_SLOT_FREE, VMM_SLOT_DONE, VMM_SLOT_URING, VMM_SLOT_POOL, VMM_SLOT_TAKEN };

/* Where an iovec points, for dirty marking after a read lands. */
struct vmm_ioreg {
    struct vmm_region *r;
    uint64_t off;
    uint64_t len;
};

/* Mark the first len bytes of what n iovecs point at (what a read put there). */
static void vmm_ioreg_mark(const struct vmm_mem *m, const struct vmm_ioreg *reg, uint32_t n, uint64_t len)
{
    for (uint32_t k = 0; k < n && len; k++) {
        uint64_t take = reg[k].len < len ? reg[k].len : len;
        vmm_mark(m, reg[k].r, reg[k].off, take);
        len -= take;
    }
}

/* One request from pop to answer. A slot owns its iovecs (grown as needed
 * and kept), so requests in flight never share any state. */
struct vmm_req {
    uint64_t offset;            /* file offset */
    uint64_t len;               /* bytes to transfer */
    uint64_t done;              /* bytes transferred */
    uint64_t written;           /* bytes written into the chain before the status byte */
    uint8_t *status_host;
    struct vmm_region *status_r;
    uint64_t status_off;
    struct iovec *iov;
    struct vmm_ioreg *ioreg;
    uint32_t iovcnt, iov_cap;
    int32_t res;                /* 0, or -errno of a host I/O error */
    uint32_t gen;               /* a FLUSH on io_uring: io->late_writes when it was submitted */
    uint64_t t_start;           /* CLOCK_MONOTONIC ns when it was taken off the ring */
    uint16_t head;
    uint8_t op, status, state;
};

/* Slice [offset, offset + len) of the segments into iovecs; returns how many.
 * Segments that continue one another in the same memory region become one
 * iovec: the host kernel then walks fewer pieces, and an O_DIRECT request
 * splits less often. */
static uint32_t vmm_segs_slice(const struct vmm_seg *s, uint32_t n, uint64_t offset, uint64_t len,
                               struct iovec *iov, struct vmm_ioreg *reg)
{
    uint32_t k = 0;
    for (uint32_t i = 0; i < n && len; i++) {
        if (offset >= s[i].len) {
            offset -= s[i].len;
            continue;
        }
        uint64_t take = s[i].len - offset;
        if (take > len)
            take = len;
        if (k && reg[k - 1].r == s[i].r && reg[k - 1].off + reg[k - 1].len == s[i].off + offset) {
            iov[k - 1].iov_len += take;
            reg[k - 1].len += take;
            len -= take;
            offset = 0;
            continue;
        }
        iov[k].iov_base = s[i].host + offset;
        iov[k].iov_len = take;
        reg[k] = (struct vmm_ioreg){s[i].r, s[i].off + offset, take};
        k++;
        len -= take;
        offset = 0;
    }
    return k;
}

/* Advance an iovec array past n bytes, in place (a request owns its iovecs). */
static void vmm_iov_advance(struct iovec **iov, uint32_t *cnt, uint64_t n)
{
    while (*cnt && n >= (*iov)->iov_len) {
        n -= (*iov)->iov_len;
        (*iov)++;
        (*cnt)--;
    }
    if (*cnt && n) {
        (*iov)->iov_base = (uint8_t *)(*iov)->iov_base + n;
        (*iov)->iov_len -= n;
    }
}

/* Copy n bytes between a buffer and the iovecs, consuming the iovecs. */
static void vmm_iov_copy(struct iovec **iov, uint32_t *cnt, uint8_t *buf, uint64_t n, int to_iov)
{
    uint64_t pos = 0;
    while (pos < n && *cnt) {
        uint64_t take = (*iov)->iov_len;
        if (take > n - pos)
            take = n - pos;
        if (to_iov)
            memcpy((*iov)->iov_base, buf + pos, take);
        else
            memcpy(buf + pos, (*iov)->iov_base, take);
        pos += take;
        vmm_iov_advance(iov, cnt, take);
    }
}

/* O_DIRECT refused the guest buffers' alignment: go through the page-aligned
 * bounce buffer, a chunk at a time (so its size bounds our memory, not the
 * guest's request). Disk.py's _bounced, chunked. */
static int vmm_bounce_rw(struct vmm_blk *blk, uint8_t *bounce, uint64_t blen, struct iovec *iov, uint32_t cnt,
                         uint64_t offset, uint64_t len, int write, uint64_t *done)
{
    if (!bounce || blen < 4096)
        return -EINVAL;
    __atomic_fetch_add(&blk->bounced, 1, __ATOMIC_RELAXED);
    while (*done < len) {
        uint64_t chunk = len - *done < blen ? len - *done : blen;
        uint64_t pos = offset + *done;
        if (write) {
            vmm_iov_copy(&iov, &cnt, bounce, chunk, 0);
            uint64_t w = 0;
            while (w < chunk) {
                ssize_t n = pwrite(blk->fd, bounce + w, chunk - w, (off_t)(pos + w));
                if (n < 0 && errno == EINTR)
                    continue;
                if (n < 0)
                    return -errno;
                if (n == 0)
                    break;
                w += (uint64_t)n;
            }
            *done += w;
            if (w < chunk)
                return 0;
        } else {
            ssize_t n;
            do
                n = pread(blk->fd, bounce, chunk, (off_t)pos);
            while (n < 0 && errno == EINTR);
            if (n < 0)
                return -errno;
            vmm_iov_copy(&iov, &cnt, bounce, (uint64_t)n, 1);
            *done += (uint64_t)n;
            if ((uint64_t)n < chunk)
                return 0;  /* end of file: the caller sees a short transfer */
        }
    }
    return 0;
}

/* Whether O_DIRECT is known to refuse these buffers (blk->mem_align). */
static int vmm_iov_misaligned(const struct vmm_blk *blk, const struct iovec *iov, uint32_t cnt)
{
    uint64_t a = blk->mem_align;
    if (!blk->direct || !a)
        return 0;
    for (uint32_t i = 0; i < cnt; i++)
        if ((uintptr_t)iov[i].iov_base % a || iov[i].iov_len % a)
            return 1;
    return 0;
}

/* Positional vectored I/O until len bytes are done or the file ends, starting
 * from *done (a transfer io_uring left short). Disk._rw: 0 or -errno. */
static int vmm_rw(struct vmm_blk *blk, uint8_t *bounce, uint64_t blen, struct iovec *iov, uint32_t cnt,
                  uint64_t offset, uint64_t len, int write, uint64_t *done)
{
    vmm_iov_advance(&iov, &cnt, *done);
    if (vmm_iov_misaligned(blk, iov, cnt))
        return vmm_bounce_rw(blk, bounce, blen, iov, cnt, offset, len, write, done);
    while (*done < len && cnt) {
        int c = cnt > VMM_IOV_MAX ? VMM_IOV_MAX : (int)cnt;
        ssize_t n = write ? pwritev(blk->fd, iov, c, (off_t)(offset + *done))
                          : preadv(blk->fd, iov, c, (off_t)(offset + *done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EINVAL && blk->direct)
                return vmm_bounce_rw(blk, bounce, blen, iov, cnt, offset, len, write, done);
            return -errno;
        }
        if (n == 0)
            break;
        *done += (uint64_t)n;
        vmm_iov_advance(&iov, &cnt, (uint64_t)n);
    }
    return 0;
}

/* Run one I/O request with blocking syscalls (any thread). */
static void vmm_req_run(struct vmm_blk *blk, uint8_t *bounce, uint64_t blen, struct vmm_req *rq)
{
    if (rq->op == VMM_OP_FLUSH) {
        int r;
        do
            r = fdatasync(blk->fd);
        while (r < 0 && errno == EINTR);
        rq->res = r < 0 ? -errno : 0;
        return;
    }
    rq->res = vmm_rw(blk, bounce, blen, rq->iov, rq->iovcnt, rq->offset, rq->len, rq->op == VMM_OP_WRITE, &rq->done);
}

/* ----- executors: io_uring, a thread pool, or the calling thread -----
 *
 * An executor owns the request slots (as many as the deepest queue: that
 * bounds the requests in flight) and three lists of slot numbers: the free
 * slots (device thread only), the done list, FIFO, of requests whose result
 * is known and that the next vmm_blk_complete() answers, and, for the pool,
 * the FIFO of jobs waiting for a worker. The done list and the jobs are
 * under io->lock for the pool, whose workers push finished requests; for
 * io_uring and synchronous I/O only the device thread touches them.
 *
 * Completion is signalled on io->efd (an eventfd): io_uring writes it for
 * every completion (io_uring_register_eventfd), a pool worker after every
 * job. The device thread polls it and calls vmm_blk_complete(). */

struct vmm_blk_io {
    int kind;
    uint32_t depth;             /* request slots: most requests in flight together */
    int broken;                 /* io_uring failed unexpectedly: run synchronously from now on */
    int efd;                    /* completion eventfd, -1 for synchronous I/O */
#ifdef VMM_HAVE_URING
    struct io_uring ring;
#endif
    uint32_t *unsub;            /* io_uring: slots whose SQEs the kernel has not taken yet, in order */
    uint32_t nunsub;
    struct vmm_req *slots;
    uint32_t *free_slots;
    uint32_t nfree;
    uint32_t *done;             /* ring of depth entries */
    uint32_t done_head, done_n;
    uint32_t *take;             /* vmm_blk_complete()'s copy of the done list */
    uint32_t io_pending;        /* I/O started on the ring or in the pool and not finished */
    uint32_t late_writes;       /* io_uring: writes finished synchronously after their CQE */
    int starved;                /* the last submit left chains posted for want of a free slot */
    uint32_t lazy_min;          /* don't ask for kicks while this many requests are in flight (0: always ask) */
    int lazy_busy;              /* the guest is busy: don't ask for kicks while any request is in flight */
    int armed;                  /* the last submit asked for a kick (avail_event) and found nothing more */
    uint64_t now;               /* CLOCK_MONOTONIC ns of the current submit or complete call */
    uint64_t latency_ns;        /* moving average of request latency, ring to used entry (0: none yet) */
    struct vmm_seg *segs;       /* scratch for walking a chain */
    uint32_t segs_cap;
    /* thread pool */
    pthread_mutex_t lock;
    pthread_cond_t work, idle;
    pthread_t threads[VMM_POOL_MAX];
    uint32_t wanted, nthreads;
    int started, stop;
    struct vmm_blk *blk;        /* the backend jobs run against (set under the lock) */
    uint32_t *jobs;             /* ring of depth entries */
    uint32_t job_head, job_n, running;
    int barrier_running;        /* a FLUSH is running: nothing else starts */
};

static void vmm_io_error(struct vmm_blk *blk, int res)
{
    blk->io_errors++;
    blk->last_errno = -res;
}

static void vmm_efd_signal(int efd)
{
    uint64_t one = 1;
    if (efd >= 0) {
        ssize_t r;
        do
            r = write(efd, &one, sizeof(one));
        while (r < 0 && errno == EINTR);
        /* EAGAIN: the counter is saturated, i.e. already readable. */
    }
}

/* Empty an eventfd (non-blocking): its count is not needed, only that it
 * is no longer readable. */
static void vmm_drain_fd(int fd)
{
    uint64_t v;
    ssize_t r;
    do
        r = read(fd, &v, sizeof(v));
    while (r < 0 && errno == EINTR);
}

/* Put a slot on the done list. Caller holds io->lock for the pool. */
static void vmm_done_push_locked(struct vmm_blk_io *io, uint32_t slot)
{
    io->done[(io->done_head + io->done_n) % io->depth] = slot;
    io->done_n++;
    io->slots[slot].state = VMM_SLOT_DONE;
}

static void vmm_done_push(struct vmm_blk_io *io, uint32_t slot)
{
    if (io->kind == VMM_IO_THREADS) {
        pthread_mutex_lock(&io->lock);
        vmm_done_push_locked(io, slot);
        pthread_mutex_unlock(&io->lock);
    } else {
        vmm_done_push_locked(io, slot);
    }
}

/* A worker may take the head job: none is running a FLUSH, and a FLUSH only
 * starts once everything started before it has finished (a barrier, like
 * io_uring's IOSQE_IO_DRAIN). */
static int vmm_pool_can_take(struct vmm_blk_io *io)
{
    if (!io->job_n || io->barrier_running)
        return 0;
    return io->slots[io->jobs[io->job_head]].op != VMM_OP_FLUSH || io->running == 0;
}

static void *vmm_pool_worker(void *arg)
{
    struct vmm_blk_io *io = arg;
    uint8_t *bounce = NULL;  /* this thread's own, so bounced transfers need no lock */
    const uint64_t blen = 1 << 20;
    pthread_mutex_lock(&io->lock);
    for (;;) {
        while (!io->stop && !vmm_pool_can_take(io))
            pthread_cond_wait(&io->work, &io->lock);
        if (io->stop)
            break;
        uint32_t slot = io->jobs[io->job_head];
        io->job_head = (io->job_head + 1) % io->depth;
        io->job_n--;
        struct vmm_req *rq = &io->slots[slot];
        int barrier = rq->op == VMM_OP_FLUSH;
        io->running++;
        if (barrier)
            io->barrier_running = 1;
        struct vmm_blk *blk = io->blk;
        pthread_mutex_unlock(&io->lock);
        if (blk->direct && !bounce && posix_memalign((void **)&bounce, 4096, blen))
            bounce = NULL;
        if (blk->pool_delay_ns) {
            struct timespec d = {(time_t)(blk->pool_delay_ns / 1000000000ull), (long)(blk->pool_delay_ns % 1000000000ull)};
            while (nanosleep(&d, &d) && errno == EINTR)
                ;
        }
        vmm_req_run(blk, bounce, bounce ? blen : 0, rq);
        pthread_mutex_lock(&io->lock);
        io->running--;
        if (barrier)
            io->barrier_running = 0;
        vmm_done_push_locked(io, slot);
        io->io_pending--;
        if (io->job_n)
            pthread_cond_broadcast(&io->work);  /* a FLUSH may wait for running == 0 */
        if (!io->io_pending)
            pthread_cond_broadcast(&io->idle);
        vmm_efd_signal(io->efd);
    }
    pthread_mutex_unlock(&io->lock);
    free(bounce);
    return NULL;
}

/* Start the pool from the device thread on first use, so that the workers
 * inherit that thread's seccomp filter (design contract 2: the filter is
 * installed per role when a vmmkit thread starts, and a clone keeps it).
 * Workers block every signal: signals are for the interpreter's threads. */
static void vmm_pool_start(struct vmm_blk_io *io)
{
    io->started = 1;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (uint32_t i = 0; i < io->wanted; i++) {
        if (pthread_create(&io->threads[io->nthreads], NULL, vmm_pool_worker, io))
            break;
        pthread_setname_np(io->threads[io->nthreads], "vmmkit-blk-io");
        io->nthreads++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

#ifdef VMM_HAVE_URING
/* Take one CQE's result. Transfers io_uring left short, or O_DIRECT refused
 * (EINVAL: misaligned), are finished here synchronously, like Disk._rw. */
static void vmm_uring_reap_one(struct vmm_blk_io *io, struct vmm_blk *blk, struct io_uring_cqe *cqe)
{
    uint64_t slot = io_uring_cqe_get_data64(cqe);
    int32_t res = cqe->res;
    if (slot >= io->depth || io->slots[slot].state != VMM_SLOT_URING)
        return;  /* cannot happen: every SQE carries its slot */
    struct vmm_req *rq = &io->slots[slot];
    if (rq->op == VMM_OP_FLUSH) {
        rq->res = res < 0 ? res : 0;
    } else if (res == -EINVAL && blk->direct) {
        rq->done = 0;
        vmm_req_run(blk, blk->bounce, blk->bounce_len, rq);  /* retries, then bounces */
        if (rq->op == VMM_OP_WRITE)
            io->late_writes++;
    } else if (res < 0) {
        rq->res = res;
    } else {
        rq->done = (uint64_t)res;
        rq->res = 0;
        if (res > 0 && rq->done < rq->len) {  /* short: carry on like Disk._rw */
            vmm_req_run(blk, blk->bounce, blk->bounce_len, rq);
            if (rq->op == VMM_OP_WRITE)
                io->late_writes++;
        }
    }
    io->io_pending--;
    vmm_done_push_locked(io, (uint32_t)slot);
}

/* Move every finished CQE to the done list, without entering the kernel. */
static void vmm_uring_reap(struct vmm_blk_io *io, struct vmm_blk *blk)
{
    struct io_uring_cqe *cqe;
    while (io_uring_peek_cqe(&io->ring, &cqe) == 0) {
        vmm_uring_reap_one(io, blk, cqe);
        io_uring_cqe_seen(&io->ring, cqe);
    }
}

/* Hand the prepared SQEs to the kernel. If the ring fails for good, what it
 * never took runs synchronously (the ring is never entered again). */
static void vmm_uring_flush(struct vmm_blk_io *io, struct vmm_blk *blk)
{
    int tries = 0;
    while (io->nunsub && !io->broken) {
        int r = io_uring_submit(&io->ring);
        if (r > 0) {
            uint32_t n = (uint32_t)r < io->nunsub ? (uint32_t)r : io->nunsub;
            memmove(io->unsub, io->unsub + n, sizeof(*io->unsub) * (io->nunsub - n));
            io->nunsub -= n;
            tries = 0;
        } else if ((r == 0 || r == -EINTR || r == -EAGAIN || r == -EBUSY) && ++tries < 1000) {
            vmm_uring_reap(io, blk);  /* room may come with completions */
            sched_yield();
        } else {
            io->broken = 1;
        }
    }
    if (io->broken && io->nunsub) {
        for (uint32_t k = 0; k < io->nunsub; k++) {
            struct vmm_req *rq = &io->slots[io->unsub[k]];
            vmm_req_run(blk, blk->bounce, blk->bounce_len, rq);
            io->io_pending--;
            vmm_done_push_locked(io, io->unsub[k]);
        }
        io->nunsub = 0;
    }
}
#endif

/* Start the I/O of a request in a taken slot, or run it now. */
static void vmm_start_io(struct vmm_blk_io *io, struct vmm_blk *blk, uint32_t slot)
{
    struct vmm_req *rq = &io->slots[slot];
#ifdef VMM_HAVE_URING
    if (io->kind == VMM_IO_URING && !io->broken) {
        int sync = rq->iovcnt > VMM_IOV_MAX || (rq->op != VMM_OP_FLUSH && vmm_iov_misaligned(blk, rq->iov, rq->iovcnt));
        struct io_uring_sqe *sqe = NULL;
        if (!sync) {
            sqe = io_uring_get_sqe(&io->ring);
            if (!sqe) {
                vmm_uring_flush(io, blk);
                sqe = io->broken ? NULL : io_uring_get_sqe(&io->ring);
            }
        }
        if (sqe) {
            if (rq->op == VMM_OP_READ) {
                io_uring_prep_readv(sqe, blk->fd, rq->iov, rq->iovcnt, rq->offset);
            } else if (rq->op == VMM_OP_WRITE) {
                io_uring_prep_writev(sqe, blk->fd, rq->iov, rq->iovcnt, rq->offset);
            } else {
                /* Starts once everything submitted before it completed, and
                 * what comes after starts once it completed. */
                io_uring_prep_fsync(sqe, blk->fd, IORING_FSYNC_DATASYNC);
                sqe->flags |= IOSQE_IO_DRAIN;
                rq->gen = io->late_writes;
            }
            io_uring_sqe_set_data64(sqe, slot);
            rq->state = VMM_SLOT_URING;
            io->unsub[io->nunsub++] = slot;
            io->io_pending++;
            return;
        }
    }
#endif
    if (io->kind == VMM_IO_THREADS) {
        if (!io->started)
            vmm_pool_start(io);
        if (io->nthreads) {
            pthread_mutex_lock(&io->lock);
            io->blk = blk;
            io->jobs[(io->job_head + io->job_n) % io->depth] = slot;
            io->job_n++;
            io->io_pending++;
            rq->state = VMM_SLOT_POOL;
            pthread_cond_signal(&io->work);
            pthread_mutex_unlock(&io->lock);
            return;
        }
    }
    vmm_req_run(blk, blk->bounce, blk->bounce_len, rq);
    vmm_done_push(io, slot);
}

/* Wait until every I/O started has finished (it is then on the done list,
 * answered by the next vmm_blk_complete()). Blocks the calling thread. */
static void vmm_blk_wait(struct vmm_blk_io *io, struct vmm_blk *blk)
{
    if (!io)
        return;
#ifdef VMM_HAVE_URING
    if (io->kind == VMM_IO_URING) {
        vmm_uring_flush(io, blk);
        while (io->io_pending) {
            struct io_uring_cqe *cqe;
            int r = io_uring_wait_cqe(&io->ring, &cqe);
            if (r == 0) {
                vmm_uring_reap_one(io, blk, cqe);
                io_uring_cqe_seen(&io->ring, cqe);
                continue;
            }
            if (r == -EINTR || r == -EAGAIN || r == -EBUSY)
                continue;
            /* Cannot happen with a CQ ring twice the slots; give up on the
             * ring and answer what is still in flight with an I/O error. */
            io->broken = 1;
            for (uint32_t s = 0; s < io->depth; s++)
                if (io->slots[s].state == VMM_SLOT_URING) {
                    io->slots[s].res = -EIO;
                    vmm_done_push_locked(io, s);
                }
            io->io_pending = 0;
        }
        return;
    }
#endif
    if (io->kind == VMM_IO_THREADS) {
        pthread_mutex_lock(&io->lock);
        while (io->io_pending)
            pthread_cond_wait(&io->idle, &io->lock);
        pthread_mutex_unlock(&io->lock);
    }
}

/* Create an executor: VMM_IO_URING, VMM_IO_THREADS (threads workers,
 * started on first use), or VMM_IO_SYNC, with depth request slots. NULL with
 * *err = errno when the kernel refuses io_uring (ENOSYS, EPERM under seccomp
 * or io_uring_disabled, ENOMEM under a low RLIMIT_MEMLOCK) or it was built
 * without liburing (EOPNOTSUPP). */
static void vmm_blk_io_free(struct vmm_blk_io *io);

static struct vmm_blk_io *vmm_blk_io_new(int kind, uint32_t depth, uint32_t threads, int *err)
{
    *err = 0;
    if (kind != VMM_IO_SYNC && kind != VMM_IO_URING && kind != VMM_IO_THREADS) {
        *err = EINVAL;
        return NULL;
    }
#ifndef VMM_HAVE_URING
    if (kind == VMM_IO_URING) {
        *err = EOPNOTSUPP;
        return NULL;
    }
#endif
    if (depth > VMM_MAX_QUEUE)
        depth = VMM_MAX_QUEUE;
    struct vmm_blk_io *io = calloc(1, sizeof(*io));
    if (!io) {
        *err = ENOMEM;
        return NULL;
    }
    io->kind = kind;
    io->efd = -1;
    io->depth = depth ? depth : 1;
    pthread_mutex_init(&io->lock, NULL);
    pthread_cond_init(&io->work, NULL);
    pthread_cond_init(&io->idle, NULL);
    io->slots = calloc(io->depth, sizeof(*io->slots));
    io->free_slots = calloc(io->depth, sizeof(uint32_t));
    io->done = calloc(io->depth, sizeof(uint32_t));
    io->take = calloc(io->depth, sizeof(uint32_t));
    io->jobs = calloc(io->depth, sizeof(uint32_t));
    io->unsub = calloc(io->depth, sizeof(uint32_t));
    if (!io->slots || !io->free_slots || !io->done || !io->take || !io->jobs || !io->unsub) {
        *err = ENOMEM;
        vmm_blk_io_free(io);
        return NULL;
    }
    for (uint32_t i = 0; i < io->depth; i++)
        io->free_slots[i] = io->depth - 1 - i;  /* slot 0 is taken first */
    io->nfree = io->depth;
    if (kind != VMM_IO_SYNC) {
        io->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (io->efd < 0) {
            *err = errno;
            vmm_blk_io_free(io);
            return NULL;
        }
    }
#ifdef VMM_HAVE_URING
    if (kind == VMM_IO_URING) {
        struct io_uring_params p;
        memset(&p, 0, sizeof(p));
        p.flags = IORING_SETUP_SUBMIT_ALL | IORING_SETUP_CQSIZE;
        p.cq_entries = 2 * io->depth;
        int r = io_uring_queue_init_params(io->depth, &io->ring, &p);
        if (r == -EINVAL) {  /* kernels before 5.18 know no SUBMIT_ALL */
            memset(&p, 0, sizeof(p));
            p.flags = IORING_SETUP_CQSIZE;
            p.cq_entries = 2 * io->depth;
            r = io_uring_queue_init_params(io->depth, &io->ring, &p);
        }
        if (r < 0) {
            *err = -r;
            io->kind = VMM_IO_SYNC;  /* no ring to tear down */
            vmm_blk_io_free(io);
            return NULL;
        }
        r = io_uring_register_eventfd(&io->ring, io->efd);
        if (r < 0) {
            *err = -r;
            vmm_blk_io_free(io);
            return NULL;
        }
    }
#endif
    if (kind == VMM_IO_THREADS)
        io->wanted = threads > VMM_POOL_MAX ? VMM_POOL_MAX : threads;
    return io;
}

static int vmm_blk_io_kind(struct vmm_blk_io *io)
{
    return io ? io->kind : VMM_IO_SYNC;
}

/* The completion eventfd to poll (-1 for synchronous I/O: everything is done
 * by the time vmm_blk_submit() returns). */
static int vmm_blk_io_eventfd(struct vmm_blk_io *io)
{
    return io ? io->efd : -1;
}

/* Requests taken from the queue and not answered yet. */
static uint32_t vmm_blk_inflight(struct vmm_blk_io *io)
{
    return io ? io->depth - io->nfree : 0;
}

static int vmm_have_uring(void)
{
#ifdef VMM_HAVE_URING
    return 1;
#else
    return 0;
#endif
}

/* Release an executor. Only once no other call uses it, and after
 * vmm_blk_wait() + vmm_blk_complete() answered what was in flight; what
 * might still run is waited for (never freed under the kernel's feet). */
static void vmm_blk_io_free(struct vmm_blk_io *io)
{
    if (!io)
        return;
#ifdef VMM_HAVE_URING
    if (io->kind == VMM_IO_URING) {
        uint32_t running = io->io_pending - (io->nunsub < io->io_pending ? io->nunsub : io->io_pending);
        struct io_uring_cqe *cqe;
        while (running && !io->broken && io_uring_wait_cqe(&io->ring, &cqe) == 0) {
            io_uring_cqe_seen(&io->ring, cqe);
            running--;
        }
        io_uring_queue_exit(&io->ring);
    }
#endif
    if (io->kind == VMM_IO_THREADS) {
        pthread_mutex_lock(&io->lock);
        io->stop = 1;
        pthread_cond_broadcast(&io->work);
        pthread_mutex_unlock(&io->lock);
        for (uint32_t i = 0; i < io->nthreads; i++)
            pthread_join(io->threads[i], NULL);
    }
    pthread_cond_destroy(&io->idle);
    pthread_cond_destroy(&io->work);
    pthread_mutex_destroy(&io->lock);
    if (io->efd >= 0)
        close(io->efd);
    if (io->slots)
        for (uint32_t i = 0; i < io->depth; i++) {
            free(io->slots[i].iov);
            free(io->slots[i].ioreg);
        }
    free(io->slots);
    free(io->free_slots);
    free(io->done);
    free(io->take);
    free(io->jobs);
    free(io->unsub);
    free(io->segs);
    free(io);
}

/* ----- virtio-blk ----- */

/* CLOCK_MONOTONIC in nanoseconds (the vDSO: no system call). */
static uint64_t vmm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

struct vmm_ctx {
    struct vmm_q q;
    struct vmm_blk *blk;
    struct vmm_blk_io *io;
    struct vmm_seg *segs;
};

/* The byte offset of a transfer, or -1 unless it is whole sectors inside the
 * disk (VirtioBlk._range). No multiplication can overflow: sector <= sectors. */
static int vmm_blk_range(const struct vmm_blk *blk, uint64_t sector, uint64_t length, uint64_t *offset)
{
    if (length % VMM_SECTOR)
        return -1;
    if (sector > blk->sectors || length / VMM_SECTOR > blk->sectors - sector)
        return -1;
    *offset = sector * VMM_SECTOR;
    return 0;
}

static int vmm_fallocate_range(int fd, int mode, uint64_t offset, uint64_t len)
{
    if (len == 0)
        return 0;  /* fallocate refuses len 0; an empty range has nothing to do */
    return fallocate(fd, mode, (off_t)offset, (off_t)len) == 0 ? 0 : -errno;
}

/* Disk.write_zeroes: punch (if unmap may), else zero-range, else write zeros. */
static int vmm_write_zeroes(struct vmm_blk *blk, uint64_t offset, uint64_t len, int unmap)
{
    static const uint8_t zeros[1 << 16] __attribute__((aligned(4096)));
    if (len == 0)
        return 0;
    int r;
    if (unmap) {
        r = vmm_fallocate_range(blk->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len);
        if (r == 0)
            return 0;
        if (r != -EOPNOTSUPP && r != -ENOSYS)
            return r;
    }
    r = vmm_fallocate_range(blk->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, len);
    if (r == 0)
        return 0;
    if (r != -EOPNOTSUPP && r != -ENOSYS && r != -EINVAL)
        return r;
    /* The file system can do neither: write the zeros. */
    const uint8_t *src = zeros;
    uint64_t chunk = sizeof(zeros);
    if (blk->direct && blk->bounce && blk->bounce_len >= 4096) {
        memset(blk->bounce, 0, blk->bounce_len);
        src = blk->bounce;
        chunk = blk->bounce_len;
    }
    for (uint64_t pos = 0; pos < len;) {
        uint64_t n = len - pos < chunk ? len - pos : chunk;
        struct iovec v = {(void *)src, n};
        uint64_t done = 0;
        r = vmm_rw(blk, blk->bounce, blk->bounce_len, &v, 1, offset + pos, n, 1, &done);
        if (r < 0)
            return r;
        if (done < n)
            return -EIO;
        pos += n;
    }
    return 0;
}

/* VirtioBlk._discard_or_zero: every segment is checked before any is acted on. */
static uint8_t vmm_blk_discard(struct vmm_ctx *x, const struct vmm_chain *c, uint32_t rtype, uint64_t data_out)
{
    struct vmm_blk *blk = x->blk;
    if (blk->read_only)
        return VMM_BLK_S_IOERR;
    if (data_out == 0 || data_out % VMM_BLK_SEGMENT || data_out / VMM_BLK_SEGMENT > VMM_BLK_MAX_DISCARD_SEG)
        return VMM_BLK_S_UNSUPP;
    uint8_t raw[VMM_BLK_SEGMENT * VMM_BLK_MAX_DISCARD_SEG];
    vmm_segs_read(x->segs, c->nr, VMM_BLK_HEADER, raw, data_out);
    uint32_t nseg = (uint32_t)(data_out / VMM_BLK_SEGMENT);
    uint64_t sector[VMM_BLK_MAX_DISCARD_SEG];
    uint32_t count[VMM_BLK_MAX_DISCARD_SEG], flags[VMM_BLK_MAX_DISCARD_SEG];
    uint32_t allowed = rtype == VMM_BLK_T_WRITE_ZEROES ? VMM_BLK_WZ_F_UNMAP : 0;
    for (uint32_t i = 0; i < nseg; i++) {
        memcpy(&sector[i], raw + 16 * i, 8);
        memcpy(&count[i], raw + 16 * i + 8, 4);
        memcpy(&flags[i], raw + 16 * i + 12, 4);
        uint64_t offset;
        if (count[i] > VMM_BLK_MAX_DISCARD_SECTORS)
            return VMM_BLK_S_IOERR;
        if (vmm_blk_range(blk, sector[i], (uint64_t)count[i] * VMM_SECTOR, &offset))
            return VMM_BLK_S_IOERR;
        if (flags[i] & ~allowed)
            return VMM_BLK_S_UNSUPP;
    }
    /* Whatever was taken before this request has finished first. */
    vmm_blk_wait(x->io, x->blk);
    for (uint32_t i = 0; i < nseg; i++) {
        uint64_t offset = sector[i] * VMM_SECTOR, len = (uint64_t)count[i] * VMM_SECTOR;
        int r = rtype == VMM_BLK_T_DISCARD
                    ? vmm_fallocate_range(blk->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len)
                    : vmm_write_zeroes(blk, offset, len, flags[i] & VMM_BLK_WZ_F_UNMAP);
        if (r < 0) {
            vmm_io_error(blk, r);
            return VMM_BLK_S_IOERR;
        }
    }
    return VMM_BLK_S_OK;
}

/* Turn a walked chain into a request in a free slot (VirtioBlk.handle_chain
 * and _serve) and start its I/O, or answer it at once. Returns -1 only for
 * the protocol violation: no status byte. */
static int vmm_blk_parse(struct vmm_ctx *x, const struct vmm_chain *c, char *err, size_t errlen)
{
    struct vmm_blk *blk = x->blk;
    struct vmm_blk_io *io = x->io;
    const struct vmm_seg *segs = x->segs, *wsegs = x->segs + c->nr;
    if (c->wlen == 0)
        return vmm_fail(err, errlen, "request at head %u has no writable status byte", c->head);
    uint64_t data_in = c->wlen - 1;  /* bytes before the status byte */
    uint32_t slot = io->free_slots[--io->nfree];
    uint32_t inflight = io->depth - io->nfree;
    if (inflight > blk->max_inflight)
        blk->max_inflight = inflight;
    blk->started++;
    blk->inflight_sum += inflight;
    struct vmm_req *rq = &io->slots[slot];
    const struct vmm_seg *last = &wsegs[c->nw - 1];
    struct iovec *iov = rq->iov;
    struct vmm_ioreg *ioreg = rq->ioreg;
    uint32_t iov_cap = rq->iov_cap;
    memset(rq, 0, sizeof(*rq));
    rq->iov = iov;
    rq->ioreg = ioreg;
    rq->iov_cap = iov_cap;
    rq->state = VMM_SLOT_TAKEN;
    rq->t_start = io->now;
    rq->head = c->head;
    rq->op = VMM_OP_DONE;
    rq->status = VMM_BLK_S_IOERR;
    rq->status_host = last->host + last->len - 1;
    rq->status_r = last->r;
    rq->status_off = last->off + last->len - 1;
    if (c->rlen < VMM_BLK_HEADER)
        goto done;
    uint8_t hdr[VMM_BLK_HEADER];
    vmm_segs_read(segs, c->nr, 0, hdr, VMM_BLK_HEADER);
    uint32_t rtype;
    uint64_t sector, offset;
    memcpy(&rtype, hdr, 4);
    memcpy(&sector, hdr + 8, 8);
    uint64_t data_out = c->rlen - VMM_BLK_HEADER;
    switch (rtype) {
    case VMM_BLK_T_IN:
    case VMM_BLK_T_OUT: {
        int write = rtype == VMM_BLK_T_OUT;
        uint64_t len = write ? data_out : data_in;
        if (write && blk->read_only)
            goto done;
        if (vmm_blk_range(blk, sector, len, &offset))
            goto done;
        if (len == 0) {
            rq->status = VMM_BLK_S_OK;
            goto done;
        }
        uint32_t need = write ? c->nr : c->nw;
        if (need > rq->iov_cap) {
            struct iovec *ni = realloc(rq->iov, sizeof(*ni) * need);
            if (ni)
                rq->iov = ni;
            struct vmm_ioreg *nr = realloc(rq->ioreg, sizeof(*nr) * need);
            if (nr)
                rq->ioreg = nr;
            if (!ni || !nr) {
                vmm_io_error(blk, -ENOMEM);
                goto done;
            }
            rq->iov_cap = need;
        }
        rq->op = write ? VMM_OP_WRITE : VMM_OP_READ;
        rq->offset = offset;
        rq->len = len;
        rq->iovcnt = write ? vmm_segs_slice(segs, c->nr, VMM_BLK_HEADER, len, rq->iov, rq->ioreg)
                           : vmm_segs_slice(wsegs, c->nw, 0, len, rq->iov, rq->ioreg);
        blk->rw_requests++;
        blk->rw_segments += rq->iovcnt;
        vmm_start_io(io, blk, slot);
        return 0;
    }
    case VMM_BLK_T_FLUSH:
        rq->op = VMM_OP_FLUSH;
        vmm_start_io(io, blk, slot);
        return 0;
    case VMM_BLK_T_GET_ID: {
        uint64_t n = data_in < VMM_BLK_ID_BYTES ? data_in : VMM_BLK_ID_BYTES;
        rq->written = vmm_segs_write(x->q.mem, wsegs, c->nw, 0, blk->serial, n);
        rq->status = VMM_BLK_S_OK;
        goto done;
    }
    case VMM_BLK_T_DISCARD:
    case VMM_BLK_T_WRITE_ZEROES:
        rq->status = vmm_blk_discard(x, c, rtype, data_out);
        goto done;
    default:
        rq->status = VMM_BLK_S_UNSUPP;
        goto done;
    }
done:
    vmm_done_push(io, slot);
    return 0;
}

/* The driver's used_event (VIRTIO_RING_F_EVENT_IDX): interrupt me once used.idx passes it. */
static uint16_t vmm_q_used_event(const struct vmm_q *q)
{
    return __atomic_load_n((const uint16_t *)(q->avail + 4 + 2ull * q->size), __ATOMIC_RELAXED);
}

/* The event-index test (virtio 1.x, 2.7.10): whether moving used.idx from
 * *old* to *new_idx* passed the driver's *event*. */
static int vmm_need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* Whether the driver wants an interrupt for what was used since the last
 * decision (Virtqueue.needs_interrupt). The full fence orders the used.idx
 * store before the load of used_event / avail.flags. */
static int vmm_q_needs_interrupt(struct vmm_q *q)
{
    struct vmm_vq *vq = q->vq;
    uint16_t new_idx = vq->next_used, old = vq->signalled_used;
    vq->signalled_used = new_idx;
    if (new_idx == old)
        return 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (vq->event_idx) {
        return vmm_need_event(vmm_q_used_event(q), new_idx, old);
    }
    return !(__atomic_load_n((const uint16_t *)q->avail, __ATOMIC_RELAXED) & VMM_AVAIL_F_NO_INTERRUPT);
}

/* Take every chain posted on the queue, up to the free request slots: check
 * each as the Python path does, start its I/O without waiting (or answer it
 * at once: errors, GET_ID, DISCARD and WRITE_ZEROES), re-arm avail_event and
 * look again until the driver posts nothing more. Nothing is answered here:
 * vmm_blk_complete() writes the used ring. Returns 0, or -1 when the driver
 * broke the protocol (err says how; the device must go to NEEDS_RESET): then
 * every I/O started has finished before it returns, so that the next
 * vmm_blk_complete() answers all the chains taken before the bad one. */
static int vmm_blk_submit(struct vmm_mem *mem, struct vmm_vq *vq, struct vmm_blk *blk, struct vmm_blk_io *io,
                          char *err, size_t errlen)
{
    if (err && errlen)
        err[0] = 0;
    if (!mem || !vq || !blk || !io)
        return vmm_fail(err, errlen, "internal error: missing memory, queue, backend or executor");
    struct vmm_ctx x;
    memset(&x, 0, sizeof(x));
    if (vmm_q_setup(&x.q, mem, vq, err, errlen))
        return -1;
    x.blk = blk;
    x.io = io;
    uint32_t size = x.q.size;
    if (io->segs_cap < size) {
        struct vmm_seg *s = realloc(io->segs, sizeof(*s) * size);
        if (!s)
            return vmm_fail(err, errlen, "internal error: out of memory for a queue of %u", size);
        io->segs = s;
        io->segs_cap = size;
    }
    x.segs = io->segs;
    io->starved = 0;
    io->armed = 0;
    io->now = vmm_now_ns();
    int rc = 0;
    while (!rc && !io->starved) {
        uint32_t pending;
        if (vmm_q_pending(&x.q, &pending, err, errlen)) {
            rc = -1;
            break;
        }
        if (!pending) {
            /* With enough requests in flight, their completions bring us back
             * here soon: no kick is needed, and each costs the guest an exit. */
            if (vq->event_idx && ((io->lazy_min && vmm_blk_inflight(io) >= io->lazy_min)
                                  || (io->lazy_busy && vmm_blk_inflight(io))))
                break;
            /* Ask for a notification past what was taken, then look again:
             * a driver that posted meanwhile may have read the old value. */
            if (vq->event_idx) {
                __atomic_store_n((uint16_t *)(x.q.used + 4 + 8ull * size), vq->next_avail, __ATOMIC_RELAXED);
                vmm_mark(mem, x.q.used_r, x.q.used_off + 4 + 8ull * size, 2);
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
            }
            if (vmm_q_pending(&x.q, &pending, err, errlen)) {
                rc = -1;
                break;
            }
            if (!pending) {
                io->armed = 1;
                break;
            }
        }
        for (; pending; pending--) {
            if (!io->nfree) {
                /* Every slot is in flight: vmm_blk_complete() says when to come back. */
                io->starved = 1;
                break;
            }
            uint16_t head = vmm_q_avail_head(&x.q, 0);
            vq->next_avail++;
            struct vmm_chain c;
            if (vmm_q_walk(&x.q, head, x.segs, &c, err, errlen) || vmm_blk_parse(&x, &c, err, errlen)) {
                rc = -1;
                break;
            }
        }
    }
#ifdef VMM_HAVE_URING
    if (io->kind == VMM_IO_URING)
        vmm_uring_flush(io, blk);
#endif
    if (rc)
        vmm_blk_wait(io, blk);
    return rc;
}

/* Answer every request whose result is known, in the order they finished:
 * status byte and used entry each, then used.idx once (release). Never
 * blocks. Returns -1 if the rings are no longer in guest RAM (the finished
 * requests are then dropped: nobody can be told), else a bit mask: 1 if the
 * driver wants an interrupt, 2 if chains are waiting for a free slot (call
 * vmm_blk_submit() again). */
static int vmm_blk_complete(struct vmm_mem *mem, struct vmm_vq *vq, struct vmm_blk *blk, struct vmm_blk_io *io,
                            char *err, size_t errlen)
{
    if (err && errlen)
        err[0] = 0;
    if (!mem || !vq || !blk || !io)
        return vmm_fail(err, errlen, "internal error: missing memory, queue, backend or executor");
    /* Consume the signal before reaping: a completion after the reap
     * signals again, so none is missed. */
    if (io->efd >= 0)
        vmm_drain_fd(io->efd);
#ifdef VMM_HAVE_URING
    if (io->kind == VMM_IO_URING)
        vmm_uring_reap(io, blk);
#endif
    uint32_t n;
    if (io->kind == VMM_IO_THREADS)
        pthread_mutex_lock(&io->lock);
    n = io->done_n;
    for (uint32_t i = 0; i < n; i++)
        io->take[i] = io->done[(io->done_head + i) % io->depth];
    io->done_head = (io->done_head + n) % io->depth;
    io->done_n = 0;
    if (io->kind == VMM_IO_THREADS)
        pthread_mutex_unlock(&io->lock);

    struct vmm_q q;
    int bad = vmm_q_setup(&q, mem, vq, err, errlen);
    io->now = vmm_now_ns();
    for (uint32_t i = 0; i < n; i++) {
        uint32_t slot = io->take[i];
        struct vmm_req *rq = &io->slots[slot];
        /* An average over about the last 8 requests: what the serving loop
         * may delay an interrupt by is a small fraction of it. */
        int64_t lat = (int64_t)(io->now - rq->t_start);
        io->latency_ns = io->latency_ns ? (uint64_t)((int64_t)io->latency_ns + (lat - (int64_t)io->latency_ns) / 8)
                                        : (uint64_t)lat;
        if (!bad) {
            if (rq->op == VMM_OP_READ) {
                /* Mark what landed, even on a short or failed read: it is in guest memory now. */
                vmm_ioreg_mark(mem, rq->ioreg, rq->iovcnt, rq->done);
            }
            if (rq->op == VMM_OP_FLUSH && rq->res == 0 && io->kind == VMM_IO_URING && rq->gen != io->late_writes) {
                /* A write before this FLUSH was finished synchronously after
                 * its CQE, maybe after the fsync ran: make it durable too. */
                vmm_req_run(blk, blk->bounce, blk->bounce_len, rq);
            }
            if (rq->op != VMM_OP_DONE) {
                if (rq->res < 0) {
                    vmm_io_error(blk, rq->res);
                    rq->status = VMM_BLK_S_IOERR;
                } else if (rq->op != VMM_OP_FLUSH && rq->done != rq->len) {
                    rq->status = VMM_BLK_S_IOERR;  /* short transfer: the image shrank? */
                } else {
                    rq->status = VMM_BLK_S_OK;
                    rq->written = rq->op == VMM_OP_READ ? rq->len : 0;
                }
            }
            __atomic_store_n(rq->status_host, rq->status, __ATOMIC_RELAXED);
            vmm_mark(mem, rq->status_r, rq->status_off, 1);
            uint64_t used_len = rq->written + 1;
            uint32_t us = vq->next_used % q.size;
            uint32_t *elem = (uint32_t *)(q.used + 4 + 8ull * us);
            __atomic_store_n(&elem[0], (uint32_t)rq->head, __ATOMIC_RELAXED);
            __atomic_store_n(&elem[1], used_len > UINT32_MAX ? UINT32_MAX : (uint32_t)used_len, __ATOMIC_RELAXED);
            vmm_mark(mem, q.used_r, q.used_off + 4 + 8ull * us, 8);
            vq->next_used++;
        }
        rq->state = VMM_SLOT_FREE;
        io->free_slots[io->nfree++] = slot;
    }
    if (bad)
        return -1;
    if (n) {
        /* Release: the driver that sees the new used.idx sees the entries,
         * the status bytes and the data (virtio 2.7.13.3). */
        __atomic_store_n((uint16_t *)(q.used + 2), vq->next_used, __ATOMIC_RELEASE);
        vmm_mark(mem, q.used_r, q.used_off + 2, 2);
        blk->requests += n;
    }
    int rc = vmm_q_needs_interrupt(&q);
    if (io->starved && io->nfree)
        rc |= 2;
    return rc;
}
