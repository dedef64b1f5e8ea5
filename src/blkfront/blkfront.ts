/**
 * The guest's block device (Linux xen-blkfront): a promise API over the PV protocol. Each I/O is
 * cut into ring requests under the negotiated limits (plain up to 11 segments, indirect up to the
 * backend's `feature-max-indirect-segments`), tracked in a shadow table keyed by `id`, and
 * completes when all its parts have answered. Every response is checked before it is believed;
 * a backend that breaks the protocol stops the device. When the backend goes away, requests it
 * never answered are kept and issued again, re-split, once a backend connects.
 *
 * This file is the API; the parts, as blkback's: xenbus.ts (control path and recovery),
 * connection.ts (one connection: limits, queues, grants), queue.ts (one ring and its response
 * checks), data-path.ts (submit to complete), request.ts (one ring request), grants.ts (per
 * request or persistent), io.ts (errors, I/O types, the check of an I/O against the disk).
 * A new request kind: its `IoKind` and check in io.ts, its method here, its operation and
 * encoding in request.ts, its answer in data-path.ts `complete`, its feature in negotiate.ts.
 */
import { XEN_PAGE_SIZE } from '../abi/index.js';
import type { XenbusState } from '../xenbus/index.js';
import { DataPath } from './data-path.js';
import { checkIo, newBlkfrontCounters, type BlkfrontCounters, type IoKind } from './io.js';
import { blkfrontOptions, type BlkfrontOptions } from './options.js';
import { PagePool } from './page-pool.js';
import { BlkfrontXenbus, type BlkfrontDeps, type DeviceInfo } from './xenbus.js';

export type { BlkfrontDeps, DeviceInfo } from './xenbus.js';

export { BlkfrontError, type BlkfrontErrorCode, type BlkfrontCounters, type HeldRequest } from './io.js';

/** Pages a read lends its caller (Blkfront.readPages): the data in order, and how to give them back. */
export interface LentPages {
  readonly pages: readonly Uint8Array[];
  release(): void;
}

export class Blkfront {
  readonly counters: BlkfrontCounters = newBlkfrontCounters();
  readonly options: BlkfrontOptions;
  readonly handle: number;
  private readonly pool: PagePool;
  private readonly ctl: BlkfrontXenbus;
  private readonly dataPath: DataPath;
  private closing: Promise<void> | undefined;

  private constructor(d: BlkfrontDeps) {
    this.options = blkfrontOptions(d.options);
    this.handle = Number(d.frontDir.slice(d.frontDir.lastIndexOf('/') + 1)) & 0xffff;
    this.pool = new PagePool(d.xen, this.options.bufferPages);
    const { pool, counters, options } = this;
    const ctl = new BlkfrontXenbus({ ...d, options, pool, counters });
    const dataPath = new DataPath({
      xen: d.xen, pool, counters, handle: this.handle,
      connection: () => ctl.connection,
      phase: () => ctl.phaseNow,
      disk: () => ctl.currentDisk,
      onWaiting: () => ctl.boundWait(),
      onBroken: (why) => ctl.broken(why),
      onRefused: (f) => ctl.dropFeature(f),
    });
    ctl.attach(dataPath);
    this.ctl = ctl;
    this.dataPath = dataPath;
  }

  /** Connects to the backend named in `frontDir` and resolves once the disk is usable. */
  static async attach(d: BlkfrontDeps): Promise<Blkfront> {
    const f = new Blkfront(d);
    try {
      await f.ctl.start();
      await f.ctl.whenConnected();
      return f;
    } catch (e) {
      await f.close().catch(() => undefined);
      throw e;
    }
  }

  /** The disk and the protocol limits in use. */
  get info(): DeviceInfo {
    return this.ctl.info();
  }

  get xenbusState(): XenbusState {
    return this.ctl.state;
  }

  /** Requests on the ring now. */
  get inFlight(): number {
    return this.dataPath.inFlight;
  }

  /** Pages holding a persistent grant now. */
  get persistentGrants(): number {
    return this.ctl.connection?.grants.kept ?? 0;
  }

  /**
   * Linux `purge_persistent_grants`: ends the persistent grants of pages no request holds that
   * the backend no longer maps (its idle purge unmapped them); such a page is granted afresh when
   * used again. Runs every `purgeIntervalMs`; returns how many were ended.
   */
  purgePersistentGrants(): number {
    return this.ctl.purgePersistentGrants();
  }

  /** Frames the backend kept mapped after answering (a misbehaving backend): never reused. */
  get leakedPages(): number {
    return this.pool.leaked;
  }

  read(offset: number, length: number): Promise<Uint8Array> {
    // Every byte is overwritten by a successful read (a failed one is never returned): no zero-fill.
    const buf: Uint8Array = Buffer.allocUnsafeSlow(length);
    return this.submit('read', offset, length, buf, false).then(() => buf);
  }

  /** Reads into `buf` (its length is the length). */
  readInto(offset: number, buf: Uint8Array): Promise<void> {
    return this.submit('read', offset, buf.length, buf, false);
  }

  /**
   * Reads `length` bytes without copying them out of the pages the backend filled: resolves to
   * those pages (the last one cut to the length) on loan to the caller, who reads them and calls
   * `release` once done — until then they carry no other request, so a caller that never releases
   * starves the device. Release once; later calls do nothing.
   */
  readPages(offset: number, length: number): Promise<LentPages> {
    const lent = new Array<number>(Math.ceil(length / XEN_PAGE_SIZE)).fill(-1);
    return this.submit('read', offset, length, undefined, false, lent).then(() => {
      const pages = lent.map((f, i) => {
        const page = this.pool.page(f);
        const rest = length - i * XEN_PAGE_SIZE;
        return rest >= XEN_PAGE_SIZE ? page : page.subarray(0, rest);
      });
      let released = false;
      return {
        pages,
        release: () => {
          if (released) return;
          released = true;
          this.dataPath.giveBack(lent);
        },
      };
    });
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return this.submit('write', offset, data.length, data, false);
  }

  /**
   * Makes completed writes durable: FLUSH_DISKCACHE if offered, else a WRITE_BARRIER, else
   * nothing (a backend offering neither has no volatile cache to flush, as Linux assumes).
   */
  flush(): Promise<void> {
    const disk = this.ctl.currentDisk;
    if (disk !== undefined && !disk.flush && !disk.barrier && checkIo('flush', 0, 0, this.ctl.gate) === undefined) return Promise.resolve();
    return this.submit('flush', 0, 0, undefined, false);
  }

  /** Drops a range (blkif.h promises nothing of what it reads afterwards: see zero-range.ts); `secure` asks for BLKIF_DISCARD_SECURE. */
  discard(offset: number, length: number, opts: { secure?: boolean } = {}): Promise<void> {
    return this.submit('discard', offset, length, undefined, opts.secure === true);
  }

  /**
   * Unplug: refuse new I/O, finish what is queued and in flight, then close with the backend
   * (Closing, the backend unmaps and closes, Closed) and give the pages back. Idempotent.
   */
  close(): Promise<void> {
    this.closing ??= this.ctl.shutdown();
    return this.closing;
  }

  private submit(kind: IoKind, offset: number, length: number, buf: Uint8Array | undefined, secure: boolean, lent?: number[]): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const bad = checkIo(kind, offset, length, this.ctl.gate);
      if (bad !== undefined) return reject(bad);
      if (length === 0 && kind !== 'flush') return resolve();
      this.dataPath.submit({ kind, offset, length, buf, lent, secure, doneBytes: 0, failed: false, resolve, reject });
    });
  }
}
