/**
 * The NBD client's connections to one export and the requests waiting for them: requests go
 * round-robin to connections with room (several only with NBD_FLAG_CAN_MULTI_CONN); a lost
 * connection's requests go back to the head of the line for whichever connection is up next;
 * a connection that cannot be re-established leaves its work to the others, and when none is
 * left every pending and later request fails with EIO naming the server.
 */
import { NbdClientError } from './client-error.js';
import { Connection, type ConnectionOwner, type Op, type ReconnectPolicy } from './client-connection.js';
import type { NbdExportInfo, Session } from './client-handshake.js';
import type { NbdTarget } from './uri.js';

/** Longest READ/WRITE when the server states no maximum (the protocol's safe default). */
const DEFAULT_MAX_IO = 32 * 1024 * 1024;

/** Counters, for tests and status lines. */
export interface NbdClientStats {
  /** Connections in use (connected or being reconnected). */
  readonly connections: number;
  /** Connections up right now. */
  readonly connected: number;
  /** NBD requests sent and not yet answered. */
  readonly inFlight: number;
  /** NBD requests waiting for a connection (its depth reached, or it being reconnected). */
  readonly queued: number;
  /** NBD requests sent, counting re-sends. */
  readonly requests: number;
  /** Requests sent again after their connection was lost. */
  readonly resent: number;
  /** Connections lost (dropped, broken or timed out). */
  readonly drops: number;
  /** Of those, connections cut because a request went unanswered for `timeoutMs`. */
  readonly timeouts: number;
  /** Successful reconnections. */
  readonly reconnects: number;
  /** Requests the server answered with an error. */
  readonly errors: number;
}

export interface PoolConfig {
  readonly target: NbdTarget;
  readonly where: string;
  readonly sectorSize: number;
  /** Smallest export size a reconnected session may report (the size in use; follows a resize). */
  size: number;
  readonly depth: number;
  readonly timeoutMs: number;
  readonly reconnect: ReconnectPolicy;
  readonly log: (msg: string) => void;
}

/** The connections to one export and the requests waiting for them. */
export class Pool implements ConnectionOwner {
  readonly conns: Connection[] = [];
  readonly counters = { requests: 0, resent: 0, drops: 0, timeouts: 0, reconnects: 0, errors: 0 };
  /** Set once close() tears down: no more reconnecting. */
  stopping = false;
  /** Set once the server is given up on: every request fails with it. */
  failure: NbdClientError | undefined;
  private readonly queue: Op[] = [];
  private requeued: Op[] = [];
  private rr = 0;
  private handles = 0n;
  /** Requests not yet settled, and who waits for there to be none. */
  private outstanding = 0;
  private drainWaiters: (() => void)[] = [];

  constructor(readonly cfg: PoolConfig) {}

  get where(): string {
    return this.cfg.where;
  }

  log(msg: string): void {
    try {
      this.cfg.log(msg);
    } catch {
      // a failing logger must not break I/O
    }
  }

  nextHandle(): bigint {
    return ++this.handles;
  }

  add(session: Session): void {
    const c = new Connection(this, this.conns.length);
    this.conns.push(c);
    c.adopt(session);
  }

  stats(): NbdClientStats {
    let inFlight = 0;
    let queued = this.queue.length;
    let connections = 0;
    let connected = 0;
    for (const c of this.conns) {
      inFlight += c.inflight.size;
      queued += c.bound.length;
      if (c.state !== 'dead') connections++;
      if (c.state === 'ready') connected++;
    }
    return { connections, connected, inFlight, queued, ...this.counters };
  }

  /** One request; `bound` for one that must go on a given connection. */
  submit(command: number, flags: number, offset: number, length: number, segments: Uint8Array[], bound?: Connection): Promise<void> {
    if (this.failure !== undefined) return Promise.reject(new NbdClientError('EIO', this.failure.message));
    return new Promise<void>((resolve, reject) => {
      let settled = false;
      this.outstanding++;
      const op: Op = {
        command, flags, offset, length, segments, bound, sends: 0, handle: 0n, sentAt: 0, got: 0, error: undefined,
        settle: (err) => {
          if (settled) return;
          settled = true;
          if (--this.outstanding === 0) {
            const w = this.drainWaiters;
            this.drainWaiters = [];
            for (const f of w) f();
          }
          if (err === undefined) resolve();
          else reject(err);
        },
      };
      if (bound !== undefined) bound.bound.push(op);
      else this.queue.push(op);
      this.pump();
    });
  }

  /** A lost connection's request, back at the head of the line (call in order, then requeueDone). */
  requeue(op: Op): void {
    this.requeued.push(op);
  }

  requeueDone(): void {
    this.queue.unshift(...this.requeued);
    this.requeued = [];
    this.pump();
  }

  /** Throws unless a reconnected session still serves the export in use. */
  checkCompatible(info: NbdExportInfo): void {
    if (info.exportSize < this.cfg.size) throw new NbdClientError('EIO', `the export shrank to ${info.exportSize} bytes`);
    ioLimit(info, this.cfg.sectorSize, this.where);
  }

  /** A connection could not be re-established: carry on with the others, or fail everything. */
  connectionGaveUp(c: Connection, reason: string): void {
    const ops = c.kill();
    const others = this.conns.filter((o) => o.state !== 'dead');
    if (others.length > 0) {
      this.log(`${this.where}: connection ${c.id}: ${reason}; carrying on with ${others.length} connection(s)`);
      for (const op of ops) {
        if (op.bound !== undefined) {
          op.bound = others[0];
          others[0]!.bound.push(op);
        } else {
          this.queue.push(op);
        }
      }
      this.pump();
      return;
    }
    this.failure = new NbdClientError('EIO', `NBD server ${this.where} is unreachable: ${reason}`);
    this.log(`${this.where}: ${reason}; failing every request`);
    for (const op of [...ops, ...this.queue.splice(0)]) op.settle(this.failure);
  }

  /** Hands waiting requests to connections with room, round-robin. */
  pump(): void {
    const n = this.conns.length;
    for (const c of this.conns) c.cork();
    try {
      for (const c of this.conns) c.pumpBound();
      while (this.queue.length > 0) {
        let picked: Connection | undefined;
        for (let i = 0; i < n; i++) {
          const c = this.conns[(this.rr + i) % n]!;
          if (c.room) {
            picked = c;
            this.rr = (this.rr + i + 1) % n;
            break;
          }
        }
        if (picked === undefined) break;
        picked.send(this.queue.shift()!);
      }
    } finally {
      for (const c of this.conns) c.uncork();
    }
  }

  /**
   * Lets what is pending finish (up to `drainMs`), sends NBD_CMD_DISC on every connection and
   * closes them; what is still pending then fails.
   */
  async shutdown(drainMs: number): Promise<void> {
    if (this.outstanding > 0) {
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, drainMs);
        this.drainWaiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    this.stopping = true;
    const left = this.queue.splice(0);
    for (const c of this.conns) {
      left.push(...c.inflight.values(), ...c.bound.splice(0));
      c.inflight.clear();
    }
    await Promise.all(this.conns.map((c) => c.disconnect(1000)));
    const err = new NbdClientError('EIO', `NBD storage ${this.where} was closed with the request pending`);
    for (const op of left) op.settle(err);
  }
}

/**
 * Longest READ/WRITE for an export: its maximum block size (capped at 32 MiB), in whole sectors
 * where possible. Throws EINVAL when its minimum block size does not fit the sector size.
 */
export function ioLimit(info: NbdExportInfo, sectorSize: number, where: string): number {
  const bs = info.blockSize;
  if (bs === undefined) return DEFAULT_MAX_IO;
  const { minimum, maximum } = bs;
  if (minimum > sectorSize) {
    throw new NbdClientError('EINVAL', `NBD server ${where} needs requests aligned to ${minimum} bytes, more than the ${sectorSize}-byte sector size${minimum <= 4096 ? ' (use sectorSize 4096)' : ''}`);
  }
  if (minimum < 1 || sectorSize % minimum !== 0) {
    throw new NbdClientError('EINVAL', `NBD server ${where}: its minimum block size ${minimum} does not divide the ${sectorSize}-byte sector size`);
  }
  if (maximum < minimum) throw new NbdClientError('EINVAL', `NBD server ${where}: maximum block size ${maximum} is below its minimum ${minimum}`);
  const cap = Math.min(maximum, DEFAULT_MAX_IO);
  return cap >= sectorSize ? cap - (cap % sectorSize) : cap - (cap % minimum);
}
