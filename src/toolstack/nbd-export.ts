/**
 * The main job's machinery: a driver domain serving one VBD per image, one guest holding every
 * VBD as a disk (xvda, xvdb, ...; a VM with many disks), and an NBD server in that guest's thread
 * exporting them as `vbd0`, `vbd1`, ... (the first is also the default export), each straight
 * from its blkfront. Stops in order: the NBD server drains, each disk flushes, frontends close,
 * backends close, domains go.
 */
import { DEFAULT_BLKBACK_OPTIONS, type BlkbackOptions } from '../blkback/index.js';
import { BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, BLKIF_MAX_SEGMENTS_PER_REQUEST } from '../abi/index.js';
import { DEFAULT_BLKFRONT_OPTIONS, type BlkfrontOptions, type DeviceInfo } from '../blkfront/index.js';
import type { NbdAddress, NbdListenOptions, NbdServerLimits, NbdServerStats, NbdServerTlsConfig } from '../nbd/index.js';
import type { BackendVbdStatus } from './backend-domain.js';
import type { GuestExportSpec } from './guest-domain.js';
import type { StorageSpec } from '../storage/index.js';
import { GNTTAB_NR_RESERVED_ENTRIES, NR_GRANT_ENTRIES } from '../xen/index.js';
import { xvdName } from '../xenbus/index.js';
import { DEFAULT_QUOTAS } from '../xenstore/index.js';
import { BACKEND_BASE_PAGES, BACKEND_COPY_PAGES, Toolstack, type DomainProxy, type GuestDisk } from './toolstack.js';

export interface DiskExportOptions {
  readonly images: readonly StorageSpec[];
  readonly readOnly?: boolean;
  readonly backendOptions?: Partial<BlkbackOptions>;
  readonly frontendOptions?: Partial<BlkfrontOptions>;
  /** Where the NBD server listens: one address or several (IPv4 and IPv6, inherited sockets). */
  readonly listen: NbdListenOptions | readonly NbdListenOptions[];
  /** TLS for the NBD server (default none). */
  readonly tls?: NbdServerTlsConfig;
  /** The NBD server's connection cap and handshake time limit (default: the server's). */
  readonly limits?: NbdServerLimits;
  /** Per image, in order: its export's name (default vbdN) and description (default: what the disk is). */
  readonly exportNames?: readonly { readonly name?: string; readonly description?: string }[];
  readonly log?: (domid: number, msg: string) => void;
  /** Called as each step completes, for progress output. */
  readonly progress?: (step: string) => void;
}

export interface VbdStatus {
  name: string;
  backend: BackendVbdStatus;
}

export interface DiskExportStatus {
  vbds: VbdStatus[];
  nbd: NbdServerStats | undefined;
}

/**
 * Memory for a driver domain serving `vbds` VBDs with `features`: grant copy needs bounce pages,
 * and with queue threads each queue's share holds at least one largest request.
 */
export function backendMemory(features: Partial<BlkbackOptions>, vbds: number): number {
  if (features.grantCopy !== true) return BACKEND_BASE_PAGES;
  const o = { ...DEFAULT_BLKBACK_OPTIONS, ...features };
  const perQueue = Math.max(o.maxIndirectSegments, BLKIF_MAX_SEGMENTS_PER_REQUEST) + 8 + BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST;
  return BACKEND_BASE_PAGES + vbds * (BACKEND_COPY_PAGES + (o.queueThreads ? o.maxQueues * perQueue : 0));
}

/** A guest's own pages besides its disks' (xenstore ring, slack). */
export const GUEST_BASE_PAGES = 512;

/** Grant entries a guest keeps for itself beside its disks' (the reserved ones and slack). */
const GUEST_OWN_GRANTS = GNTTAB_NR_RESERVED_ENTRIES + 56;

/** Ring pages of one disk, twice over (a reconnection grants new rings while a backend may still map the old). */
function ringPages(o: BlkfrontOptions): number {
  return 2 * o.queues * (1 << o.ringPageOrder);
}

/**
 * The frontend options of each of `disks` disks sharing one guest: every page of a disk's pool
 * may hold a grant (a persistent one stays while the backend maps it), and the guest has one
 * grant table (NR_GRANT_ENTRIES, Xen's max_grant_frames), so the pools share it instead of
 * each taking the default 8192 pages: a disk then never fails for want of a grant another disk
 * holds. One disk keeps the default; 16 get about 2040 pages (8 MiB in flight) each.
 */
export function sharedFrontendOptions(frontend: Partial<BlkfrontOptions>, disks: number): Partial<BlkfrontOptions> {
  const o = { ...DEFAULT_BLKFRONT_OPTIONS, ...frontend };
  const share = Math.floor((NR_GRANT_ENTRIES - GUEST_OWN_GRANTS) / disks) - ringPages(o);
  return { ...frontend, bufferPages: Math.max(16, Math.min(o.bufferPages, share)) };
}

/**
 * Memory for a guest holding `disks` disks attached with `frontend` options: each disk's page
 * pool (blkfront's `bufferPages`) and its rings.
 */
export function guestMemory(frontend: Partial<BlkfrontOptions>, disks: number): number {
  const o = { ...DEFAULT_BLKFRONT_OPTIONS, ...frontend };
  return GUEST_BASE_PAGES + disks * (o.bufferPages + ringPages(o));
}

/** Backend features a migration may pick (`randomBackendFeatures`). */
export function randomBackendFeatures(rand: () => number = Math.random): Partial<BlkbackOptions> {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;
  const grantCopy = rand() < 0.2;
  return {
    maxIndirectSegments: pick([0, 32, 256, 4096]),
    maxRingPageOrder: pick([0, 1, 2, 4]),
    maxQueues: pick([1, 2, 4]),
    persistent: !grantCopy && rand() < 0.5,
    grantCopy,
    queueThreads: rand() < 0.5,
  };
}

function describeChange(a: DeviceInfo, b: DeviceInfo): string {
  const parts: string[] = [];
  const seg = (i: DeviceInfo) => (i.indirect ? String(i.maxSegments) : 'off');
  if (seg(a) !== seg(b)) parts.push(`indirect ${seg(a)} -> ${seg(b)}`);
  if (a.ringPageOrder !== b.ringPageOrder) parts.push(`ring order ${a.ringPageOrder} -> ${b.ringPageOrder}`);
  if (a.queues !== b.queues) parts.push(`queues ${a.queues} -> ${b.queues}`);
  if (a.persistent !== b.persistent) parts.push(`persistent grants ${a.persistent ? 'on' : 'off'} -> ${b.persistent ? 'on' : 'off'}`);
  if (a.flush !== b.flush) parts.push(`flush ${a.flush ? 'on' : 'off'} -> ${b.flush ? 'on' : 'off'}`);
  return parts.length > 0 ? parts.join(', ') : 'same features';
}

export class DiskExport {
  private stopping: Promise<void> | undefined;
  private moving: Promise<string[]> = Promise.resolve([]);
  private disksNow: GuestDisk[];
  private backendNow: DomainProxy;

  private constructor(
    readonly ts: Toolstack,
    backend: DomainProxy,
    /** The guest holding every disk; the NBD server runs in its thread. */
    readonly guest: DomainProxy,
    disks: GuestDisk[],
    readonly uri: string,
    /** The export names, in image order; the first is the default export. */
    readonly exportNames: readonly string[],
    /** Every address the NBD server listens on, in the order given. */
    readonly addresses: readonly NbdAddress[],
  ) {
    this.disksNow = disks;
    this.backendNow = backend;
  }

  get disks(): readonly GuestDisk[] {
    return this.disksNow;
  }

  get backend(): DomainProxy {
    return this.backendNow;
  }

  /**
   * Moves every disk to a freshly started driver domain with `features` (random by default)
   * while clients keep working, then retires the old one. Returns one line per disk saying what
   * changed. Moves are serialized.
   */
  migrate(features: Partial<BlkbackOptions> = randomBackendFeatures()): Promise<string[]> {
    const run = this.moving.then(async () => {
      if (this.stopping !== undefined) return [];
      const old = this.backendNow;
      const next = await this.ts.createBackendDomain(`driver-${Date.now() % 100000}`, backendMemory(features, this.disksNow.length));
      const lines: string[] = [];
      for (const [i, d] of this.disksNow.entries()) {
        const before = await d.currentInfo();
        const moved = await this.ts.migrate(d, next, features);
        this.disksNow[i] = moved;
        lines.push(`vbd${i}: driver domain ${old.domid} -> ${next.domid}: ${describeChange(before, await moved.currentInfo())}`);
      }
      this.backendNow = next;
      await this.ts.destroy(old);
      return lines;
    });
    this.moving = run.catch(() => []);
    return run;
  }

  static async start(o: DiskExportOptions): Promise<DiskExport> {
    if (o.images.length === 0) throw new Error('nothing to serve: no image');
    // The driver domain owns every VBD's backend directory (about 25 nodes) and watches every
    // frontend, and the guest owns every frontend directory and watches every backend: raise
    // xenstored's per-domain quotas with the VBD count, as a host with many disks per domain
    // runs xenstored with larger -E and -W.
    const n = o.images.length;
    const ts = await Toolstack.start({
      log: o.log,
      quotas: { nodesPerDomain: Math.max(DEFAULT_QUOTAS.nodesPerDomain, 200 + 40 * n), watchesPerDomain: Math.max(DEFAULT_QUOTAS.watchesPerDomain, 32 + 4 * n) },
    });
    try {
      const backend = await ts.createBackendDomain('driver-domain', backendMemory(o.backendOptions ?? {}, n));
      o.progress?.(`driver domain ${backend.domid} started`);
      const frontendOptions = sharedFrontendOptions(o.frontendOptions ?? {}, n);
      const guest = await ts.createGuest('guest', guestMemory(frontendOptions, n));
      o.progress?.(`guest ${guest.domid} started`);
      const disks: GuestDisk[] = [];
      for (let i = 0; i < n; i++) {
        const disk = await ts.plug({
          guest, backend, storage: o.images[i]!, readOnly: o.readOnly,
          backendOptions: o.backendOptions, frontendOptions,
        });
        disks.push(disk);
        o.progress?.(`vbd${i}: ${xvdName(i)} of guest ${guest.domid} connected to ${disk.paths.backDir}`);
      }
      const exports: GuestExportSpec[] = disks.map((d, i) => ({
        name: o.exportNames?.[i]?.name ?? `vbd${i}`,
        description: o.exportNames?.[i]?.description ?? `Xen PV disk ${xvdName(i)} of guest ${guest.domid} (${describe(d.info)})`,
        frontDir: d.paths.frontDir,
        // A remote export may have other writers; a local image is this server's alone.
        ownsWrites: o.images[i]!.kind === 'file',
      }));
      const { uri, addresses } = await guest.rpc.call<{ uri: string; addresses: NbdAddress[] }>('serveNbd', exports, o.listen, o.tls, o.limits);
      return new DiskExport(ts, backend, guest, disks, uri, exports.map((e) => e.name), addresses);
    } catch (e) {
      await ts.shutdown().catch(() => undefined);
      throw e;
    }
  }

  async status(): Promise<DiskExportStatus> {
    // One call per driver domain (two while a migration moves the disks), not one per VBD.
    const disks = this.disks;
    const byBackend = new Map<DomainProxy, number[]>();
    for (const [i, d] of disks.entries()) byBackend.set(d.backend, [...(byBackend.get(d.backend) ?? []), i]);
    const backend: BackendVbdStatus[] = new Array(disks.length);
    await Promise.all([...byBackend].map(async ([be, idx]) => {
      const got = await be.rpc.call<BackendVbdStatus[]>('statuses', idx.map((i) => disks[i]!.paths.backDir));
      idx.forEach((i, k) => { backend[i] = got[k]!; });
    }));
    const vbds = backend.map((b, i) => ({ name: `vbd${i}`, backend: b }));
    const nbd = await this.guest.rpc.call<NbdServerStats | undefined>('nbdStats');
    return { vbds, nbd };
  }

  /** Drain NBD, flush, unplug every VBD, stop the domains. Idempotent. */
  stop(progress?: (step: string) => void): Promise<void> {
    this.stopping ??= (async () => {
      await this.moving;
      await this.guest.rpc.call('stopNbd').catch(() => undefined);
      progress?.('NBD server stopped; in-flight requests finished');
      for (const [i, d] of this.disks.entries()) {
        await d.flush().catch(() => undefined);
        await d.unplug().catch(() => undefined);
        progress?.(`vbd${i}: flushed and closed`);
      }
      await this.ts.shutdown();
      progress?.('domains stopped');
    })();
    return this.stopping;
  }
}

function describe(i: DeviceInfo): string {
  return `${i.size} bytes, ${i.sectorSize}-byte sectors, ${i.indirect ? `indirect ${i.maxSegments}` : 'no indirect'}${i.readOnly ? ', read-only' : ''}`;
}
