/**
 * The main job's machinery: a driver domain serving one VBD per image, one guest per VBD whose
 * blkfront connects to it, and an NBD server in the first guest exporting every guest's disk as
 * `vbd0`, `vbd1`, ... (the first is also the default export). Stops in order: the NBD server
 * drains, each disk flushes, frontends close, backends close, domains go.
 */
import type { BlkbackOptions } from '../blkback/index.js';
import type { BlkfrontOptions, DeviceInfo } from '../blkfront/index.js';
import type { NbdListenOptions, NbdServerStats } from '../nbd/index.js';
import type { BackendVbdStatus } from './backend-domain.js';
import type { GuestExportSpec } from './guest-domain.js';
import type { StorageSpec } from './storage-spec.js';
import { Toolstack, type DomainProxy, type GuestDisk } from './toolstack.js';

export interface DiskExportOptions {
  readonly images: readonly StorageSpec[];
  readonly readOnly?: boolean;
  readonly backendOptions?: Partial<BlkbackOptions>;
  readonly frontendOptions?: Partial<BlkfrontOptions>;
  readonly listen: NbdListenOptions;
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

export class DiskExport {
  private stopping: Promise<void> | undefined;

  private constructor(
    readonly ts: Toolstack,
    readonly backend: DomainProxy,
    readonly guests: readonly DomainProxy[],
    readonly disks: readonly GuestDisk[],
    readonly uri: string,
  ) {}

  static async start(o: DiskExportOptions): Promise<DiskExport> {
    if (o.images.length === 0) throw new Error('nothing to serve: no image');
    const ts = await Toolstack.start({ log: o.log });
    try {
      const backend = await ts.createBackendDomain();
      o.progress?.(`driver domain ${backend.domid} started`);
      const guests: DomainProxy[] = [];
      const disks: GuestDisk[] = [];
      for (let i = 0; i < o.images.length; i++) {
        const guest = await ts.createGuest(`guest${i}`);
        guests.push(guest);
        const disk = await ts.plug({
          guest, backend, storage: o.images[i]!, readOnly: o.readOnly,
          backendOptions: o.backendOptions, frontendOptions: o.frontendOptions,
        });
        disks.push(disk);
        o.progress?.(`vbd${i}: guest ${guest.domid} connected to ${disk.paths.backDir}`);
        if (i > 0) ts.linkGuests(guests[0]!, guest, `vbd${i}`);
      }
      const exports: GuestExportSpec[] = disks.map((d, i) => ({
        name: `vbd${i}`,
        description: `Xen PV disk of guest ${d.guest.domid} (${describe(d.info)})`,
        frontDir: d.paths.frontDir,
        ...(i > 0 ? { remote: `vbd${i}`, info: d.info } : {}),
      }));
      const { uri } = await guests[0]!.rpc.call<{ uri: string }>('serveNbd', exports, o.listen);
      return new DiskExport(ts, backend, guests, disks, uri);
    } catch (e) {
      await ts.shutdown().catch(() => undefined);
      throw e;
    }
  }

  async status(): Promise<DiskExportStatus> {
    const vbds = await Promise.all(this.disks.map(async (d, i) => ({ name: `vbd${i}`, backend: await d.backendStatus() })));
    const nbd = await this.guests[0]!.rpc.call<NbdServerStats | undefined>('nbdStats');
    return { vbds, nbd };
  }

  /** Drain NBD, flush, unplug every VBD, stop the domains. Idempotent. */
  stop(progress?: (step: string) => void): Promise<void> {
    this.stopping ??= (async () => {
      await this.guests[0]!.rpc.call('stopNbd').catch(() => undefined);
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
