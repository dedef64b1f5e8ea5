/*
 * ring.h's index macros, run: each line read from stdin sets a blkif ring's indexes (a one-page
 * ring, RING_SIZE 32, from Debian's libxen-dev /usr/include/xen/io/blkif.h and ring.h), applies
 * one macro and prints what it gave and what it left in the shared header. Run by
 * test/ring/ring-vectors.test.ts, which asks our ring the same questions. Built for -m64 and -m32.
 *
 *   push req OLD NEW EVENT     RING_PUSH_REQUESTS_AND_CHECK_NOTIFY  -> "NOTIFY REQ_PROD"
 *   push rsp OLD NEW EVENT     RING_PUSH_RESPONSES_AND_CHECK_NOTIFY -> "NOTIFY RSP_PROD"
 *   final req REQ_CONS RSP_PROD_PVT REQ_PROD REQ_EVENT
 *                              RING_FINAL_CHECK_FOR_REQUESTS         -> "WORK REQ_EVENT"
 *   final rsp RSP_CONS RSP_PROD RSP_EVENT
 *                              RING_FINAL_CHECK_FOR_RESPONSES        -> "WORK RSP_EVENT"
 *   free REQ_PROD_PVT RSP_CONS RING_FREE_REQUESTS, RING_FULL         -> "FREE FULL"
 *   overflow RSP_PROD_PVT RSP_CONS IDX
 *                              RING_REQUEST_CONS_OVERFLOW, RING_REQUEST_PROD_OVERFLOW,
 *                              RING_RESPONSE_PROD_OVERFLOW at IDX    -> "CONS PROD RSP"
 *
 * WORK is XEN_RING_NR_UNCONSUMED_* after the check (the count RING_HAS_UNCONSUMED_* gives).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define mb() __sync_synchronize()
#define rmb() __sync_synchronize()
#define wmb() __sync_synchronize()
#include <xen/io/blkif.h>

int main(int argc, char **argv) {
  (void)argv;
  if (argc > 1) {
    fprintf(stderr, "usage: ring_vectors < commands\n");
    return 2;
  }
  struct blkif_sring *s = aligned_alloc(4096, 4096);
  blkif_front_ring_t f;
  blkif_back_ring_t b;
  char line[256];
  while (fgets(line, sizeof line, stdin) != NULL) {
    char cmd[16], dir[16];
    unsigned int a, c, d, e;
    SHARED_RING_INIT(s);
    FRONT_RING_INIT(&f, s, 4096);
    BACK_RING_INIT(&b, s, 4096);
    if (sscanf(line, "push %15s %u %u %u", dir, &a, &c, &d) == 4) {
      int notify;
      if (strcmp(dir, "req") == 0) {
        s->req_prod = a; s->req_event = d; f.req_prod_pvt = c;
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&f, notify);
        printf("%d %u\n", notify ? 1 : 0, s->req_prod);
      } else {
        s->rsp_prod = a; s->rsp_event = d; b.rsp_prod_pvt = c;
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&b, notify);
        printf("%d %u\n", notify ? 1 : 0, s->rsp_prod);
      }
    } else if (sscanf(line, "final req %u %u %u %u", &a, &c, &d, &e) == 4) {
      int work;
      b.req_cons = a; b.rsp_prod_pvt = c; s->req_prod = d; s->req_event = e;
      RING_FINAL_CHECK_FOR_REQUESTS(&b, work);
      printf("%u %u\n", work ? XEN_RING_NR_UNCONSUMED_REQUESTS(&b) : 0u, s->req_event);
    } else if (sscanf(line, "final rsp %u %u %u", &a, &c, &d) == 3) {
      int work;
      f.rsp_cons = a; s->rsp_prod = c; s->rsp_event = d;
      RING_FINAL_CHECK_FOR_RESPONSES(&f, work);
      printf("%u %u\n", work ? XEN_RING_NR_UNCONSUMED_RESPONSES(&f) : 0u, s->rsp_event);
    } else if (sscanf(line, "free %u %u", &a, &c) == 2) {
      f.req_prod_pvt = a; f.rsp_cons = c;
      printf("%u %d\n", RING_FREE_REQUESTS(&f), RING_FULL(&f) ? 1 : 0);
    } else if (sscanf(line, "overflow %u %u %u", &a, &c, &d) == 3) {
      b.rsp_prod_pvt = a; f.rsp_cons = c;
      printf("%d %d %d\n", RING_REQUEST_CONS_OVERFLOW(&b, d) ? 1 : 0, RING_REQUEST_PROD_OVERFLOW(&b, d) ? 1 : 0,
             RING_RESPONSE_PROD_OVERFLOW(&f, d) ? 1 : 0);
    } else if (sscanf(line, "%15s", cmd) == 1) {
      fprintf(stderr, "unknown command: %s", line);
      return 1;
    }
  }
  free(s);
  return 0;
}
