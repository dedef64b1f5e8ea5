/*
 * Conformance of blkif's TypeScript codecs and ring with Xen's genuine headers
 * (/usr/include/xen/io/blkif.h and ring.h from Debian's libxen-dev), for the ABI this file is
 * compiled for (-m64: x86_64-abi, -m32: x86_32-abi). Run by test/conformance/blkif-conformance.test.ts.
 *
 *   blkif_conformance gen ORDER SEED RING_FILE INDIRECT_FILE
 *     fills a ring of 2^ORDER pages with requests of every kind (valid and invalid) and responses
 *     at free-running indexes that wrap past 2^32, and 8 indirect pages with 4096 segments, using
 *     the header's structs and RING_GET_REQUEST/RING_GET_RESPONSE; prints what it wrote, one
 *     record a line.
 *   blkif_conformance check ORDER RING_FILE INDIRECT_FILE < records
 *     reads records in the same format and checks each against the files through the header's
 *     structs; prints "ok N" or the mismatches (exit 1).
 *
 * Records:
 *   abi NAME ENTRY_SIZE
 *   header REQ_PROD REQ_EVENT RSP_PROD RSP_EVENT RING_SIZE
 *   rw IDX OP NSEG HANDLE ID SECTOR (GREF FIRST LAST) x NSEG
 *   badrw IDX OP NSEG ID                      (nr_segments over the limit: only id/op readable)
 *   discard IDX FLAG HANDLE ID SECTOR NR_SECTORS
 *   indirect IDX IOP NSEG HANDLE ID SECTOR NPAGES GREF x NPAGES
 *   other IDX OP ID
 *   rsp IDX ID OP STATUS
 *   iseg J GREF FIRST LAST
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define mb() __sync_synchronize()
#define rmb() __sync_synchronize()
#define wmb() __sync_synchronize()
#include <xen/io/blkif.h>

#define INDIRECT_BYTES (BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * 4096)
#define SEGS_PER_PAGE (4096 / sizeof(struct blkif_request_segment))

static uint64_t rng_state;
static uint64_t next64(void) /* splitmix64 */
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static unsigned below(unsigned n) { return (unsigned)(next64() % n); }

static unsigned char *ring_mem;
static unsigned char indirect_mem[INDIRECT_BYTES];
static struct blkif_front_ring front;
static size_t ring_bytes;

static void setup(unsigned order)
{
    ring_bytes = (size_t)4096 << order;
    ring_mem = aligned_alloc(4096, ring_bytes);
    memset(ring_mem, 0, ring_bytes);
    FRONT_RING_INIT(&front, (struct blkif_sring *)ring_mem, ring_bytes);
}

static void write_file(const char *path, const void *buf, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, n, f) != n || fclose(f)) { perror(path); exit(2); }
}
static void read_file(const char *path, void *buf, size_t n)
{
    FILE *f = fopen(path, "rb");
    if (!f || fread(buf, 1, n, f) != n) { perror(path); exit(2); }
    fclose(f);
}

static const char *abi_name(void)
{
#ifdef __i386__
    return "x86_32-abi";
#else
    return "x86_64-abi";
#endif
}

static int gen(unsigned order, uint64_t seed, const char *ring_path, const char *ind_path)
{
    setup(order);
    rng_state = seed;
    struct blkif_sring *s = front.sring;
    unsigned size = RING_SIZE(&front);
    /* Indexes just below 2^32 so the outstanding window wraps past zero. */
    RING_IDX rsp_prod = 0xFFFFFFFFu - below(2 * size);
    unsigned nreq = 1 + below(size);
    unsigned nrsp = below(size - nreq + 1);
    RING_IDX req_prod = rsp_prod + nreq;
    s->req_prod = req_prod;
    s->rsp_prod = rsp_prod;
    s->req_event = (RING_IDX)next64();
    s->rsp_event = (RING_IDX)next64();
    printf("abi %s %u\n", abi_name(), (unsigned)sizeof(union blkif_sring_entry));
    printf("header %u %u %u %u %u\n", s->req_prod, s->req_event, s->rsp_prod, s->rsp_event, size);

    for (RING_IDX i = rsp_prod; i != req_prod; i++) {
        blkif_request_t *r = RING_GET_REQUEST(&front, i);
        memset(r, 0, sizeof(union blkif_sring_entry));
        unsigned kind = below(6);
        uint64_t id = next64(), sector = next64();
        if (kind <= 1) { /* read/write/barrier/flush with 1..11 segments */
            r->operation = below(4);
            r->nr_segments = 1 + below(BLKIF_MAX_SEGMENTS_PER_REQUEST);
            r->handle = (blkif_vdev_t)next64();
            r->id = id;
            r->sector_number = sector;
            printf("rw %u %u %u %u %llu %llu", i, r->operation, r->nr_segments, r->handle,
                   (unsigned long long)id, (unsigned long long)sector);
            for (unsigned k = 0; k < r->nr_segments; k++) {
                r->seg[k].gref = (grant_ref_t)next64();
                r->seg[k].first_sect = below(8);
                r->seg[k].last_sect = r->seg[k].first_sect + below(8 - r->seg[k].first_sect);
                printf(" %u %u %u", r->seg[k].gref, r->seg[k].first_sect, r->seg[k].last_sect);
            }
            printf("\n");
        } else if (kind == 2) {
            struct blkif_request_discard *d = (struct blkif_request_discard *)r;
            d->operation = BLKIF_OP_DISCARD;
            d->flag = below(2) ? BLKIF_DISCARD_SECURE : 0;
            d->handle = (blkif_vdev_t)next64();
            d->id = id;
            d->sector_number = sector;
            d->nr_sectors = next64();
            printf("discard %u %u %u %llu %llu %llu\n", i, d->flag, d->handle, (unsigned long long)id,
                   (unsigned long long)sector, (unsigned long long)d->nr_sectors);
        } else if (kind == 3) {
            struct blkif_request_indirect *x = (struct blkif_request_indirect *)r;
            x->operation = BLKIF_OP_INDIRECT;
            x->indirect_op = below(2) ? BLKIF_OP_WRITE : BLKIF_OP_READ;
            /* 1..4096 segments, biased so every page count 1..8 shows up */
            unsigned pages = 1 + below(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
            x->nr_segments = (pages - 1) * SEGS_PER_PAGE + 1 + below(SEGS_PER_PAGE);
            x->id = id;
            x->sector_number = sector;
            x->handle = (blkif_vdev_t)next64();
            printf("indirect %u %u %u %u %llu %llu %u", i, x->indirect_op, x->nr_segments, x->handle,
                   (unsigned long long)id, (unsigned long long)sector, pages);
            for (unsigned k = 0; k < pages; k++) {
                x->indirect_grefs[k] = (grant_ref_t)next64();
                printf(" %u", x->indirect_grefs[k]);
            }
            printf("\n");
        } else if (kind == 4) { /* an operation blkif.h has no struct for: id must stay readable */
            uint8_t op = below(2) ? BLKIF_OP_RESERVED_1 : 7 + below(249);
            r->operation = op;
            r->id = id;
            printf("other %u %u %llu\n", i, op, (unsigned long long)id);
        } else { /* too many segments for a plain request */
            r->operation = below(2) ? BLKIF_OP_WRITE : BLKIF_OP_READ;
            r->nr_segments = BLKIF_MAX_SEGMENTS_PER_REQUEST + 1 + below(244);
            r->id = id;
            printf("badrw %u %u %u %llu\n", i, r->operation, r->nr_segments, (unsigned long long)id);
        }
    }
    for (RING_IDX i = rsp_prod - nrsp; i != rsp_prod; i++) {
        blkif_response_t *p = RING_GET_RESPONSE(&front, i);
        p->id = next64();
        p->operation = below(7);
        static const int16_t st[] = {BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP};
        p->status = st[below(3)];
        printf("rsp %u %llu %u %d\n", i, (unsigned long long)p->id, p->operation, p->status);
    }
    struct blkif_request_segment *segs = (struct blkif_request_segment *)indirect_mem;
    for (unsigned j = 0; j < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * SEGS_PER_PAGE; j++) {
        segs[j].gref = (grant_ref_t)next64();
        segs[j].first_sect = below(8);
        segs[j].last_sect = segs[j].first_sect + below(8 - segs[j].first_sect);
        printf("iseg %u %u %u %u\n", j, segs[j].gref, segs[j].first_sect, segs[j].last_sect);
    }
    write_file(ring_path, ring_mem, ring_bytes);
    write_file(ind_path, indirect_mem, INDIRECT_BYTES);
    return 0;
}

static unsigned failures, checked;
static char *cursor;
/* The next decimal field of the record being checked. */
static unsigned long long NEXT(void)
{
    char *end;
    unsigned long long v = strtoull(cursor, &end, 10);
    cursor = end;
    return v;
}
#define EXPECT(what, got, want)                                                                    \
    do {                                                                                           \
        checked++;                                                                                 \
        if ((unsigned long long)(got) != (unsigned long long)(want)) {                             \
            if (failures++ < 20)                                                                   \
                printf("mismatch line %u: %s = %llu, expected %llu\n", line, what,                 \
                       (unsigned long long)(got), (unsigned long long)(want));                     \
        }                                                                                          \
    } while (0)

static int check(unsigned order, const char *ring_path, const char *ind_path)
{
    setup(order);
    read_file(ring_path, ring_mem, ring_bytes);
    read_file(ind_path, indirect_mem, INDIRECT_BYTES);
    struct blkif_sring *s = front.sring;
    struct blkif_request_segment *segs = (struct blkif_request_segment *)indirect_mem;
    char kind[16], rest[65536];
    unsigned line = 0;
    while (scanf("%15s %65535[^\n]", kind, rest) == 2) {
        line++;
        cursor = rest;
        if (!strcmp(kind, "abi")) {
            char name[32];
            unsigned sz;
            sscanf(rest, "%31s %u", name, &sz);
            if (strcmp(name, abi_name())) { printf("mismatch line %u: abi %s, this build is %s\n", line, name, abi_name()); failures++; }
            EXPECT("entry size", sizeof(union blkif_sring_entry), sz);
        } else if (!strcmp(kind, "header")) {
            EXPECT("req_prod", s->req_prod, NEXT());
            EXPECT("req_event", s->req_event, NEXT());
            EXPECT("rsp_prod", s->rsp_prod, NEXT());
            EXPECT("rsp_event", s->rsp_event, NEXT());
            EXPECT("RING_SIZE", RING_SIZE(&front), NEXT());
        } else if (!strcmp(kind, "rw")) {
            blkif_request_t *r = RING_GET_REQUEST(&front, (RING_IDX)NEXT());
            EXPECT("operation", r->operation, NEXT());
            EXPECT("nr_segments", r->nr_segments, NEXT());
            EXPECT("handle", r->handle, NEXT());
            EXPECT("id", r->id, NEXT());
            EXPECT("sector_number", r->sector_number, NEXT());
            for (unsigned k = 0; k < r->nr_segments && k < BLKIF_MAX_SEGMENTS_PER_REQUEST; k++) {
                EXPECT("seg.gref", r->seg[k].gref, NEXT());
                EXPECT("seg.first_sect", r->seg[k].first_sect, NEXT());
                EXPECT("seg.last_sect", r->seg[k].last_sect, NEXT());
            }
        } else if (!strcmp(kind, "badrw")) {
            blkif_request_t *r = RING_GET_REQUEST(&front, (RING_IDX)NEXT());
            EXPECT("operation", r->operation, NEXT());
            EXPECT("nr_segments", r->nr_segments, NEXT());
            EXPECT("id", r->id, NEXT());
        } else if (!strcmp(kind, "discard")) {
            struct blkif_request_discard *d = (struct blkif_request_discard *)RING_GET_REQUEST(&front, (RING_IDX)NEXT());
            EXPECT("operation", d->operation, BLKIF_OP_DISCARD);
            EXPECT("flag", d->flag, NEXT());
            EXPECT("handle", d->handle, NEXT());
            EXPECT("id", d->id, NEXT());
            EXPECT("sector_number", d->sector_number, NEXT());
            EXPECT("nr_sectors", d->nr_sectors, NEXT());
        } else if (!strcmp(kind, "indirect")) {
            struct blkif_request_indirect *x = (struct blkif_request_indirect *)RING_GET_REQUEST(&front, (RING_IDX)NEXT());
            EXPECT("operation", x->operation, BLKIF_OP_INDIRECT);
            EXPECT("indirect_op", x->indirect_op, NEXT());
            EXPECT("nr_segments", x->nr_segments, NEXT());
            EXPECT("handle", x->handle, NEXT());
            EXPECT("id", x->id, NEXT());
            EXPECT("sector_number", x->sector_number, NEXT());
            unsigned pages = NEXT();
            for (unsigned k = 0; k < pages && k < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; k++)
                EXPECT("indirect_grefs", x->indirect_grefs[k], NEXT());
        } else if (!strcmp(kind, "other")) {
            blkif_request_t *r = RING_GET_REQUEST(&front, (RING_IDX)NEXT());
            EXPECT("operation", r->operation, NEXT());
            EXPECT("id", r->id, NEXT());
        } else if (!strcmp(kind, "rsp")) {
            blkif_response_t *q = RING_GET_RESPONSE(&front, (RING_IDX)NEXT());
            EXPECT("rsp.id", q->id, NEXT());
            EXPECT("rsp.operation", q->operation, NEXT());
            EXPECT("rsp.status", (int64_t)q->status, (int64_t)strtoll(cursor, NULL, 10));
        } else if (!strcmp(kind, "iseg")) {
            unsigned j = NEXT();
            if (j >= BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * SEGS_PER_PAGE) { printf("bad iseg %u\n", j); failures++; continue; }
            EXPECT("iseg.gref", segs[j].gref, NEXT());
            EXPECT("iseg.first_sect", segs[j].first_sect, NEXT());
            EXPECT("iseg.last_sect", segs[j].last_sect, NEXT());
        } else {
            printf("unknown record '%s' on line %u\n", kind, line);
            failures++;
        }
    }
    if (failures) { printf("%u mismatches in %u checks\n", failures, checked); return 1; }
    printf("ok %u\n", checked);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 6 && !strcmp(argv[1], "gen")) return gen(atoi(argv[2]), strtoull(argv[3], 0, 10), argv[4], argv[5]);
    if (argc == 5 && !strcmp(argv[1], "check")) return check(atoi(argv[2]), argv[3], argv[4]);
    fprintf(stderr, "usage: %s gen ORDER SEED RING INDIRECT | check ORDER RING INDIRECT < records\n", argv[0]);
    return 2;
}
