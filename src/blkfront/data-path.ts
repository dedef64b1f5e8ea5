/**
 * The frontend's request pipeline, read top to bottom as Linux blkfront's: submit -> queue of
 * chunks -> pump (spread over the queues round-robin) -> request.ts builds each ring request ->
 * the backend answers -> queue.ts checks each response -> complete (grants ended, read data
 * copied out, pages back to the pool, bytes accounted to the I/O) -> finish. A protocol
 * violation goes back to the control path (`onBroken`), which stops the device.
 */
import { BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_OKAY, XEN_PAGE_SIZE } from '../abi/index.js';
import type { XenAccess } from '../xen/index.js';
import type { Connection } from './connection.js';
import { givePages } from './grants.js';
import { BlkfrontError, type BlkfrontCounters, type Chunk, type IoOp, type Phase, type RefusedFeature } from './io.js';
import type { DiskInfo } from './negotiate.js';
import type { PagePool } from './page-pool.js';
import { BATCH_WAIT_MS, type Queue } from './queue.js';
import { issueRequest } from './request.js';
import type { ShadowEntry } from './shadow.js';

export interface DataPathDeps {
  readonly xen: XenAccess;
  readonly pool: PagePool;
  readonly counters: BlkfrontCounters;
  readonly handle: number;
  /** The connection of now, if any (also while its backend is closing: its answers still count). */
  readonly connection: () => Connection | undefined;
  /** Where the device stands: requests are issued only while `connected`. */
  readonly phase: () => Phase;
  readonly disk: () => DiskInfo | undefined;
  /** An I/O was queued while no backend is connected: the control path bounds the wait. */
  readonly onWaiting: () => void;
  /** The backend broke the protocol: the control path stops the device (Linux BLKIF_STATE_ERROR). */
  readonly onBroken: (why: string) => void;
  /** The backend refused a feature (BLKIF_RSP_EOPNOTSUPP): the control path stops offering it. */
  readonly onRefused: (f: RefusedFeature) => void;
}

export class DataPath {
  /** Chunks waiting for a ring slot, pages, or a connection; re-issued ones go first. */
  private queue: Chunk[] = [];
  private drainWaiters: (() => void)[] = [];
  private ringWaiters: (() => void)[] = [];

  constructor(private readonly d: DataPathDeps) {}

  /** Requests on the rings now. */
  get inFlight(): number {
    let n = 0;
    for (const q of this.d.connection()?.queues ?? []) n += q.shadow.inFlight;
    return n;
  }

  /** Queues an I/O the caller's checks accepted, and issues what it can. */
  submit(op: IoOp): void {
    this.queue.push({ op, start: 0, length: op.length });
    // Waiting for a backend is bounded for every I/O, also those queued after a timer fired.
    if (this.d.phase() !== 'connected') this.d.onWaiting();
    this.pump();
  }

  /** Requests a backend never answered, issued again ahead of the rest (Linux `blkif_recover`). */
  requeue(again: readonly Chunk[]): void {
    this.queue.unshift(...again);
  }

  /** Moves queued chunks onto the rings (spread round-robin) while they have slots and the pool has pages. */
  pump(): void {
    const conn = this.d.connection();
    if (conn === undefined || this.d.phase() !== 'connected') return;
    const nq = conn.queues.length;
    let produced = 0;
    while (this.queue.length > 0) {
      const c = this.queue[0]!;
      if (c.op.failed) {
        this.queue.shift();
        continue;
      }
      let q: Queue | undefined;
      for (let k = 0; k < nq && q === undefined; k++) {
        const cand = conn.queues[(conn.next + k) % nq]!;
        if (cand.hasRoom) q = cand;
      }
      if (q === undefined || !this.issue(conn, q, c)) break;
      conn.next = (q.index + 1) % nq;
      this.unpushed.add(q);
      produced++;
    }
    this.wakeDrained();
    if (produced === 0 || this.pushQueued) return;
    // Published once the I/Os submitted together are on the ring (Linux blkfront flushes at the
    // last request of a batch, bd->last): one push and at most one notification for all of them,
    // not a push per I/O with the backend woken by the first and asking again for the next.
    this.pushQueued = true;
    queueMicrotask(this.push);
  }

  /** Queues with requests produced and not yet published (see pump). */
  private readonly unpushed = new Set<Queue>();
  private pushQueued = false;

  /**
   * RING_PUSH_REQUESTS_AND_CHECK_NOTIFY on every queue pump produced on that is still one of the
   * connection's (a torn-down queue's ring is gone; its requests were taken back for re-issue).
   */
  private readonly push = (): void => {
    this.pushQueued = false;
    const queues = this.d.connection()?.queues ?? [];
    for (const q of this.unpushed) {
      if (queues.includes(q) && q.ring.pushRequestsAndCheckNotify()) {
        this.d.counters.notify_sent++;
        this.d.xen.events.notify(q.port);
      }
    }
    this.unpushed.clear();
  };

  /** The head of `c` onto `q`: false if it must wait for pages or grants (the chunk stays queued). */
  private issue(conn: Connection, q: Queue, c: Chunk): boolean {
    const disk = this.d.disk()!;
    if (c.op.kind === 'flush' && !disk.flush && !disk.barrier) {
      // Queued before the backend refused flushing (EOPNOTSUPP drops the feature): there is
      // nothing left to send it as (a WRITE_BARRIER was never offered), so it completes as the
      // refused one did; Linux's blkfront likewise stops flushing (xlvbd_flush).
      this.queue.shift();
      this.finish(c.op, undefined);
      return true;
    }
    const r = issueRequest({ conn, pool: this.d.pool, disk, handle: this.d.handle, counters: this.d.counters }, q, c);
    switch (r.kind) {
      case 'issued':
        // The request carries [c.start, c.start + bytes); the rest of the chunk stays queued.
        if (r.bytes < c.length) {
          c.start += r.bytes;
          c.length -= r.bytes;
        } else {
          this.queue.shift();
        }
        return true;
      case 'wait':
        return false;
      case 'no-grant':
        // Wait for completions to free grant entries (Linux gnttab_request_free_callback); with
        // nothing in flight to free any, fail this I/O.
        if (this.inFlight !== 0) return false;
        this.queue.shift();
        this.finish(c.op, r.err);
        return true;
      case 'fail':
        this.queue.shift();
        this.finish(c.op, r.err);
        return true;
    }
  }

  /** A queue's backend notified us: take its responses, then issue what they made room for. */
  onEvent(conn: Connection, q: Queue): void {
    if (!this.live(conn)) return;
    this.d.counters.notify_received++;
    this.service(conn, q);
  }

  private live(conn: Connection): boolean {
    return this.d.connection() === conn && this.d.phase() !== 'broken';
  }

  /**
   * Consumes, completes, refills; the final check (which arms the next notification) waits for
   * the turn of the event loop after, once the completed I/Os' callers have issued their next
   * ones, so the batch it asks for counts them (Queue.finalCheck). Until then rsp_event stays
   * behind rsp_prod: the backend does not notify, and the final check looks at the ring itself.
   */
  private service(conn: Connection, q: Queue): void {
    const why = q.consumeResponses((s, status) => {
      this.d.counters.responses++;
      this.complete(conn, q, s, status);
      return this.live(conn);
    });
    if (why !== undefined) return this.d.onBroken(why);
    if (!this.live(conn)) return;
    this.pump();
    if (q.checkQueued) return;
    q.checkQueued = true;
    setImmediate(() => {
      q.checkQueued = false;
      if (!this.live(conn)) return;
      if (q.finalCheck() !== 0) this.service(conn, q);
      else if (q.batchArmed) this.awaitBatch(conn, q);
    });
  }

  /**
   * A batch was asked for: should it not come within BATCH_WAIT_MS (the rest of it is slow), the
   * answers already there are taken and every later one notified. Each final check restarts the
   * wait, so while batches keep coming it never fires.
   */
  private awaitBatch(conn: Connection, q: Queue): void {
    if (q.batchTimer !== undefined) {
      q.batchTimer.refresh();
      return;
    }
    q.batchTimer = setTimeout(() => {
      if (this.live(conn) && q.ring.finalCheckForResponses(1) !== 0) this.service(conn, q);
    }, BATCH_WAIT_MS);
    q.batchTimer.unref();
  }

  /** One request answered: release its grants and pages, then account it to its I/O. */
  private complete(conn: Connection, q: Queue, s: ShadowEntry<Chunk>, status: number): void {
    const c = s.owner!;
    const op = c.op;
    const pool = this.d.pool;
    const leaked = conn.grants.end(s);
    if (leaked > 0) {
      // Linux `blkif_completion`: a grant the backend still maps after answering is a backend
      // bug. Those pages are never reused, the device stops, and this I/O fails with the rest.
      givePages(pool, s);
      q.shadow.release(s);
      const why = `backend still maps ${leaked} page(s) of a request it answered`;
      this.d.onBroken(why);
      this.finish(op, new BlkfrontError('EIO', `backend misbehaved: ${why}`));
      return;
    }
    if (status === BLKIF_RSP_OKAY && op.lent !== undefined && !op.failed) {
      // Lent, not copied: the caller gets the pages themselves and gives them back (giveBack).
      const first = c.start / XEN_PAGE_SIZE;
      for (let i = 0; i < s.frames.length; i++) {
        const f = s.frames[i]!;
        pool.lend(f);
        op.lent[first + i] = f;
        s.frames[i] = -1;
      }
    } else if (status === BLKIF_RSP_OKAY && op.kind === 'read' && !op.failed) {
      const buf = op.buf!;
      for (let i = 0; i < s.frames.length; i++) {
        const at = c.start + i * XEN_PAGE_SIZE;
        const len = c.length - i * XEN_PAGE_SIZE;
        const page = pool.page(s.frames[i]!);
        // A whole page is copied as it is: no view made per page of a 1 MiB read.
        buf.set(len >= XEN_PAGE_SIZE ? page : page.subarray(0, len), at);
      }
    }
    givePages(pool, s);
    q.shadow.release(s);
    if (status !== BLKIF_RSP_OKAY) {
      this.d.counters.errors++;
      if (status === BLKIF_RSP_EOPNOTSUPP && (op.kind === 'flush' || op.kind === 'discard')) {
        // Linux blkif_interrupt: the feature is gone for good once the backend says so.
        this.d.onRefused(op.kind === 'discard' ? 'discard' : s.expectOp === BLKIF_OP_FLUSH_DISKCACHE ? 'flush' : 'barrier');
        if (op.kind === 'flush') return this.finish(op, undefined);
        return this.finish(op, new BlkfrontError('EOPNOTSUPP', 'the backend does not support discard'));
      }
      return this.finish(op, new BlkfrontError('EIO', `${op.kind} of ${c.length} bytes at ${op.offset + c.start}: backend answered ${status}`));
    }
    op.doneBytes += c.length;
    if (op.doneBytes >= op.length) this.finish(op, undefined);
    else this.wakeDrained();
  }

  private finish(op: IoOp, err: Error | undefined): void {
    if (!op.failed) {
      if (err !== undefined) {
        op.failed = true;
        // Pages already lent by this read's answered requests: the caller never sees them.
        if (op.lent !== undefined) this.giveBack(op.lent);
        op.reject(err);
      } else {
        op.doneBytes = op.length;
        op.resolve();
      }
    }
    this.wakeDrained();
  }

  /**
   * Pages a read lent (`IoOp.lent`) come back: free for requests again, and queued I/O waiting
   * for pages is issued. Each frame once: the list is emptied.
   */
  giveBack(frames: number[]): void {
    for (const f of frames) if (f >= 0) this.d.pool.giveBack(f);
    frames.fill(-1);
    this.pump();
  }

  /** Fails every I/O queued or in flight, and wakes close() (nothing it waits for will come). */
  failAll(err: Error): void {
    const ops = new Set<IoOp>();
    for (const c of this.queue) ops.add(c.op);
    this.queue = [];
    for (const q of this.d.connection()?.queues ?? []) for (const s of q.shadow.pendingEntries()) if (s.owner !== undefined) ops.add(s.owner.op);
    for (const op of ops) this.finish(op, err);
    for (const w of this.drainWaiters.splice(0)) w();
  }

  /**
   * Wakes close() once nothing is queued or in flight. Not only when an I/O settles: the last
   * request of an I/O that already failed is answered (or its queued rest dropped) with no I/O
   * left to settle, and close() must not wait for one.
   */
  private wakeDrained(): void {
    if (this.ringWaiters.length > 0 && this.inFlight === 0) for (const w of this.ringWaiters.splice(0)) w();
    if (this.drainWaiters.length > 0 && this.inFlight === 0 && this.queue.length === 0) for (const w of this.drainWaiters.splice(0)) w();
  }

  /** Resolves once nothing is on the ring (queued I/O may wait), or after `ms`. */
  ringIdle(ms: number): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const t = setTimeout(done, ms);
      function done(): void { clearTimeout(t); resolve(); }
      this.ringWaiters.push(done);
    });
  }

  /** Resolves once nothing is queued or in flight. */
  drained(): Promise<void> {
    if (this.inFlight === 0 && this.queue.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }
}
