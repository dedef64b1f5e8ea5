/**
 * One VBD's control path (Linux blkback `xenbus.c`): advertise features and go to InitWait, follow
 * the frontend's state, map its ring and bind its event channel when it is Initialised, publish
 * the disk's properties and go Connected; drain, unmap and go Closed when it closes; back to
 * InitWait when it comes again. Event source, xenstore, grant table and storage are injected.
 */
import { EIO, SECTOR_SHIFT, XS_MODE, XS_SECTORS, backendOfferNodes, diskFeatureNodes, diskNodes, type DiskFeatures } from '../abi/index.js';
import { storageShareable, type StorageSpec } from '../storage/registry.js';
import type { BlockStorage } from '../storage/storage.js';
import type { XenAccess } from '../xen/index.js';
import {
  XS_FRONTEND,
  XS_FRONTEND_ID,
  XS_STATE,
  XenbusStateClosed,
  XenbusStateClosing,
  XenbusStateConnected,
  XenbusStateInitWait,
  XenbusStateInitialised,
  XenbusStateInitialising,
  XenbusDevice,
  everyPeriod,
  writeNodes,
  type XenbusState,
} from '../xenbus/index.js';
import type { XenstoreClient } from '../xenstore/index.js';
import { newVbdCounters, sumVbdCounters, type VbdCounters } from './counters.js';
import { blkbackOptions, type BlkbackOptions } from './options.js';
import { newConnection, startQueues, type Connection } from './connection.js';
import { readFrontendRings } from './frontend-rings.js';
import type { QueueSetup } from './queue-thread.js';
import type { VbdLimits } from './validate.js';

export interface BlkbackDeps {
  readonly xen: XenAccess;
  readonly xs: XenstoreClient;
  /** The backend directory the toolstack created (with `frontend`, `frontend-id`, `state`). */
  readonly backDir: string;
  readonly storage: BlockStorage;
  readonly options?: Partial<BlkbackOptions>;
  /**
   * What `storage` was opened from: a queue thread (option `queueThreads`) opens it again
   * through the storage registry. Without it, or when the registry says its kind cannot be
   * shared (`storageShareable`), every queue is served in this thread.
   */
  readonly storageSpec?: StorageSpec;
  readonly log?: (msg: string) => void;
}


/** The backend of one virtual block device. */
export class Blkback {
  /** What this thread counts (control path and queues served here). */
  private readonly own: VbdCounters = newVbdCounters();
  readonly options: BlkbackOptions;
  readonly frontDir: string;
  readonly frontDomid: number;
  private conn: Connection | undefined;
  /** Our end on xenbus: state, the frontend watched, control-path steps one at a time. */
  private readonly dev: XenbusDevice;
  private closed = false;
  private lastError: string | undefined;
  private stopHousekeeping: (() => void) | undefined;
  private sectorsPublished = 0;

  private constructor(
    private readonly d: BlkbackDeps,
    frontDir: string,
    frontDomid: number,
    readonly readOnly: boolean,
  ) {
    this.options = blkbackOptions(d.options);
    this.frontDir = frontDir;
    this.frontDomid = frontDomid;
    this.dev = new XenbusDevice({ xs: d.xs, side: 'backend', nodename: d.backDir, onError: (e) => this.fatal(EIO, e.message) });
  }

  /** Reads the toolstack's nodes, advertises features, goes to InitWait and follows the frontend. */
  static async start(d: BlkbackDeps): Promise<Blkback> {
    const { xs, backDir } = d;
    const frontDir = await xs.read(`${backDir}/${XS_FRONTEND}`);
    const frontDomid = Number(await xs.read(`${backDir}/${XS_FRONTEND_ID}`));
    const mode = await xs.read(`${backDir}/${XS_MODE}`).catch(() => 'w');
    const readOnly = d.storage.readOnly || d.options?.readOnly === true || !mode.includes('w');
    const be = new Blkback(d, frontDir, frontDomid, readOnly);
    await be.advertise();
    await be.dev.watchOtherend(frontDir, () => be.frontendChanged());
    return be;
  }

  get xenbusState(): XenbusState {
    return this.dev.state;
  }

  get connected(): boolean {
    return this.conn !== undefined;
  }

  /** The VBD's counters: this thread's, plus its queue threads' (read live) while connected. */
  get counters(): VbdCounters {
    const threads = this.conn?.threads ?? [];
    return threads.length === 0 ? this.own : sumVbdCounters([this.own, ...threads.map((t) => t.counters)]);
  }

  /** The driver domain's vCPUs serving this VBD's queues in threads of their own (empty: all here). */
  get queueVcpus(): number[] {
    return (this.conn?.threads ?? []).map((t) => t.vcpu);
  }

  /** Why the backend last gave up on its frontend, if it did. */
  get error(): string | undefined {
    return this.lastError;
  }

  /** The limits requests are checked against, from the storage and the options. */
  limits(): VbdLimits {
    // Read twice per request by the data path: built again only when the storage's size changes.
    const size = this.d.storage.size;
    if (this.limitsCache?.size === size) return this.limitsCache.limits;
    const o = this.options;
    const ro = this.readOnly;
    const limits: VbdLimits = {
      sectors: Math.floor(size / this.d.storage.sectorSize) * (this.d.storage.sectorSize >> SECTOR_SHIFT),
      sectorSize: this.d.storage.sectorSize,
      readOnly: ro,
      flush: o.flush && !ro,
      barrier: o.barrier && !ro,
      discard: o.discard && !ro,
      discardSecure: o.discard && o.discardSecure && !ro,
    };
    this.limitsCache = { size, limits };
    return limits;
  }

  private limitsCache: { size: number; limits: VbdLimits } | undefined;

  /**
   * Unplug: stop following the frontend, finish what is in flight, unmap and close. The frontend
   * sees Closing, then Closed. Idempotent.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.dev.unwatchAll();
    await this.dev.enqueue(async () => {
      if (this.dev.state !== XenbusStateClosed) await this.dev.switchState(XenbusStateClosing).catch(() => undefined);
      await this.disconnect();
      await this.dev.switchState(XenbusStateClosed).catch(() => undefined);
    });
  }

  private async frontendChanged(): Promise<void> {
    if (this.closed) return;
    const fs = await this.dev.otherendState();
    switch (fs) {
      case XenbusStateInitialising:
        // Linux: "prepare for reconnect" — a frontend starting over after Closed.
        if (this.dev.state === XenbusStateClosed) await this.advertise();
        break;
      case XenbusStateInitialised:
      case XenbusStateConnected:
        // Two watch events in quick succession may hide the intermediate state: connect once.
        if (this.dev.state === XenbusStateConnected || this.dev.state === XenbusStateClosing) break;
        if (this.dev.state === XenbusStateClosed) await this.advertise();
        await this.connect();
        break;
      case XenbusStateClosing:
      case XenbusStateClosed:
        await this.disconnect();
        if (this.dev.state !== XenbusStateClosed) await this.dev.switchState(XenbusStateClosed);
        break;
      default:
        // The frontend's directory is gone (its domain died) or holds nonsense: let go of it.
        await this.disconnect();
        if (this.dev.state !== XenbusStateClosed && this.dev.state !== XenbusStateInitWait) await this.dev.switchState(XenbusStateClosed);
    }
  }

  /** Publishes what the frontend needs before it sets up its ring (blkif.h startup step 2). */
  private async advertise(): Promise<void> {
    const { xs, backDir } = this.d;
    const o = this.options;
    const offer = { maxIndirectSegments: o.maxIndirectSegments, maxRingPageOrder: o.maxRingPageOrder, maxQueues: o.maxQueues, persistent: o.persistent && !o.grantCopy };
    await xs.transaction(async (tx) => {
      await writeNodes(xs, backDir, backendOfferNodes(offer), tx);
      await writeNodes(xs, backDir, diskFeatureNodes(this.features()), tx);
    });
    this.lastError = undefined;
    await this.dev.switchState(XenbusStateInitWait);
  }

  /** The disk's features as offered now: discard in whole sectors (Linux: the queue's discard granularity). */
  private features(): DiskFeatures {
    const l = this.limits();
    return { flush: l.flush, barrier: l.barrier, discard: l.discard, discardSecure: l.discardSecure, discardGranularity: l.sectorSize, discardAlignment: 0 };
  }

  /** Maps the frontend's rings, binds their channels, publishes the disk and goes Connected (startup step 4). */
  private async connect(): Promise<void> {
    const { xen, xs, storage } = this.d;
    const read = await readFrontendRings(xs, this.frontDir, this.options);
    if (!read.ok) return this.fatal(read.errno, read.error);
    const fr = read.value;
    const { abi, order, rings } = fr;
    const persistent = this.options.persistent && !this.options.grantCopy && fr.frontendPersistent;
    const threaded = this.threadsWanted();
    const access: QueueSetup['access'] = this.options.grantCopy ? { kind: 'copy' }
      : persistent ? { kind: 'persistent', max: this.options.maxPersistentGrants, idleMs: this.options.persistentIdleMs } : { kind: 'map' };
    const conn = newConnection();
    this.conn = conn;
    const why = await startQueues(conn, {
      xen, frontDomid: this.frontDomid, abi, order, rings, access, threaded, storage, storageSpec: this.d.storageSpec,
      options: this.options, limits: () => this.limits(), counters: this.own,
      onFatal: (w) => void this.dev.enqueue(() => this.fatal(EIO, w)), log: (m) => this.log(m),
    });
    if (why !== undefined) return this.fatal(why.errno, why.why);
    this.startTimer();
    const l = await this.publishDisk();
    this.log(`connected: ${abi.protocol}, ${rings.length} queue(s)${threaded ? ' in threads of their own' : ''}, ring order ${order}, indirect ${this.options.maxIndirectSegments}, ` +
      `${this.options.grantCopy ? 'grant copy' : persistent ? 'persistent grants' : 'map per request'}, ${l.sectors} sectors of ${l.sectorSize} bytes${this.readOnly ? ', read-only' : ''}`);
    await this.dev.switchState(XenbusStateConnected);
  }

  /** What the frontend reads once we are Connected: the disk's size, sector sizes, `info`, features. */
  private async publishDisk(): Promise<VbdLimits> {
    const { xs, backDir, storage } = this.d;
    const l = this.limits();
    this.sectorsPublished = l.sectors;
    const disk = diskNodes({
      ...this.features(),
      sectors: l.sectors,
      sectorSize: l.sectorSize,
      // Linux: bdev_physical_block_size of the backing device; ours asks the storage.
      physicalSectorSize: this.options.physicalSectorSize ?? storage.physicalSectorSize ?? l.sectorSize,
      readOnly: this.readOnly, cdrom: this.options.cdrom, removable: this.options.removable,
    });
    await xs.transaction((tx) => writeNodes(xs, backDir, disk, tx));
    return l;
  }

  /** Finishes in-flight requests, lets go of every page, unmaps the rings and closes the channels. Idempotent. */
  private async disconnect(): Promise<void> {
    const c = this.conn;
    if (c === undefined) return;
    this.stopTimer();
    // The threads' last counts are folded into ours before they go.
    await Promise.all(c.threads.map((t) => t.stop()));
    for (const t of c.threads) addInto(this.own, t.counters);
    this.conn = undefined;
    for (const q of c.local) await q.stop();
    for (const p of c.pools) p.dispose();
  }

  /** Whether this connection's queues get threads of their own, and if not, why (logged once). */
  private threadsWanted(): boolean {
    if (!this.options.queueThreads) return false;
    const spec = this.d.storageSpec;
    const why = spec === undefined ? 'no storage spec to open it again'
      : !storageShareable(spec, this.d.storage) ? 'the storage cannot be shared between threads' : undefined;
    if (why === undefined) return true;
    if (!this.threadsRefusedLogged) this.log(`queue threads: ${why}; serving every queue in this thread`);
    this.threadsRefusedLogged = true;
    return false;
  }

  private threadsRefusedLogged = false;

  /**
   * Housekeeping while connected: purge idle persistent grants, notice a resized image. On the
   * thread's one timer for every VBD (everyPeriod), and the state queue is only entered when the
   * size changed: an idle driver domain's cost hardly grows with its VBDs.
   */
  private startTimer(): void {
    this.stopTimer();
    const every = this.options.housekeepingMs;
    if (every <= 0) return;
    this.stopHousekeeping = everyPeriod(every, (now) => {
      for (const q of this.conn?.local ?? []) q.tick(now);
      if (this.options.watchSize && !this.sizeChecking) {
        // The storage is asked outside the state queue: an NBD server may take seconds to answer,
        // and state changes must not wait for it.
        this.sizeChecking = true;
        // A storage that fails here is fatal (the state queue's catch), as any control-path error.
        void this.d.storage.refreshSize()
          .then(() => (this.limits().sectors === this.sectorsPublished ? undefined : this.dev.enqueue(() => this.checkSize())),
            (e: unknown) => this.dev.enqueue(() => Promise.reject(e)))
          .finally(() => { this.sizeChecking = false; });
      }
    });
  }

  private sizeChecking = false;

  private stopTimer(): void {
    this.stopHousekeeping?.();
    this.stopHousekeeping = undefined;
  }

  /**
   * Online resize (Linux `xen_vbd_resize`): once the storage's size was re-read, if it changed
   * while connected, rewrites `sectors` and then `state` (same value) so the frontend's watch fires.
   */
  private async checkSize(): Promise<void> {
    const sectors = this.limits().sectors;
    if (this.conn === undefined || this.dev.state !== XenbusStateConnected || sectors === this.sectorsPublished) return;
    const { xs, backDir } = this.d;
    this.log(`resized: ${this.sectorsPublished} -> ${sectors} sectors`);
    // Queue threads take the new size before the frontend can learn of it.
    await Promise.all(this.conn.threads.map((t) => t.setLimits(this.limits())));
    await xs.write(`${backDir}/${XS_SECTORS}`, String(sectors));
    this.sectorsPublished = sectors;
    await xs.write(`${backDir}/${XS_STATE}`, String(XenbusStateConnected));
  }

  /**
   * `xenbus_dev_fatal`: stop serving the frontend, say why in our `error` node ("<errno>
   * <message>", where the toolstack reads it) and move to Closing; the frontend's Closing/Closed
   * then finishes the teardown. Never affects another VBD.
   */
  private async fatal(errno: number, why: string): Promise<void> {
    this.lastError = why;
    this.log(`fatal: ${why}`);
    await this.disconnect().catch(() => undefined);
    await this.dev.fatal(errno, why);
  }

  private log(msg: string): void {
    this.d.log?.(`blkback ${this.d.backDir}: ${msg}`);
  }
}

/** Adds `from` into `to`, counter by counter. */
function addInto(to: VbdCounters, from: VbdCounters): void {
  const sum = sumVbdCounters([to, from]);
  Object.assign(to, sum);
}
