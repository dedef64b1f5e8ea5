/**
 * The main job's machinery: a driver domain serving one VBD per image, one guest holding every
 * VBD as a disk (xvda, xvdb, ...; a VM with many disks), and an NBD server in that guest's thread
 * exporting them as `vbd0`, `vbd1`, ... (the first is also the default export), each straight
 * from its blkfront. Stops in order: the NBD server drains, each disk flushes, frontends close,
 * backends close, domains go.
 */
import type { BlkbackOptions } from '../blkback/index.js';
import type { BlkfrontOptions, DeviceInfo } from '../blkfront/index.js';
import type { NbdAddress, NbdListenOptions, NbdServerLimits, NbdServerStats, NbdServerTlsConfig } from '../nbd/index.js';
import { Toolstack, type BackendVbdStatus, type DomainProxy, type GuestDisk } from '../toolstack/index.js';
import type { StorageSpec } from '../storage/index.js';
import { xvdName } from '../xenbus/index.js';
import { DEFAULT_QUOTAS } from '../xenstore/index.js';
import { describeChange, randomBackendFeatures } from './migration.js';
import { NBD_GUEST_APPLICATION, type GuestExportSpec } from './nbd-guest.js';
import { backendMemory, guestMemory, sharedFrontendOptions } from './sizing.js';

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
  /** More applications for the guest beside the NBD server (guest-application.ts; tests, benchmarks). */
  readonly guestApplications?: readonly URL[];
}

export interface VbdStatus {
  name: string;
  backend: BackendVbdStatus;
}

export interface DiskExportStatus {
  vbds: VbdStatus[];
  nbd: NbdServerStats | undefined;
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
      const guest = await ts.createGuest('guest', guestMemory(frontendOptions, n), { applications: [NBD_GUEST_APPLICATION, ...(o.guestApplications ?? [])] });
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
