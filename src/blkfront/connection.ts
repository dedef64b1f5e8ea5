/**
 * One connection to a backend (Linux blkfront's `blkfront_info` between `talk_to_blkback` and
 * `blkif_free`): the limits negotiated with it, its queues, and how its pages are granted.
 * Opening one allocates, grants and binds its rings; letting go of one returns what was in flight
 * to be issued again and never reuses a page the backend still maps.
 */
import { BLKIF_MAX_SEGMENTS_PER_REQUEST, abiByName, indirectPagesFor, type BlkifAbi } from '../abi/index.js';
import type { XenAccess } from '../xen/index.js';
import { GrantPerRequest, PersistentGrants, givePages, type GrantPolicy } from './grants.js';
import type { BlkfrontCounters, Chunk, HeldRequest } from './io.js';
import type { BackendTransport } from './negotiate.js';
import type { BlkfrontOptions } from './options.js';
import type { PagePool } from './page-pool.js';
import { Queue } from './queue.js';

export interface Connection {
  readonly backDomid: number;
  readonly backDir: string;
  readonly abi: BlkifAbi;
  readonly ringPageOrder: number;
  /** Segments per request in use: 11 without indirect, else the negotiated indirect maximum. */
  readonly maxSegments: number;
  readonly indirect: boolean;
  /**
   * `feature-persistent` on both ends: pages keep their (writable) grant for the whole connection.
   * Settled again when the backend connects (`settlePersistent`): Linux's blkback writes its
   * feature-persistent only then.
   */
  persistent: boolean;
  grants: GrantPolicy;
  readonly queues: Queue[];
  /** Round-robin start for spreading requests over the queues. */
  next: number;
}

export interface OpenConnection {
  readonly xen: XenAccess;
  readonly pool: PagePool;
  readonly counters: BlkfrontCounters;
  readonly options: BlkfrontOptions;
  /** What the backend offers. */
  readonly transport: BackendTransport;
  readonly backDomid: number;
  readonly backDir: string;
  /** Takes the connection before its queues are set up: one that fails half-way is let go whole. */
  readonly adopt: (conn: Connection) => void;
  /** A queue's backend notified us. */
  readonly onEvent: (conn: Connection, q: Queue) => void;
}

/** Settles the limits with what the backend offers and sets up the queues (Linux `talk_to_blkback`'s first half). */
export function openConnection(o: OpenConnection): Connection {
  const { xen, pool, options, transport: t, backDomid } = o;
  const abi = abiByName(options.protocol)!;
  const order = Math.min(options.ringPageOrder, t.maxRingPageOrder);
  const nq = Math.max(1, Math.min(options.queues, t.maxQueues));
  const persistent = options.persistent && t.persistent;
  // The pool must hold one largest request; fall back to a smaller maximum otherwise.
  let maxSegments = t.maxIndirectSegments > 0 ? t.maxIndirectSegments : BLKIF_MAX_SEGMENTS_PER_REQUEST;
  // (Its usable part: pages an earlier backend kept mapped are gone.)
  while (maxSegments > BLKIF_MAX_SEGMENTS_PER_REQUEST && maxSegments + indirectPagesFor(maxSegments) > pool.usable) maxSegments >>= 1;
  maxSegments = Math.max(maxSegments, BLKIF_MAX_SEGMENTS_PER_REQUEST);
  const deps = { xen, backDomid, pool, counters: o.counters };
  const conn: Connection = {
    backDomid, backDir: o.backDir, abi, ringPageOrder: order, maxSegments,
    indirect: maxSegments > BLKIF_MAX_SEGMENTS_PER_REQUEST, persistent,
    grants: persistent ? new PersistentGrants(deps) : new GrantPerRequest(deps), queues: [], next: 0,
  };
  o.adopt(conn);
  for (let i = 0; i < nq; i++) conn.queues.push(Queue.open(xen, backDomid, abi, order, i, (q) => o.onEvent(conn, q)));
  return conn;
}

/**
 * Linux `blkfront_gather_backend_features`: a backend's `feature-persistent` is read once it is
 * Connected (Linux 6.1's xen-blkback writes it in `connect()`, after InitWait, where openConnection
 * looked). Before any request is on the ring, a connection opened without it takes persistent
 * grants if both ends offer them now. Returns whether it changed.
 */
export function settlePersistent(conn: Connection, offered: boolean, d: { xen: XenAccess; pool: PagePool; counters: BlkfrontCounters; options: BlkfrontOptions }): boolean {
  const want = d.options.persistent && offered;
  if (want === conn.persistent || conn.queues.some((q) => q.shadow.inFlight > 0)) return false;
  conn.persistent = want;
  const deps = { xen: d.xen, backDomid: conn.backDomid, pool: d.pool, counters: d.counters };
  conn.grants = want ? new PersistentGrants(deps) : new GrantPerRequest(deps);
  return true;
}

/** What letting go of a connection left. */
export interface Released {
  /** Chunks the backend never answered, oldest id first per queue: to be issued again. */
  readonly again: Chunk[];
  /** The same, as they were on the ring (for `onReissue`). */
  readonly held: HeldRequest[];
  /** Ring pages the backend still maps (never reused). */
  readonly ringLeaked: number;
}

/**
 * Lets go of the connection (Linux `blkif_free` and `blkif_recover`'s gathering): each queue's
 * requests released before its ring, then the persistent grants ended.
 */
export function releaseConnection(conn: Connection, xen: XenAccess, pool: PagePool): Released {
  const again: Chunk[] = [];
  const held: HeldRequest[] = [];
  let ringLeaked = 0;
  for (const q of conn.queues) {
    ringLeaked += q.close(xen, (s) => {
      const c = s.owner;
      // Pages a backend still maps are never reused; the I/O itself is kept either way.
      conn.grants.end(s);
      givePages(pool, s);
      if (c !== undefined && !c.op.failed) {
        again.push(c);
        held.push({ queue: q.index, id: BigInt(s.index), operation: s.expectOp, sector: BigInt((c.op.offset + c.start) / 512), bytes: c.length });
      }
    }, (frame, ref) => pool.stick(frame, ref, false));
  }
  conn.grants.endAll();
  return { again, held, ringLeaked };
}
