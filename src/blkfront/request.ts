/**
 * Building one ring request from the head of a chunk (Linux blkfront `blkif_queue_rw_req`,
 * `blkif_queue_discard_req`): plain up to 11 segments, indirect beyond when negotiated, a flush
 * or barrier, or a discard; its pages taken from the pool and granted, the request encoded into
 * a ring slot and its shadow entry filled. A new request kind gets its operation and encoding here.
 */
import {
  BLKIF_DISCARD_SECURE,
  BLKIF_MAX_SEGMENTS_PER_REQUEST,
  BLKIF_OP_DISCARD,
  BLKIF_OP_FLUSH_DISKCACHE,
  BLKIF_OP_INDIRECT,
  BLKIF_OP_READ,
  BLKIF_OP_WRITE,
  BLKIF_OP_WRITE_BARRIER,
  BLKIF_SEGMENT_SIZE,
  BLKIF_SEGS_PER_INDIRECT_FRAME,
  SECTOR_SHIFT,
  XEN_PAGE_SIZE,
  encodeRequest,
  encodeSegment,
  indirectPagesFor,
  type BlkifSegment,
  type RwOperation,
} from '../abi/index.js';
import type { Connection } from './connection.js';
import { givePages } from './grants.js';
import { BlkfrontError, type BlkfrontCounters, type Chunk } from './io.js';
import type { DiskInfo } from './negotiate.js';
import type { PagePool } from './page-pool.js';
import type { Queue } from './queue.js';

export interface RequestContext {
  readonly conn: Connection;
  readonly pool: PagePool;
  readonly disk: DiskInfo;
  /** Our device's `handle` (blkif.h: the virtual device number's low bits). */
  readonly handle: number;
  readonly counters: BlkfrontCounters;
}

/** What became of the head of a chunk. */
export type Issued =
  /** On the ring, carrying [c.start, c.start + bytes) of the chunk. */
  | { readonly kind: 'issued'; readonly bytes: number }
  /** The pool lacks pages for it now: wait for a completion. */
  | { readonly kind: 'wait' }
  /** Out of grant entries (nothing was issued): wait for completions to free some, if any can. */
  | { readonly kind: 'no-grant'; readonly err: Error }
  /** It can never be issued: its I/O fails. */
  | { readonly kind: 'fail'; readonly err: Error };

/** Puts the head of `c` on `q`'s ring as one request; the caller moves the chunk on. */
export function issueRequest(x: RequestContext, q: Queue, c: Chunk): Issued {
  const { conn, pool, disk } = x;
  const op = c.op;
  let operation: number;
  let nsegs = 0;
  let bytes = 0;
  if (op.kind === 'read' || op.kind === 'write') {
    operation = op.kind === 'read' ? BLKIF_OP_READ : BLKIF_OP_WRITE;
    // The pool takes pages from the domain as the load first needs them (no allocation once
    // it holds enough); this request's pages are made free if the pool may still grow.
    const want = Math.min(Math.ceil(c.length / XEN_PAGE_SIZE), conn.maxSegments);
    pool.reserve(want + (want > BLKIF_MAX_SEGMENTS_PER_REQUEST ? indirectPagesFor(want) : 0));
    // Pages a backend kept mapped never come back to the pool: a request is cut to what the
    // pool can still hold (waiting for more would be forever), and with no page left it fails.
    const usable = pool.usable;
    if (usable < 1) {
      return { kind: 'fail', err: new BlkfrontError('EIO', `${op.kind} at ${op.offset + c.start}: every buffer page is leaked (the backend kept them mapped)`) };
    }
    nsegs = want;
    if (nsegs > BLKIF_MAX_SEGMENTS_PER_REQUEST && nsegs + indirectPagesFor(nsegs) > usable) {
      nsegs = Math.max(usable - indirectPagesFor(usable), BLKIF_MAX_SEGMENTS_PER_REQUEST);
    }
    if (nsegs <= BLKIF_MAX_SEGMENTS_PER_REQUEST) nsegs = Math.min(nsegs, usable);
    bytes = Math.min(c.length, nsegs * XEN_PAGE_SIZE);
  } else if (op.kind === 'flush') {
    operation = disk.flush ? BLKIF_OP_FLUSH_DISKCACHE : BLKIF_OP_WRITE_BARRIER;
  } else {
    operation = BLKIF_OP_DISCARD;
  }
  const indirect = nsegs > BLKIF_MAX_SEGMENTS_PER_REQUEST;
  const indPages = indirect ? indirectPagesFor(nsegs) : 0;
  if (pool.available < nsegs + indPages) return { kind: 'wait' };

  const s = q.shadow.take();
  const toDisk = op.kind === 'write';
  pool.take(nsegs, s.frames);
  if (indirect) pool.take(indPages, s.indirectFrames);
  const segs: BlkifSegment[] = [];
  try {
    for (let i = 0; i < nsegs; i++) {
      const frame = s.frames[i]!;
      const len = Math.min(XEN_PAGE_SIZE, bytes - i * XEN_PAGE_SIZE);
      if (toDisk) {
        const from = c.start + i * XEN_PAGE_SIZE;
        pool.page(frame).set(op.buf!.subarray(from, from + len));
      }
      // The backend only reads a page we write out: grant it read-only (unless persistent).
      const gref = conn.grants.grant(frame, toDisk);
      s.grefs.push(gref);
      segs.push({ gref, first_sect: 0, last_sect: (len >> SECTOR_SHIFT) - 1 });
    }
    for (const frame of s.indirectFrames) s.indirectGrefs.push(conn.grants.grant(frame, true));
  } catch (e) {
    // Out of grant entries: undo (Linux gnttab_request_free_callback waits for completions then).
    conn.grants.end(s);
    givePages(pool, s);
    q.shadow.release(s);
    return { kind: 'no-grant', err: e as Error };
  }
  const sector = BigInt((op.offset + c.start) / 512);
  const id = BigInt(s.index);
  if (indirect) {
    for (let j = 0; j < nsegs; j++) {
      const frame = s.indirectFrames[Math.floor(j / BLKIF_SEGS_PER_INDIRECT_FRAME)]!;
      encodeSegment(pool.view(frame), (j % BLKIF_SEGS_PER_INDIRECT_FRAME) * BLKIF_SEGMENT_SIZE, segs[j]!);
    }
    encodeRequest(q.entry.view, 0, conn.abi, {
      operation: BLKIF_OP_INDIRECT, indirect_op: operation, nr_segments: nsegs, id, sector_number: sector, handle: x.handle, indirect_grefs: s.indirectGrefs,
    });
    x.counters.indirect_requests++;
  } else if (operation === BLKIF_OP_DISCARD) {
    encodeRequest(q.entry.view, 0, conn.abi, {
      operation, flag: op.secure ? BLKIF_DISCARD_SECURE : 0, handle: x.handle, id, sector_number: sector, nr_sectors: BigInt(c.length / 512),
    });
    bytes = c.length;
  } else {
    encodeRequest(q.entry.view, 0, conn.abi, {
      operation: operation as RwOperation, nr_segments: nsegs, handle: x.handle, id, sector_number: sector, seg: segs,
    });
  }
  s.expectOp = operation;
  x.counters.requests++;
  x.counters.segments += nsegs;
  q.ring.produceRequest(q.entry);
  s.owner = { op, start: c.start, length: bytes };
  return { kind: 'issued', bytes };
}
