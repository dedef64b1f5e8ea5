/**
 * One VBD's control path (Linux blkback `xenbus.c`): advertise features and go to InitWait, follow
 * the frontend's state, map its ring and bind its event channel when it is Initialised, publish
 * the disk's properties and go Connected; drain, unmap and go Closed when it closes; back to
 * InitWait when it comes again. Event source, xenstore, grant table and storage are injected.
 */
import {
  SECTOR_SHIFT,
  VDISK_CDROM,
  VDISK_READONLY,
  VDISK_REMOVABLE,
  XS_DISCARD_ALIGNMENT,
  XS_DISCARD_GRANULARITY,
  XS_DISCARD_SECURE,
  XS_EVENT_CHANNEL,
  XS_FEATURE_BARRIER,
  XS_FEATURE_DISCARD,
  XS_FEATURE_FLUSH_CACHE,
  XS_FEATURE_MAX_INDIRECT_SEGMENTS,
  XS_INFO,
  XS_MAX_RING_PAGE_ORDER,
  XS_MODE,
  XS_MULTI_QUEUE_MAX_QUEUES,
  XS_MULTI_QUEUE_NUM_QUEUES,
  XS_FEATURE_PERSISTENT,
  XS_PHYSICAL_SECTOR_SIZE,
  XS_PROTOCOL,
  XS_RING_PAGE_ORDER,
  XS_RING_REF,
  XS_SECTORS,
  XS_SECTOR_SIZE,
  abiByName,
  xsQueueDir,
  xsRingRefN,
  BLKIF_MAX_SEGMENTS_PER_REQUEST,
  BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
} from '../abi/index.js';
import { ringSizeFor } from '../ring/index.js';
import { storageShareable, type StorageSpec } from '../storage/registry.js';
import type { BlockStorage } from '../storage/storage.js';
import { XEN_PAGE_SIZE, type XenDomain } from '../xen/index.js';
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
  readState,
  switchState,
  type XenbusState,
} from '../xenbus/index.js';
import type { XenstoreClient } from '../xenstore/index.js';
import { newVbdCounters, sumVbdCounters, type VbdCounters } from './counters.js';
import { BouncePool } from './page-access.js';
import { blkbackOptions, type BlkbackOptions } from './options.js';
import { Queue, type QueueAccess, type QueueRing } from './queue.js';
import { QueueThread, type QueueSetup } from './queue-thread.js';
import type { VbdLimits } from './validate.js';

export interface BlkbackDeps {
  readonly xen: XenDomain;
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

/** A live connection to the frontend: its queues, here or in threads of their own. */
interface Connection {
  readonly local: Queue[];
  readonly threads: QueueThread[];
  /** Grant copy's bounce pages: the VBD's pool, or one per queue that fell back to this thread. */
  readonly pools: BouncePool[];
}

let watchSeq = 0;

/** The backend of one virtual block device. */
export class Blkback {
  /** What this thread counts (control path and queues served here). */
  private readonly own: VbdCounters = newVbdCounters();
  readonly options: BlkbackOptions;
  readonly frontDir: string;
  readonly frontDomid: number;
  private state: XenbusState = XenbusStateInitialising;
  private conn: Connection | undefined;
  /** State changes are handled one at a time, in order. */
  private serial: Promise<void> = Promise.resolve();
  private readonly token = `blkback-${++watchSeq}`;
  private closed = false;
  private lastError: string | undefined;
  private timer: NodeJS.Timeout | undefined;
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
    await xs.watch(`${frontDir}/${XS_STATE}`, be.token, () => be.enqueue(() => be.frontendChanged()));
    return be;
  }

  get xenbusState(): XenbusState {
    return this.state;
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
    await this.d.xs.unwatch(`${this.frontDir}/${XS_STATE}`, this.token).catch(() => undefined);
    await this.enqueue(async () => {
      if (this.state !== XenbusStateClosed) await this.setState(XenbusStateClosing).catch(() => undefined);
      await this.disconnect();
      await this.setState(XenbusStateClosed).catch(() => undefined);
    });
  }

  private enqueue(fn: () => Promise<void>): Promise<void> {
    const run = this.serial.then(fn).catch((e: unknown) => this.fatal(`${(e as Error).message}`));
    this.serial = run;
    return run;
  }

  private async frontendChanged(): Promise<void> {
    if (this.closed) return;
    const fs = await readState(this.d.xs, this.frontDir);
    switch (fs) {
      case XenbusStateInitialising:
        // Linux: "prepare for reconnect" — a frontend starting over after Closed.
        if (this.state === XenbusStateClosed) await this.advertise();
        break;
      case XenbusStateInitialised:
      case XenbusStateConnected:
        // Two watch events in quick succession may hide the intermediate state: connect once.
        if (this.state === XenbusStateConnected || this.state === XenbusStateClosing) break;
        if (this.state === XenbusStateClosed) await this.advertise();
        await this.connect();
        break;
      case XenbusStateClosing:
      case XenbusStateClosed:
        await this.disconnect();
        if (this.state !== XenbusStateClosed) await this.setState(XenbusStateClosed);
        break;
      default:
        // The frontend's directory is gone (its domain died) or holds nonsense: let go of it.
        await this.disconnect();
        if (this.state !== XenbusStateClosed && this.state !== XenbusStateInitWait) await this.setState(XenbusStateClosed);
    }
  }

  /** Publishes what the frontend needs before it sets up its ring (blkif.h startup step 2). */
  private async advertise(): Promise<void> {
    const { xs, backDir } = this.d;
    const o = this.options;
    await xs.transaction(async (tx) => {
      if (o.maxIndirectSegments > 0) await xs.write(`${backDir}/${XS_FEATURE_MAX_INDIRECT_SEGMENTS}`, String(o.maxIndirectSegments), tx);
      else await xs.rm(`${backDir}/${XS_FEATURE_MAX_INDIRECT_SEGMENTS}`, tx).catch(() => undefined);
      await xs.write(`${backDir}/${XS_MAX_RING_PAGE_ORDER}`, String(o.maxRingPageOrder), tx);
      await xs.write(`${backDir}/${XS_MULTI_QUEUE_MAX_QUEUES}`, String(o.maxQueues), tx);
      await xs.write(`${backDir}/${XS_FEATURE_PERSISTENT}`, o.persistent && !o.grantCopy ? '1' : '0', tx);
      await this.writeFeatures(tx);
    });
    this.lastError = undefined;
    await this.setState(XenbusStateInitWait);
  }

  private async writeFeatures(tx: number): Promise<void> {
    const { xs, backDir } = this.d;
    const l = this.limits();
    await xs.write(`${backDir}/${XS_FEATURE_FLUSH_CACHE}`, l.flush ? '1' : '0', tx);
    await xs.write(`${backDir}/${XS_FEATURE_BARRIER}`, l.barrier ? '1' : '0', tx);
    await xs.write(`${backDir}/${XS_FEATURE_DISCARD}`, l.discard ? '1' : '0', tx);
    if (l.discard) {
      await xs.write(`${backDir}/${XS_DISCARD_GRANULARITY}`, String(l.sectorSize), tx);
      await xs.write(`${backDir}/${XS_DISCARD_ALIGNMENT}`, '0', tx);
      await xs.write(`${backDir}/${XS_DISCARD_SECURE}`, l.discardSecure ? '1' : '0', tx);
    }
  }

  /** Maps the frontend's rings, binds their channels, publishes the disk and goes Connected (startup step 4). */
  private async connect(): Promise<void> {
    const { xen, xs, backDir, storage } = this.d;
    const f = this.frontDir;
    const opt = async (key: string): Promise<string | undefined> => xs.read(`${f}/${key}`).catch(() => undefined);
    const protocol = (await opt(XS_PROTOCOL)) ?? this.options.defaultProtocol;
    const abi = abiByName(protocol);
    if (abi === undefined) return this.fatal(`frontend protocol "${protocol}" is not one we speak`);
    // Linux connect_ring: 0 or more queues than offered is a "buggy or malicious guest".
    const queuesText = await opt(XS_MULTI_QUEUE_NUM_QUEUES);
    const nq = queuesText === undefined ? 1 : parseUint(queuesText);
    if (nq === undefined || nq < 1 || nq > this.options.maxQueues) return this.fatal(`multi-queue-num-queues "${queuesText}" (offered 1..${this.options.maxQueues})`);
    const orderText = await opt(XS_RING_PAGE_ORDER);
    const order = orderText === undefined ? 0 : parseUint(orderText);
    if (order === undefined || order > this.options.maxRingPageOrder) return this.fatal(`ring-page-order "${orderText}" (max ${this.options.maxRingPageOrder})`);
    const persistent = this.options.persistent && !this.options.grantCopy && (await opt(XS_FEATURE_PERSISTENT)) === '1';
    // With one queue the nodes are top-level; with more, under queue-N (blkif.h "Multi-queue").
    const rings: QueueRing[] = [];
    for (let q = 0; q < nq; q++) {
      const dir = nq === 1 ? '' : `${xsQueueDir(q)}/`;
      const refs: number[] = [];
      for (let i = 0; i < 1 << order; i++) {
        const key = orderText === undefined ? `${dir}${XS_RING_REF}` : `${dir}${xsRingRefN(i)}`;
        const text = await opt(key);
        const ref = text === undefined ? undefined : parseUint(text);
        if (ref === undefined) return this.fatal(`${key} missing or malformed (${text})`);
        refs.push(ref);
      }
      const portText = await opt(`${dir}${XS_EVENT_CHANNEL}`);
      const remotePort = portText === undefined ? undefined : parseUint(portText);
      if (remotePort === undefined) return this.fatal(`${dir}event-channel missing or malformed (${portText})`);
      rings.push({ refs, remotePort });
    }

    const threaded = this.threadsWanted();
    const maxSegs = Math.max(this.options.maxIndirectSegments, BLKIF_MAX_SEGMENTS_PER_REQUEST);
    const how: QueueSetup['access'] = this.options.grantCopy ? { kind: 'copy' }
      : persistent ? { kind: 'persistent', max: this.options.maxPersistentGrants, idleMs: this.options.persistentIdleMs } : { kind: 'map' };
    // Grant copy's bounce pages: one pool per VBD, or a share of it lent to each queue thread
    // (at least one largest request each, plus its indirect pages).
    const lend: number[][] = [];
    const conn: Connection = { local: [], threads: [], pools: [] };
    if (how.kind === 'copy') {
      const want = Math.min(ringSizeFor(XEN_PAGE_SIZE << order, abi.entrySize) * nq * (maxSegs + 8), this.options.grantCopyPages);
      const each = Math.max(maxSegs + 8, Math.floor(want / nq));
      try {
        if (threaded) for (let q = 0; q < nq; q++) lend.push(xen.memory.alloc(each + BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST));
        else conn.pools.push(new BouncePool(xen, xen.memory.alloc(want)));
      } catch (e) {
        for (const f of lend) xen.memory.free(f);
        return this.fatal(`no memory for ${threaded ? `${nq} x ${each}` : want} grant-copy pages: ${(e as Error).message}`);
      }
    }
    this.conn = conn;
    const onFatal = (why: string) => void this.enqueue(() => this.fatal(why));
    // Queue threads start together (each is a new thread: a few tens of ms); the ones that
    // came up join the connection before anything can fail, so a disconnect stops them.
    const started = threaded ? await Promise.all(rings.map((r, q) => QueueThread.start({
      xen, index: q, frontDomid: this.frontDomid, protocol: abi.protocol, ring: r, storage: this.d.storageSpec!,
      limits: this.limits(), maxIndirectSegments: this.options.maxIndirectSegments, reqsPerPage: this.options.reqsPerPage, access: how,
      frames: lend[q] ?? [], housekeepingMs: this.options.housekeepingMs, onFatal, log: (m) => this.log(m),
    }))) : [];
    for (const [q, t] of started.entries()) {
      if (!('why' in t)) conn.threads.push(t);
      else if (lend[q] !== undefined) xen.memory.free(lend[q]);
    }
    const refused = started.find((t) => 'why' in t && !t.noThread);
    if (refused !== undefined && 'why' in refused) return this.fatal(refused.why);
    for (const [q, r] of rings.entries()) {
      // Each queue has its own ring, channel, page access and cache: nothing shared to lock.
      const t = started[q];
      if (t !== undefined) {
        if (!('why' in t)) continue;
        // No thread for it (no vCPU free, or the storage would not open there): serve it here.
        this.log(`${t.why}; serving queue ${q} in this thread`);
        if (how.kind === 'copy') {
          try {
            conn.pools.push(new BouncePool(xen, xen.memory.alloc(maxSegs + 8)));
          } catch (e) {
            return this.fatal(`no memory for queue ${q}'s grant-copy pages: ${(e as Error).message}`);
          }
        }
      }
      const access: QueueAccess = how.kind === 'copy' ? { kind: 'copy', pool: conn.pools.at(-1)! } : how;
      const queue = Queue.open({
        xen, frontDomid: this.frontDomid, abi, storage, access, limits: () => this.limits(),
        maxIndirectSegments: this.options.maxIndirectSegments, reqsPerPage: this.options.reqsPerPage, counters: this.own, onFatal, log: (m) => this.log(m),
      }, r, q);
      if (typeof queue === 'string') return this.fatal(queue);
      conn.local.push(queue);
    }
    this.startTimer();
    const l = this.limits();
    this.sectorsPublished = l.sectors;
    const info = (this.readOnly ? VDISK_READONLY : 0) | (this.options.cdrom ? VDISK_CDROM : 0) | (this.options.removable ? VDISK_REMOVABLE : 0);
    await xs.transaction(async (tx) => {
      await xs.write(`${backDir}/${XS_SECTORS}`, String(l.sectors), tx);
      await xs.write(`${backDir}/${XS_SECTOR_SIZE}`, String(l.sectorSize), tx);
      // Linux: bdev_physical_block_size of the backing device; ours asks the storage.
      await xs.write(`${backDir}/${XS_PHYSICAL_SECTOR_SIZE}`, String(this.options.physicalSectorSize ?? storage.physicalSectorSize ?? l.sectorSize), tx);
      await xs.write(`${backDir}/${XS_INFO}`, String(info), tx);
      await this.writeFeatures(tx);
    });
    this.log(`connected: ${abi.protocol}, ${nq} queue(s)${threaded ? ' in threads of their own' : ''}, ring order ${order}, indirect ${this.options.maxIndirectSegments}, ` +
      `${this.options.grantCopy ? 'grant copy' : persistent ? 'persistent grants' : 'map per request'}, ${l.sectors} sectors of ${l.sectorSize} bytes${this.readOnly ? ', read-only' : ''}`);
    await this.setState(XenbusStateConnected);
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

  /** Housekeeping while connected: purge idle persistent grants, notice a resized image. */
  private startTimer(): void {
    this.stopTimer();
    const every = this.options.housekeepingMs;
    if (every <= 0) return;
    this.timer = setInterval(() => {
      const now = performance.now();
      for (const q of this.conn?.local ?? []) q.tick(now);
      if (this.options.watchSize && !this.sizeChecking) {
        // The storage is asked outside the state queue: an NBD server may take seconds to answer,
        // and state changes must not wait for it.
        this.sizeChecking = true;
        // A storage that fails here is fatal (the state queue's catch), as any control-path error.
        void this.d.storage.refreshSize()
          .then(() => this.enqueue(() => this.checkSize()), (e: unknown) => this.enqueue(() => Promise.reject(e)))
          .finally(() => { this.sizeChecking = false; });
      }
    }, every);
    this.timer.unref();
  }

  private sizeChecking = false;

  private stopTimer(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  /**
   * Online resize (Linux `xen_vbd_resize`): once the storage's size was re-read, if it changed
   * while connected, rewrites `sectors` and then `state` (same value) so the frontend's watch fires.
   */
  private async checkSize(): Promise<void> {
    const sectors = this.limits().sectors;
    if (this.conn === undefined || this.state !== XenbusStateConnected || sectors === this.sectorsPublished) return;
    const { xs, backDir } = this.d;
    this.log(`resized: ${this.sectorsPublished} -> ${sectors} sectors`);
    // Queue threads take the new size before the frontend can learn of it.
    await Promise.all(this.conn.threads.map((t) => t.setLimits(this.limits())));
    await xs.write(`${backDir}/${XS_SECTORS}`, String(sectors));
    this.sectorsPublished = sectors;
    await xs.write(`${backDir}/${XS_STATE}`, String(XenbusStateConnected));
  }

  /**
   * `xenbus_dev_fatal`: record why, stop serving the frontend and move to Closing; the
   * frontend's Closing/Closed then finishes the teardown. Never affects another VBD.
   */
  private async fatal(why: string): Promise<void> {
    this.lastError = why;
    this.log(`fatal: ${why}`);
    await this.disconnect().catch(() => undefined);
    if (this.state !== XenbusStateClosing && this.state !== XenbusStateClosed) {
      await this.setState(XenbusStateClosing).catch(() => undefined);
    }
  }

  private async setState(s: XenbusState): Promise<void> {
    await switchState(this.d.xs, this.d.backDir, 'backend', s);
    this.state = s;
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

/** A decimal u32 as xenstore holds it, or undefined. */
function parseUint(text: string): number | undefined {
  const t = text.trim();
  if (!/^\d{1,10}$/.test(t)) return undefined;
  const n = Number(t);
  return n <= 0xffffffff ? n : undefined;
}

