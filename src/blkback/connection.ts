/**
 * A VBD's live connection to its frontend: its queues, each served in the control path's thread
 * (queue.ts) or in a queue thread of its own (queue-thread.ts), and grant copy's bounce pages.
 * Linux blkback's `xen_blkif` with its rings, set up by `connect_ring`.
 */
import { BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, BLKIF_MAX_SEGMENTS_PER_REQUEST, EINVAL, EIO, ENOMEM, type BlkifAbi } from '../abi/index.js';
import { ringSizeFor } from '../ring/index.js';
import type { BlockStorage } from '../storage/storage.js';
import { XEN_PAGE_SIZE, canStartVcpus, type XenAccess } from '../xen/index.js';
import type { VbdCounters } from './counters.js';
import type { BlkbackOptions } from './options.js';
import { BouncePool } from './page-access.js';
import { Queue, type QueueAccess, type QueueRing } from './queue.js';
import { QueueThread, type QueueSetup } from './queue-thread.js';
import type { StorageSpec } from '../storage/registry.js';
import type { VbdLimits } from './validate.js';

export interface Connection {
  readonly local: Queue[];
  readonly threads: QueueThread[];
  /** Grant copy's bounce pages: the VBD's pool, or one per queue that fell back to this thread. */
  readonly pools: BouncePool[];
}

export function newConnection(): Connection {
  return { local: [], threads: [], pools: [] };
}

/** What the queues of one connection are set up with. */
export interface ConnectionSetup {
  readonly xen: XenAccess;
  readonly frontDomid: number;
  readonly abi: BlkifAbi;
  readonly order: number;
  readonly rings: readonly QueueRing[];
  readonly access: QueueSetup['access'];
  /** Queues in threads of their own (those that cannot get one are served here). */
  readonly threaded: boolean;
  readonly storage: BlockStorage;
  /** What a queue thread opens for its own handle on the storage. */
  readonly storageSpec: StorageSpec | undefined;
  readonly options: BlkbackOptions;
  readonly limits: () => VbdLimits;
  /** This thread's counters (queues served here count into them). */
  readonly counters: VbdCounters;
  readonly onFatal: (why: string) => void;
  readonly log: (msg: string) => void;
}

/** Why a connection cannot be served, with the errno `xenbus_dev_fatal` reports. */
export interface ConnectRefusal {
  readonly errno: number;
  readonly why: string;
}

/**
 * Sets up every queue into `conn` (already the VBD's, so a disconnect releases whatever came up);
 * returns why the connection cannot be served, if it cannot: ENOMEM for want of pages, EINVAL
 * for rings or channels of the frontend that would not map or bind, EIO for a queue thread
 * that could not serve its storage.
 */
export async function startQueues(conn: Connection, s: ConnectionSetup): Promise<ConnectRefusal | undefined> {
  const { xen, options: o } = s;
  // Queue threads are vCPU threads of the backend's domain: a Xen without them serves every queue here.
  const threaded = s.threaded && canStartVcpus(xen);
  const nq = s.rings.length;
  const maxSegs = Math.max(o.maxIndirectSegments, BLKIF_MAX_SEGMENTS_PER_REQUEST);
  // Grant copy's bounce pages: one pool per VBD, or a share of it lent to each queue thread
  // (at least one largest request each, plus its indirect pages).
  const lend: number[][] = [];
  if (s.access.kind === 'copy') {
    const want = Math.min(ringSizeFor(XEN_PAGE_SIZE << s.order, s.abi.entrySize) * nq * (maxSegs + 8), o.grantCopyPages);
    const each = Math.max(maxSegs + 8, Math.floor(want / nq));
    try {
      // A queue thread allocates only what it was lent (a vCPU cannot create pages); this
      // thread's pool takes pages as copies first need them, after checking they are there.
      if (threaded) for (let q = 0; q < nq; q++) lend.push(xen.memory.alloc(each + BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST));
      else if (xen.memory.freePages < want) throw new Error(`out of memory: ${want} pages wanted, ${xen.memory.freePages} free`);
      else conn.pools.push(new BouncePool(xen, [], want));
    } catch (e) {
      for (const f of lend) xen.memory.free(f);
      return { errno: ENOMEM, why: `no memory for ${threaded ? `${nq} x ${each}` : want} grant-copy pages: ${(e as Error).message}` };
    }
  }
  // Queue threads start together (each is a new thread: a few tens of ms); the ones that
  // came up join the connection before anything can fail, so a disconnect stops them.
  const started = threaded ? await Promise.all(s.rings.map((r, q) => QueueThread.start({
    xen, index: q, frontDomid: s.frontDomid, protocol: s.abi.protocol, ring: r, storage: s.storageSpec!,
    limits: s.limits(), maxIndirectSegments: o.maxIndirectSegments, reqsPerPage: o.reqsPerPage, access: s.access,
    frames: lend[q] ?? [], housekeepingMs: o.housekeepingMs, onFatal: s.onFatal, log: s.log,
  }))) : [];
  for (const [q, t] of started.entries()) {
    if (!('why' in t)) conn.threads.push(t);
    else if (lend[q] !== undefined) xen.memory.free(lend[q]);
  }
  const refused = started.find((t) => 'why' in t && !t.noThread);
  if (refused !== undefined && 'why' in refused) return { errno: EIO, why: refused.why };
  for (const [q, r] of s.rings.entries()) {
    // Each queue has its own ring, channel, page access and cache: nothing shared to lock.
    const t = started[q];
    if (t !== undefined) {
      if (!('why' in t)) continue;
      // No thread for it (no vCPU free, or the storage would not open there): serve it here.
      s.log(`${t.why}; serving queue ${q} in this thread`);
      if (s.access.kind === 'copy') {
        try {
          if (xen.memory.freePages < maxSegs + 8) throw new Error(`out of memory: ${maxSegs + 8} pages wanted, ${xen.memory.freePages} free`);
          conn.pools.push(new BouncePool(xen, [], maxSegs + 8));
        } catch (e) {
          return { errno: ENOMEM, why: `no memory for queue ${q}'s grant-copy pages: ${(e as Error).message}` };
        }
      }
    }
    const access: QueueAccess = s.access.kind === 'copy' ? { kind: 'copy', pool: conn.pools.at(-1)! } : s.access;
    const queue = Queue.open({
      xen, frontDomid: s.frontDomid, abi: s.abi, storage: s.storage, access, limits: s.limits,
      maxIndirectSegments: o.maxIndirectSegments, reqsPerPage: o.reqsPerPage, counters: s.counters, onFatal: s.onFatal, log: s.log,
    }, r, q);
    if (typeof queue === 'string') return { errno: EINVAL, why: queue };
    conn.local.push(queue);
  }
  return undefined;
}
