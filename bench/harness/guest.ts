/**
 * Measurements through the PV protocol itself: a toolstack with one driver domain, guests whose
 * blkfront runs the workload in their own thread (`guestWorkload`, no NBD, no control-channel
 * hop per I/O), and the frontend's and backend's counters read before and after each run.
 */
import { indirectPagesFor } from '../../src/abi/index.js';
import { GNTTAB_NR_RESERVED_ENTRIES, NR_GRANT_ENTRIES } from '../../src/xen/index.js';
import type { BlkbackOptions } from '../../src/blkback/index.js';
import type { BlkfrontOptions } from '../../src/blkfront/index.js';
import { Toolstack, type DomainProxy, type GuestDisk } from '../../src/toolstack/index.js';
import { WORKLOAD_APPLICATION, guestWorkload, type WorkloadResult } from './workload.js';
import type { StorageSpec } from '../../src/storage/index.js';
import type { Cleanup } from './cleanup.js';
import { MiB, perfOf, type Perf, type ProtocolCost, type Workload } from './types.js';

const PAGE = 4096;

/**
 * The in-guest workload starts its clock before allocating one buffer per queue slot, so a deep
 * load of big blocks would lose part of its time (all of it for 32 x 4 MiB in a short run) to
 * allocation. Give it that time back; the result's `seconds` starts after the allocation anyway.
 */
export function allocationSlackMs(w: Workload): number {
  return Math.ceil((w.depth * w.blockSize) / MiB) * 4;
}

export interface Measured {
  perf: Perf;
  cost: ProtocolCost;
  peakInflightBytes: number;
}

export class GuestBench {
  private readonly guests = new Map<string, DomainProxy>();

  private constructor(
    readonly ts: Toolstack,
    readonly backend: DomainProxy,
    /** Shuts the toolstack down (once; also run by the cleanup if the run is cut short). */
    readonly shutdown: () => Promise<void>,
  ) {}

  static async start(cleanup: Cleanup): Promise<GuestBench> {
    const ts = await Toolstack.start();
    const shutdown = cleanup.add('shut the toolstack down', () => ts.shutdown());
    try {
      const backend = await ts.createBackendDomain('bench-driver-domain');
      return new GuestBench(ts, backend, () => shutdown());
    } catch (e) {
      await shutdown();
      throw e;
    }
  }

  /** Destroys a guest made by `guest()` (its memory goes with it). */
  async dropGuest(name: string): Promise<void> {
    const g = this.guests.get(name);
    if (g === undefined) return;
    this.guests.delete(name);
    await this.ts.destroy(g);
  }

  /** A guest by name, created on first use with `memoryPages` (default: the toolstack's). */
  async guest(name: string, memoryPages?: number): Promise<DomainProxy> {
    let g = this.guests.get(name);
    if (g === undefined) {
      g = await this.ts.createGuest(name, memoryPages, { applications: [WORKLOAD_APPLICATION] });
      this.guests.set(name, g);
    }
    return g;
  }

  /** Plugs a VBD; a memory disk is written in full first unless `prefill` is false. */
  async plug(guest: DomainProxy, storage: StorageSpec, backendOptions: Partial<BlkbackOptions>, frontendOptions: Partial<BlkfrontOptions>, opts: { prefill?: boolean } = {}): Promise<GuestDisk> {
    const disk = await this.ts.plug({ guest, backend: this.backend, storage, backendOptions, frontendOptions });
    if (storage.kind === 'memory' && opts.prefill !== false) await prefill(disk);
    return disk;
  }

  /**
   * Runs `w` for about `ms` inside the guest (or for `ops` operations, when given, with `ms` as a
   * cap); the counters' difference is the protocol's cost.
   */
  async run(disk: GuestDisk, w: Workload, ms: number, span?: number, ops?: number): Promise<Measured> {
    const [f0, b0] = await Promise.all([disk.status(), disk.backendStatus()]);
    const r: WorkloadResult = await guestWorkload(disk, { ...w, ms: ms + allocationSlackMs(w), span: span ?? disk.info.size, ...(ops !== undefined ? { ops } : {}) });
    const [f1, b1] = await Promise.all([disk.status(), disk.backendStatus()]);
    const fe = (k: keyof typeof f0.counters) => f1.counters[k] - f0.counters[k];
    const be = (k: keyof typeof b0.counters) => b1.counters[k] - b0.counters[k];
    const requests = be('rd_req') + be('wr_req');
    const per = (n: number) => (requests > 0 ? n / requests : Number.NaN);
    const cost: ProtocolCost = {
      requests,
      requestsPerIo: r.ops > 0 ? requests / r.ops : Number.NaN,
      feSentPerReq: per(fe('notify_sent')),
      beReceivedPerReq: per(be('notify_received')),
      beSentPerReq: per(be('notify_sent')),
      feReceivedPerReq: per(fe('notify_received')),
      notificationsPerReq: per(fe('notify_sent') + be('notify_sent')),
      grantMapsPerReq: per(be('grant_map_ops')),
      segmentsPerReq: per(be('segments')),
      indirectShare: per(be('indirect_req')),
      requestsPerMiB: r.bytes > 0 ? requests / (r.bytes / MiB) : Number.NaN,
    };
    return { perf: perfOf(r.ops, r.bytes, r.seconds, r.p50, r.p99), cost, peakInflightBytes: b1.counters.peak_inflight_bytes };
  }
}

/** A memory disk reads zeroes where never written: write all of it first, so reads copy data. */
async function prefill(disk: GuestDisk): Promise<void> {
  const bs = Math.min(4 * MiB, disk.info.size);
  await guestWorkload(disk, { pattern: 'write', blockSize: bs, depth: 4, ops: Math.floor(disk.info.size / bs) });
}

/**
 * Pages a guest can have granted at once: its grant table (NR_GRANT_ENTRIES, Xen's default of 64
 * frames x 512 v1 entries) less the reserved entries, the largest ring and some room for xenstore.
 * blkfront grants every page of its pool that is in flight, so no pool beyond this can fill up
 * (and blkfront fails the grant rather than waiting for one: see the report's notes).
 */
export const GRANT_POOL_CAP = NR_GRANT_ENTRIES - GNTTAB_NR_RESERVED_ENTRIES - 16 - 232;

/**
 * Frontend pages needed for the ring to be full of requests of at most `blockSize` bytes, and for
 * `depth` I/Os of `blockSize` to be in flight, whichever is less (plus room to spare), within
 * what the grant table allows.
 */
export function poolPagesFor(maxSegments: number, slots: number, blockSize: number, depth: number): number {
  const segs = Math.min(maxSegments, blockSize / PAGE);
  const perReq = segs + (segs > 11 ? indirectPagesFor(segs) : 0);
  const reqsPerIo = Math.ceil(blockSize / PAGE / segs);
  const pages = Math.min(slots, depth * reqsPerIo) * perReq;
  return Math.min(GRANT_POOL_CAP, Math.max(pages + 64, maxSegments + indirectPagesFor(Math.max(maxSegments, 12)) + 16));
}

/** Bytes the ring, the pool and the queue allow in flight together for I/Os of `blockSize`. */
export function reachableInflight(maxSegments: number, slots: number, blockSize: number, depth: number, poolPages: number): number {
  const segs = Math.min(maxSegments, blockSize / PAGE);
  const perReq = segs + (segs > 11 ? indirectPagesFor(segs) : 0);
  const requests = Math.min(slots, Math.floor(poolPages / perReq), depth * Math.ceil(blockSize / PAGE / segs));
  return requests * segs * PAGE;
}
