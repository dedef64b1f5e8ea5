/**
 * The frontend's control path (Linux blkfront's xenbus half): follow the backend's state
 * (`blkback_changed`) and our `backend` link (the disk moved to another driver domain), set up a
 * connection and publish its rings (`talk_to_blkback`), take the disk once the backend is
 * Connected (`blkfront_connect`), and let go of a connection when the backend goes away, keeping
 * what it never answered to be issued again (`blkif_recover`). Every step runs one at a time on
 * the XenbusDevice. Also the timers: how long I/O may wait for a backend, and the persistent-grant
 * purge.
 *
 * One file (about 400 lines) on purpose, as Linux keeps it in xen-blkfront.c: the state dance,
 * the connection's set-up and teardown and the recovery share the one phase and connection they
 * change, step by step on the XenbusDevice; the records it reads and writes live in
 * abi/negotiation.ts, the data path in data-path.ts (RequestPipe).
 */
import { BLKIF_MAX_SEGMENTS_PER_REQUEST, EIO, frontendRingNodes } from '../abi/index.js';
import type { XenAccess } from '../xen/index.js';
import {
  XS_BACKEND,
  XS_BACKEND_ID,
  XS_STATE,
  XenbusDevice,
  XenbusStateClosed,
  XenbusStateClosing,
  XenbusStateConnected,
  XenbusStateInitWait,
  XenbusStateInitialised,
  XenbusStateInitialising,
  everyPeriod,
  waitForState,
  writeNodes,
  xenbusStateName,
  type XenbusState,
} from '../xenbus/index.js';
import type { XenstoreClient } from '../xenstore/index.js';
import { openConnection, releaseConnection, settlePersistent, type Connection } from './connection.js';
import { BlkfrontError, type BlkfrontCounters, type Chunk, type HeldRequest, type IoGate, type Phase, type RefusedFeature } from './io.js';
import { NegotiationError, readBackendTransport, readDiskInfo, type DiskInfo } from './negotiate.js';
import type { BlkfrontOptions } from './options.js';
import type { PagePool } from './page-pool.js';
import type { Queue } from './queue.js';

export interface BlkfrontDeps {
  readonly xen: XenAccess;
  readonly xs: XenstoreClient;
  /** The frontend directory the toolstack created (with `backend`, `backend-id`, `state`). */
  readonly frontDir: string;
  readonly options?: Partial<BlkfrontOptions>;
  readonly log?: (msg: string) => void;
  /** Told, at each teardown, which requests the backend left unanswered (they are issued again). */
  readonly onReissue?: (held: readonly HeldRequest[]) => void;
}

/** What the device is now, as negotiated. */
export interface DeviceInfo extends DiskInfo {
  /** Bytes of the disk. */
  size: number;
  /** Segments per request in use: 11 without indirect, else the negotiated indirect maximum. */
  maxSegments: number;
  indirect: boolean;
  ringPageOrder: number;
  /** Slots per ring; `queues` rings. */
  ringSize: number;
  queues: number;
  /** Persistent grants negotiated. */
  persistent: boolean;
  protocol: string;
}


export interface ControlDeps extends BlkfrontDeps {
  readonly options: BlkfrontOptions;
  readonly pool: PagePool;
  readonly counters: BlkfrontCounters;
}

/**
 * What the control path asks of the data path (data-path.ts implements it; Blkfront attaches it
 * once): a connection's events, issue what waits, take back what a backend left unanswered, fail
 * everything, wait for the rings to drain. The data path reads the control path's state through
 * the getters below; neither file imports the other.
 */
export interface RequestPipe {
  onEvent(conn: Connection, q: Queue): void;
  pump(): void;
  requeue(again: readonly Chunk[]): void;
  failAll(err: Error): void;
  drained(): Promise<void>;
  /** Resolves once nothing is on the ring, or after `ms` (what is still there stays for recovery). */
  ringIdle(ms: number): Promise<void>;
}

export class BlkfrontXenbus {
  private phase: Phase = 'connecting';
  private conn: Connection | undefined;
  private disk: DiskInfo | undefined;
  /** Our end on xenbus: state, the backend watched, control-path steps one at a time. */
  private readonly dev: XenbusDevice;
  private backDir = '';
  private waitTimer: NodeJS.Timeout | undefined;
  /** Ends this device's share of the thread's one purge timer (everyPeriod, as Linux's one blkfront_delay_work). */
  private stopPurge: (() => void) | undefined;
  private connectedWaiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  private brokenReason: string | undefined;
  private userClosing = false;
  private infoCache: DeviceInfo | undefined;
  private infoCacheConn: Connection | undefined;

  constructor(private readonly d: ControlDeps) {
    this.dev = new XenbusDevice({ xs: d.xs, side: 'frontend', nodename: d.frontDir, onError: async (e) => {
      // Linux blkfront's `xenbus_dev_error`/`_fatal` on a failed step: say why in our `error` node.
      this.log(`xenbus: ${e.message}`);
      await this.dev.error(e instanceof NegotiationError ? e.errno : EIO, e.message);
    } });
  }

  private pipe: RequestPipe | undefined;

  /** The data path, attached once before `start`. */
  attach(pipe: RequestPipe): void {
    if (this.pipe !== undefined) throw new Error('blkfront: a data path is attached already');
    this.pipe = pipe;
  }

  private get dataPath(): RequestPipe {
    return this.pipe!;
  }

  get state(): XenbusState {
    return this.dev.state;
  }

  get phaseNow(): Phase {
    return this.phase;
  }

  get connection(): Connection | undefined {
    return this.conn;
  }

  get currentDisk(): DiskInfo | undefined {
    return this.disk;
  }

  /** What an I/O is checked against (io.ts `checkIo`). */
  get gate(): IoGate {
    return {
      closing: this.userClosing || this.phase === 'closed',
      stopped: this.phase === 'broken' ? this.brokenReason : undefined,
      disk: this.disk,
    };
  }

  /** The disk and the protocol limits in use. */
  info(): DeviceInfo {
    const disk = this.disk;
    const conn = this.conn;
    if (disk === undefined) throw new BlkfrontError('ESHUTDOWN', 'not connected');
    // Read on every request by exporters: built once per change (connect, resize, feature
    // dropped, connection lost), not per call.
    if (this.infoCache !== undefined && this.infoCacheConn === conn) return this.infoCache;
    this.infoCacheConn = conn;
    return (this.infoCache = {
      ...disk,
      size: disk.sectors * 512,
      maxSegments: conn?.maxSegments ?? BLKIF_MAX_SEGMENTS_PER_REQUEST,
      indirect: conn?.indirect ?? false,
      ringPageOrder: conn?.ringPageOrder ?? 0,
      ringSize: conn?.queues[0]?.ring.size ?? 0,
      queues: conn?.queues.length ?? 0,
      persistent: conn?.persistent ?? false,
      protocol: conn?.abi.protocol ?? this.d.options.protocol,
    });
  }

  /**
   * Linux `purge_persistent_grants`: ends the persistent grants of pages no request holds that
   * the backend no longer maps (its idle purge unmapped them); such a page is granted afresh when
   * used again. Runs every `purgeIntervalMs`; returns how many were ended.
   */
  purgePersistentGrants(): number {
    const conn = this.conn;
    if (conn === undefined || !conn.persistent || conn.grants.kept === 0) return 0;
    const n = conn.grants.purge();
    this.d.counters.persistent_purged += n;
    return n;
  }

  /** Reads our `backend` link and state, then follows the backend's state and the link. */
  async start(): Promise<void> {
    const { xs, frontDir } = this.d;
    this.backDir = await xs.read(`${frontDir}/${XS_BACKEND}`);
    await this.dev.readOwnState();
    this.armWaitTimer();
    await this.dev.watchOtherend(this.backDir, () => this.backendChanged());
    // The toolstack rewrites `backend` when the disk moves to another driver domain (migration,
    // a backend restarted elsewhere): follow it.
    await this.dev.watch(`${frontDir}/${XS_BACKEND}`, () => this.backendMoved());
  }

  whenConnected(): Promise<void> {
    if (this.phase === 'connected') return Promise.resolve();
    return new Promise((resolve, reject) => this.connectedWaiters.push({ resolve, reject }));
  }

  /** Our `backend` node changed: let go of the old backend's ring and follow the new one. */
  private async backendMoved(): Promise<void> {
    if (this.phase === 'closed' || this.userClosing) return;
    const { xs, frontDir } = this.d;
    const dir = await xs.read(`${frontDir}/${XS_BACKEND}`).catch(() => undefined);
    if (dir === undefined || dir === this.backDir) return;
    this.log(`backend moved: ${this.backDir} -> ${dir}`);
    await this.dev.unwatch(`${this.backDir}/${XS_STATE}`);
    // Requests the old backend never answered are kept and go to the new one.
    this.teardown();
    if (this.state !== XenbusStateClosed && this.state !== XenbusStateInitialising) await this.dev.switchState(XenbusStateClosed);
    if (this.state === XenbusStateClosed) await this.dev.switchState(XenbusStateInitialising);
    this.backDir = dir;
    await this.dev.watchOtherend(dir, () => this.backendChanged());
  }

  /** Linux `blkback_changed`: follow the backend's state. */
  private async backendChanged(): Promise<void> {
    if (this.phase === 'closed' || this.phase === 'broken') return;
    const bs = await this.dev.otherendState();
    switch (bs) {
      case XenbusStateInitWait:
      case XenbusStateInitialised:
        if (this.userClosing || this.conn !== undefined) break;
        if (this.state === XenbusStateClosed) await this.dev.switchState(XenbusStateInitialising);
        await this.talkToBackend();
        break;
      case XenbusStateConnected:
        if (this.userClosing) break;
        if (this.conn === undefined) {
          // Connected to a frontend that is no more (a guest restarted without closing): reset it
          // as Linux's xenbus_reset_state does — Closing, the backend closes, then start over.
          if (this.state !== XenbusStateClosing) {
            this.log('backend is already connected to an earlier frontend: resetting it');
            await this.dev.switchState(XenbusStateClosing);
          }
          break;
        }
        await this.connected();
        break;
      case XenbusStateClosing:
        if (this.conn !== undefined && this.state !== XenbusStateClosing) {
          // Stop issuing; the backend answers what it consumed, unmaps, and goes Closed. One that
          // never does keeps our requests: they wait for it no longer than for a new backend.
          this.phase = 'connecting';
          this.armWaitTimer();
          await this.dev.switchState(XenbusStateClosing);
          // Linux's blkback goes Closed only once we are (its frontend_changed), as Linux's
          // blkfront_closing does at once: let the ring's requests be answered, then let go
          // (what was never answered is issued again to the next backend) and close our end.
          // Not awaited here: the backend's own Closed (ours goes Closed on our Closing) must not
          // wait behind it.
          const conn = this.conn;
          void this.dataPath.ringIdle(this.d.options.connectTimeoutMs).then(() => this.dev.enqueue(async () => {
            if (this.conn !== conn || this.state !== XenbusStateClosing || this.userClosing) return;
            this.teardown();
            await this.dev.switchState(XenbusStateClosed);
          })).catch((e: unknown) => this.log(`closing: ${(e as Error).message}`));
        }
        break;
      case XenbusStateClosed:
      case undefined:
        this.teardown();
        if (this.state !== XenbusStateClosed && this.state !== XenbusStateInitialising) await this.dev.switchState(XenbusStateClosed);
        // Ask for a new connection (blkif.h: a closed frontend may initialise again).
        if (!this.userClosing && bs === XenbusStateClosed) await this.dev.switchState(XenbusStateInitialising);
        break;
      default:
    }
  }

  /** Linux `talk_to_blkback`: set up the rings and channels, publish them, go Initialised. */
  private async talkToBackend(): Promise<void> {
    const { xen, xs, frontDir, options } = this.d;
    const backDomid = Number(await xs.read(`${frontDir}/${XS_BACKEND_ID}`));
    const transport = await readBackendTransport(xs, this.backDir, options.maxIndirectSegments);
    // Pages an earlier backend kept mapped come back if it has let go since (or its domain went).
    const back = this.d.pool.retryStuck();
    if (back > 0) this.log(`${back} page(s) an earlier backend kept mapped are free again`);
    const conn = openConnection({
      xen, pool: this.d.pool, counters: this.d.counters, options, transport, backDomid, backDir: this.backDir,
      adopt: (c) => (this.conn = c),
      onEvent: (c, q) => this.dataPath.onEvent(c, q),
    });
    const rings = frontendRingNodes({
      abi: conn.abi, order: conn.ringPageOrder, persistent: options.persistent,
      queues: conn.queues.map((q) => ({ refs: q.ringRefs, port: q.port })),
    });
    await xs.transaction((tx) => writeNodes(xs, frontDir, rings, tx));
    await this.dev.switchState(XenbusStateInitialised);
  }

  /** Linux `blkfront_connect`: read the disk, go Connected, issue what waited; later calls are resizes. */
  private async connected(): Promise<void> {
    const fresh = this.state !== XenbusStateConnected;
    const disk = await readDiskInfo(this.d.xs, this.backDir);
    if (!fresh && this.disk !== undefined) {
      if (disk.sectors !== this.disk.sectors) this.log(`resized: ${this.disk.sectors} -> ${disk.sectors} sectors`);
      this.disk.sectors = disk.sectors;
      this.infoCache = undefined;
      return;
    }
    this.disk = disk;
    this.infoCache = undefined;
    // The backend's offer read again as the negotiation's record reads it (feature-persistent).
    const offered = (await readBackendTransport(this.d.xs, this.backDir, this.d.options.maxIndirectSegments)).persistent;
    if (this.conn !== undefined && settlePersistent(this.conn, offered, this.d)) this.log(`backend ${offered ? 'offers' : 'withdrew'} feature-persistent once connected`);
    await this.dev.switchState(XenbusStateConnected);
    this.phase = 'connected';
    clearTimeout(this.waitTimer);
    this.waitTimer = undefined;
    const c = this.conn!;
    this.log(`connected to ${this.backDir}: ${c.abi.protocol}, ${c.queues.length} queue(s) of ${c.queues[0]!.ring.size} slots, ` +
      `${c.indirect ? `indirect ${c.maxSegments}` : 'no indirect'} segments, ${c.persistent ? 'persistent grants' : 'grant per request'}, ${disk.sectors} sectors of ${disk.sectorSize}`);
    for (const w of this.connectedWaiters.splice(0)) w.resolve();
    this.stopPurge?.();
    this.stopPurge = c.persistent && this.d.options.purgeIntervalMs > 0
      ? everyPeriod(this.d.options.purgeIntervalMs, () => this.purgePersistentGrants()) : undefined;
    this.dataPath.pump();
  }

  /**
   * Lets go of the ring. Requests the backend never answered go back to the head of the queue, to
   * be issued again (re-split under the new limits) once a backend connects (Linux `blkif_recover`),
   * or failed by close() or the wait timer.
   */
  private teardown(): void {
    const conn = this.conn;
    if (conn === undefined) return;
    this.conn = undefined;
    this.stopPurge?.();
    this.stopPurge = undefined;
    if (this.phase === 'connected') this.phase = 'connecting';
    const { again, held, ringLeaked } = releaseConnection(conn, this.d.xen, this.d.pool);
    if (ringLeaked > 0) this.log(`backend still maps the ring: ${ringLeaked} page(s) not reused`);
    if (again.length > 0) {
      this.d.counters.reissued += again.length;
      this.dataPath.requeue(again);
    }
    if (held.length > 0) this.d.onReissue?.(held);
    // Closing: no backend will come for them.
    if (this.userClosing) this.failAll(new BlkfrontError('ESHUTDOWN', 'device closed while its backend went away'));
    else this.armWaitTimer();
  }

  /** Queued I/O may wait for a backend only so long. */
  private armWaitTimer(): void {
    clearTimeout(this.waitTimer);
    this.waitTimer = setTimeout(() => {
      this.waitTimer = undefined;
      if (this.phase === 'connected' || this.phase === 'closed') return;
      const err = new BlkfrontError('ETIMEDOUT', `no backend connected at ${this.backDir} within ${this.d.options.connectTimeoutMs} ms (backend ${this.backDir} state ${xenbusStateName(this.state)})`);
      this.failAll(err);
    }, this.d.options.connectTimeoutMs);
    this.waitTimer.unref();
  }

  /** An I/O was queued with no backend connected: its wait is bounded too. */
  boundWait(): void {
    if (this.waitTimer === undefined) this.armWaitTimer();
  }

  /** The backend broke the protocol: fail everything, stop using the ring (Linux BLKIF_STATE_ERROR). */
  broken(why: string): void {
    if (this.phase === 'broken') return;
    this.phase = 'broken';
    this.brokenReason = why;
    this.log(`backend misbehaved, device stopped: ${why}`);
    this.failAll(new BlkfrontError('EIO', `backend misbehaved: ${why}`));
    void this.dev.enqueue(() => this.dev.switchState(XenbusStateClosing).catch(() => undefined));
  }

  /** The backend answered EOPNOTSUPP: the feature is not used any more. */
  dropFeature(f: RefusedFeature): void {
    const disk = this.disk;
    if (disk === undefined) return;
    if (f === 'flush') disk.flush = false;
    else if (f === 'barrier') disk.barrier = false;
    else disk.discard = false;
    this.infoCache = undefined;
    this.log(`backend refused ${f}: not using it any more`);
  }

  private failAll(err: Error): void {
    this.dataPath.failAll(err);
    for (const w of this.connectedWaiters.splice(0)) w.reject(err);
  }

  /**
   * Unplug: refuse new I/O, finish what is queued and in flight, then close with the backend
   * (Closing, the backend unmaps and closes, Closed) and give the pages back.
   */
  async shutdown(): Promise<void> {
    this.userClosing = true;
    if (this.phase === 'connected') await this.dataPath.drained();
    await this.dev.unwatchAll();
    await this.dev.enqueue(async () => {
      // Also when the device stopped on a protocol violation: a correct backend still maps the
      // ring until it sees Closing and closes; tearing down first would leak those grants.
      if (this.conn !== undefined) {
        if (this.state !== XenbusStateClosing) await this.dev.switchState(XenbusStateClosing).catch(() => undefined);
        await waitForState(this.d.xs, this.backDir, (s) => s === XenbusStateClosed || s === undefined, this.d.options.connectTimeoutMs).catch(() => undefined);
      }
      this.teardown();
      await this.dev.switchState(XenbusStateClosed).catch(() => undefined);
    });
    this.phase = 'closed';
    this.failAll(new BlkfrontError('ESHUTDOWN', 'device closed'));
    clearTimeout(this.waitTimer);
    this.stopPurge?.();
    this.stopPurge = undefined;
    // The last chance to end grants a backend kept mapped: one that has let go since gets them
    // ended now, so nothing stays granted to it once we are gone.
    this.d.pool.retryStuck();
    this.d.pool.dispose();
  }

  private log(msg: string): void {
    this.d.log?.(`blkfront ${this.d.frontDir}: ${msg}`);
  }
}
