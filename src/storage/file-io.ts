/**
 * One file descriptor's operations through libuv's threadpool, at most `slots` of them in the pool
 * at once; the rest wait here, first in first out.
 *
 * Why a cap: the pool is process-wide (every worker thread, so every driver domain, shares it) and
 * small (UV_THREADPOOL_SIZE, 4 by default). An image whose disk stalls (a hung NFS server, a FUSE
 * file over a dead network) holds every pool thread its requests reach, for as long as it stalls;
 * uncapped, one stalled image would take all of them and every other image's I/O would queue
 * behind it. Capped, it holds `slots` threads and the others keep theirs, provided the pool has
 * `slots` per handle and some to spare (`blkif serve` sizes it so: src/cli/threadpool.cts).
 *
 * Nothing is allocated per operation but its promise: operation records are reused from a free
 * list, the wait queue is a ring that only grows (blkback's pending pool bounds it), and each
 * record's libuv callback is made once with the record.
 */
import { fdatasync, fstat, readv, writev, type Stats } from 'node:fs';

const READ = 0;
const WRITE = 1;
const DATASYNC = 2;
const FSTAT = 3;
type OpKind = typeof READ | typeof WRITE | typeof DATASYNC | typeof FSTAT;

const NO_BUFFERS: readonly Uint8Array[] = [];

/** One operation: filled from the free list, handed to libuv, back to the free list when done. */
class PoolOp {
  kind: OpKind = READ;
  buffers: readonly Uint8Array[] = NO_BUFFERS;
  position = 0;
  resolve: (n: number) => void = noop;
  reject: (e: unknown) => void = noop;
  /** libuv's callback for this record, made once (readv/writev: bytes; fstat: Stats; fdatasync: none). */
  readonly done: (e: NodeJS.ErrnoException | null, r?: number | Stats) => void;

  constructor(io: FileIo) {
    this.done = (e, r) => io.finished(this, e, r);
  }
}

function noop(): void {}

export class FileIo {
  private inPool = 0;
  private closed = false;
  /** Waiting operations: a ring of `queue.length` slots, `queued` of them from `head`. */
  private queue: (PoolOp | undefined)[] = new Array<PoolOp | undefined>(16);
  private head = 0;
  private queued = 0;
  private readonly free: PoolOp[] = [];
  private idleWaiters: (() => void)[] = [];

  constructor(private readonly fd: number, readonly slots: number) {
    if (!Number.isInteger(slots) || slots < 1) throw new RangeError(`threadpool slots ${slots}: a positive integer, please`);
  }

  /** Operations in the pool now. */
  get running(): number {
    return this.inPool;
  }

  /** Operations waiting for a slot. */
  get waiting(): number {
    return this.queued;
  }

  /** preadv: resolves to the bytes read. */
  readv(buffers: readonly Uint8Array[], position: number): Promise<number> {
    return this.submit(READ, buffers, position);
  }

  /** pwritev: resolves to the bytes written. */
  writev(buffers: readonly Uint8Array[], position: number): Promise<number> {
    return this.submit(WRITE, buffers, position);
  }

  async fdatasync(): Promise<void> {
    await this.submit(DATASYNC, NO_BUFFERS, 0);
  }

  /** fstat's st_size. */
  size(): Promise<number> {
    return this.submit(FSTAT, NO_BUFFERS, 0);
  }

  /**
   * No more operations: the waiting ones fail with `why`, and this resolves once those in the pool
   * are done (only then may the descriptor be closed: a pool thread may not have started on it yet,
   * and a closed descriptor's number can be reused).
   */
  close(why: Error): Promise<void> {
    this.closed = true;
    while (this.queued > 0) {
      const op = this.dequeue();
      const reject = op.reject;
      this.release(op);
      reject(why);
    }
    if (this.inPool === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private submit(kind: OpKind, buffers: readonly Uint8Array[], position: number): Promise<number> {
    return new Promise<number>((resolve, reject) => {
      if (this.closed) {
        reject(new Error('closed'));
        return;
      }
      const op = this.free.pop() ?? new PoolOp(this);
      op.kind = kind;
      op.buffers = buffers;
      op.position = position;
      op.resolve = resolve;
      op.reject = reject;
      if (this.inPool < this.slots) this.start(op);
      else this.enqueue(op);
    });
  }

  private start(op: PoolOp): void {
    this.inPool++;
    try {
      switch (op.kind) {
        case READ: readv(this.fd, op.buffers, op.position, op.done); break;
        case WRITE: writev(this.fd, op.buffers, op.position, op.done); break;
        case DATASYNC: fdatasync(this.fd, op.done); break;
        default: fstat(this.fd, op.done);
      }
    } catch (e) {
      // Node refused the arguments before queueing any work: no callback will come.
      this.finished(op, e as NodeJS.ErrnoException, undefined);
    }
  }

  /** The pool's answer (or a refusal); frees the slot for the next waiting operation. */
  finished(op: PoolOp, e: NodeJS.ErrnoException | null, r: number | Stats | undefined): void {
    this.inPool--;
    const { resolve, reject } = op;
    this.release(op);
    if (!this.closed && this.queued > 0) this.start(this.dequeue());
    if (e !== null) reject(e);
    else resolve(typeof r === 'number' ? r : r === undefined ? 0 : r.size);
    if (this.inPool === 0 && this.idleWaiters.length > 0) {
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const f of w) f();
    }
  }

  private release(op: PoolOp): void {
    op.buffers = NO_BUFFERS; // let the request's pages go
    op.resolve = noop;
    op.reject = noop;
    this.free.push(op);
  }

  private enqueue(op: PoolOp): void {
    if (this.queued === this.queue.length) {
      // Full: unroll into a ring twice the size (rare: blkback's pending pool bounds the queue).
      const bigger = new Array<PoolOp | undefined>(this.queue.length * 2);
      for (let i = 0; i < this.queued; i++) bigger[i] = this.queue[(this.head + i) % this.queue.length];
      this.queue = bigger;
      this.head = 0;
    }
    this.queue[(this.head + this.queued) % this.queue.length] = op;
    this.queued++;
  }

  private dequeue(): PoolOp {
    const op = this.queue[this.head]!;
    this.queue[this.head] = undefined;
    this.head = (this.head + 1) % this.queue.length;
    this.queued--;
    return op;
  }
}
