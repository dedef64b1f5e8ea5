/**
 * blkif as the block backend of a driver domain on a real Xen (dom0 or another): what Linux's
 * xenbus backend bus does for xen-blkback. It watches the domain's `backend/vbd` directory,
 * where the toolstack (libxl: `xl create`, `xl block-attach`) writes a VBD's backend nodes, and
 * starts a Blkback for each device that appears, serving the storage its `params` names (a file,
 * or an nbd:// URI); it ends the Blkback when the toolstack takes the device offline (`online`
 * 0, as `xl block-detach` does before it waits for Closed) or removes its directory (`xl destroy`).
 *
 * xenbus's backend directory layout: backend/vbd/<frontend domid>/<devid>/ (xenstore-paths.pandoc).
 */
import { Blkback, type BlkbackOptions, type VbdCounters } from '../blkback/index.js';
import { openStorage, storageFromArgument } from '../storage/registry.js';
import type { XenAccess } from '../xen/index.js';
import type { XenstoreClient } from '../xenstore/index.js';

export interface VbdBusOptions {
  readonly xen: XenAccess;
  readonly xs: XenstoreClient;
  /** Our domain id (the backend paths are under /local/domain/<domid>/backend). */
  readonly domid: number;
  readonly blkback?: Partial<BlkbackOptions>;
  readonly log: (msg: string) => void;
  /** A device was let go: its last counters. */
  readonly onRemoved?: (backDir: string, counters: VbdCounters) => void;
}

interface Served {
  readonly be: Blkback;
  readonly storage: { close(): Promise<void> };
}

export class VbdBus {
  private readonly served = new Map<string, Served | 'starting'>();
  private scanning: Promise<void> | undefined;
  private again = false;
  private closed = false;
  readonly root: string;

  private constructor(private readonly o: VbdBusOptions) {
    this.root = `/local/domain/${o.domid}/backend/vbd`;
  }

  static async start(o: VbdBusOptions): Promise<VbdBus> {
    const bus = new VbdBus(o);
    // The watch fires once at once (xs_wire.h XS_WATCH), so devices already there are found too.
    await o.xs.watch(bus.root, 'blkif-vbd-bus', () => bus.rescan());
    return bus;
  }

  /** The devices being served, by backend directory. */
  get devices(): string[] {
    return [...this.served.keys()];
  }

  /** Blkback of a device (for counters), by backend directory. */
  blkback(backDir: string): Blkback | undefined {
    const s = this.served.get(backDir);
    return s === undefined || s === 'starting' ? undefined : s.be;
  }

  private rescan(): void {
    if (this.closed) return;
    if (this.scanning !== undefined) {
      this.again = true;
      return;
    }
    this.scanning = this.scan().catch((e: unknown) => this.o.log(`scanning ${this.root}: ${(e as Error).message}`)).finally(() => {
      this.scanning = undefined;
      if (this.again) {
        this.again = false;
        this.rescan();
      }
    });
  }

  private async scan(): Promise<void> {
    const { xs } = this.o;
    const present = new Set<string>();
    const fronts = await xs.directory(this.root).catch(() => [] as string[]);
    for (const f of fronts) {
      const devs = await xs.directory(`${this.root}/${f}`).catch(() => [] as string[]);
      for (const d of devs) {
        const dir = `${this.root}/${f}/${d}`;
        const online = await xs.read(`${dir}/online`).catch(() => undefined);
        // Half-written by the toolstack (it writes in one transaction, but be sure): later.
        const params = await xs.read(`${dir}/params`).catch(() => undefined);
        if (params === undefined || online === undefined) continue;
        if (online === '0') continue;
        present.add(dir);
        if (!this.served.has(dir)) void this.add(dir, params);
      }
    }
    for (const dir of [...this.served.keys()]) if (!present.has(dir)) await this.remove(dir);
  }

  private async add(dir: string, params: string): Promise<void> {
    const { xs, xen, log } = this.o;
    this.served.set(dir, 'starting');
    try {
      const mode = await xs.read(`${dir}/mode`).catch(() => 'w');
      const spec = storageFromArgument(params, { sectorSize: 512, readOnly: !mode.includes('w') });
      if (spec === undefined) throw new Error(`params ${JSON.stringify(params)}: not a file or an NBD URI`);
      const storage = await openStorage(spec, log);
      // libxl's `discard-enable` (the disk line's discard/no-discard): 0 means no feature-discard, as Linux blkback reads it.
      const discardEnable = await xs.read(`${dir}/discard-enable`).catch(() => '1');
      const options = { ...this.o.blkback, queueThreads: false, ...(discardEnable === '0' ? { discard: false } : {}) };
      const be = await Blkback.start({ xen, xs, backDir: dir, storage, storageSpec: spec, options, log: (m) => log(`${dir}: ${m}`) });
      if (this.served.get(dir) !== 'starting' || this.closed) {
        await be.close();
        await storage.close();
        return;
      }
      this.served.set(dir, { be, storage });
      log(`${dir}: serving ${params} (${mode.includes('w') ? 'read-write' : 'read-only'})`);
    } catch (e) {
      this.served.delete(dir);
      log(`${dir}: cannot serve it: ${(e as Error).message}`);
      await xs.write(`${dir}/hotplug-error`, (e as Error).message).catch(() => undefined);
    }
  }

  private async remove(dir: string): Promise<void> {
    const s = this.served.get(dir);
    this.served.delete(dir);
    if (s === undefined || s === 'starting') return;
    await s.be.close();
    await s.storage.close();
    this.o.log(`${dir}: let go`);
    this.o.onRemoved?.(dir, s.be.counters);
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.o.xs.unwatch(this.root, 'blkif-vbd-bus').catch(() => undefined);
    await this.scanning;
    for (const dir of [...this.served.keys()]) await this.remove(dir);
  }
}
