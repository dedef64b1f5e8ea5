/**
 * An NBD client (the other end of server.ts, over the same parser and serializer), for qemu-nbd,
 * nbdkit, nbd-server or our own NbdServer. The storage layer's NbdStorage is a BlockStorage over it.
 *
 * Handshake (client-handshake.ts): fixed newstyle, STARTTLS for nbds:// URIs, structured replies,
 * NBD_OPT_GO with NBD_INFO_BLOCK_SIZE or NBD_OPT_EXPORT_NAME for servers without GO. The export's
 * block-size constraints are honoured: the minimum must divide the caller's sector size, requests
 * longer than the maximum are split.
 *
 * Transmission (client-connection.ts, client-pool.ts): each connection carries up to `depth`
 * requests at once, answered in any order, simple or structured. With NBD_FLAG_CAN_MULTI_CONN and
 * `connections` > 1, requests are spread round-robin over several connections, and a flush goes
 * to every one of them.
 *
 * Failures: a connection that drops, breaks the protocol or leaves a request unanswered for
 * `timeoutMs` after sending it is cut and reconnected with exponential backoff; what was in flight
 * on it is sent again once a connection is back (reads and writes of whole blocks are idempotent,
 * and nothing the server acknowledged is resent). A request is sent at most 3 times. If a
 * connection cannot be re-established within `reconnect.attempts`, every pending and later
 * request fails with EIO naming the server. Caveat, shared with every NBD client that retries:
 * after a timeout the server may still carry out the request it never answered, late.
 *
 * Every failure is an NbdClientError with an errno name.
 */
import {
  NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_WRITE_ZEROES,
} from './constants.js';
import { NbdClientError, why } from './client-error.js';
import { openSession, queryExport, tlsOptionsOf, type NbdExportInfo } from './client-handshake.js';
import { Pool, ioLimit, type NbdClientStats } from './client-pool.js';
import { NbdUriError, formatNbdUri, parseNbdUri, type NbdTarget } from './uri.js';

export type { NbdExportInfo } from './client-handshake.js';
export type { NbdClientStats } from './client-pool.js';

export interface NbdReconnectOptions {
  /** Reconnection attempts before giving up (default 8). */
  readonly attempts?: number;
  /** Delay before the first attempt; doubled for each next one (default 100 ms). */
  readonly baseDelayMs?: number;
  /** Longest delay between attempts (default 5 s). */
  readonly maxDelayMs?: number;
}

export interface NbdClientOptions {
  /** Connections to open when the server allows several (NBD_FLAG_CAN_MULTI_CONN); default 1, at most 8. */
  readonly connections?: number;
  /** Requests in flight per connection (default 64). */
  readonly depth?: number;
  /** A request unanswered this long cuts its connection, as does a handshake that takes longer (default 30 s; 0: never). */
  readonly timeoutMs?: number;
  /**
   * The unit the caller's requests come in (its sector size; default 512): the export's minimum
   * block size must divide it, and a reconnection must serve at least the whole units in use.
   */
  readonly sectorSize?: number;
  /** Receives one line per connection drop, reconnection attempt and give-up. */
  readonly log?: (msg: string) => void;
  readonly reconnect?: NbdReconnectOptions;
  /**
   * NBD has no resize notice (a client learns the size in the handshake), so `refreshSize` asks
   * again with NBD_OPT_INFO on a short extra connection, at most this often (ms; default 5000;
   * 0: never, the size stays the one found at connect). A failed query keeps the size and waits
   * twice as long before the next (up to 5 min): a server that takes one client at a time
   * (qemu-nbd's default) never answers it.
   */
  readonly sizeCheckMs?: number;
}

/** Longest TRIM / WRITE_ZEROES request (its length is 32 bits); a multiple of every block size. */
const MAX_EFFECT = 1024 * 1024 * 1024;
/** Size of the one zero buffer written where the server cannot write zeroes itself. */
const ZERO_CHUNK = 1024 * 1024;
const MAX_CONNECTIONS = 8;
/** How long close() lets in-flight requests finish before giving up on them. */
const CLOSE_DRAIN_MS = 5000;

export class NbdClient {
  /** The server and export, as a canonical URI (what logs and errors name). */
  readonly where: string;
  /** What the server said about the export when it was first connected. */
  readonly info: NbdExportInfo;
  /** The unit requests come in. */
  readonly sectorSize: number;
  private currentSize: number;
  private readonly pool: Pool;
  private readonly target: NbdTarget;
  private readonly timeoutMs: number;
  private readonly sizeCheckMs: number;
  /** When the next size query may run, and the wait after it (doubled after a failure). */
  private nextSizeCheck = 0;
  private sizeCheckWait: number;
  private sizeCheck: Promise<void> | undefined;
  private sizeCheckFailed = false;
  /** Longest READ/WRITE request. */
  private readonly ioMax: number;
  private closing: Promise<void> | undefined;
  private zeroes: Uint8Array | undefined;

  private constructor(target: NbdTarget, info: NbdExportInfo, sectorSize: number, opts: NbdClientOptions) {
    this.where = formatNbdUri(target);
    this.target = target;
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    this.sizeCheckMs = opts.sizeCheckMs ?? 5000;
    this.sizeCheckWait = this.sizeCheckMs;
    this.info = info;
    this.sectorSize = sectorSize;
    this.ioMax = ioLimit(info, sectorSize, this.where);
    this.currentSize = info.exportSize;
    this.pool = new Pool({
      target,
      where: this.where,
      sectorSize,
      size: info.exportSize - (info.exportSize % sectorSize),
      depth: opts.depth ?? 64,
      timeoutMs: opts.timeoutMs ?? 30_000,
      reconnect: {
        attempts: opts.reconnect?.attempts ?? 8,
        baseDelayMs: opts.reconnect?.baseDelayMs ?? 100,
        maxDelayMs: opts.reconnect?.maxDelayMs ?? 5000,
      },
      log: opts.log ?? (() => undefined),
    });
  }

  /**
   * Connects to `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH` (or their TLS
   * forms `nbds://` and `nbds+unix://`) and negotiates.
   * Fails with EINVAL for a bad URI, options or TLS files, or an export whose block sizes do not fit the
   * sector size, ENOENT for an export the server does not have, EIO when the server cannot be
   * reached (no retrying here: reconnection is for connections lost later).
   */
  static async connect(uri: string, opts: NbdClientOptions = {}): Promise<NbdClient> {
    let target: NbdTarget;
    try {
      target = parseNbdUri(uri);
    } catch (e) {
      throw new NbdClientError('EINVAL', e instanceof NbdUriError ? e.message : `${uri}: ${why(e)}`);
    }
    // Key and certificate files are read again at each (re)connection; a bad one fails here first.
    if (target.tls !== undefined) tlsOptionsOf(target);
    const check = (v: number | undefined, what: string, min: number) => {
      if (v !== undefined && (!Number.isSafeInteger(v) || v < min)) throw new NbdClientError('EINVAL', `${what} ${v}: must be an integer of at least ${min}`);
    };
    check(opts.sectorSize, 'sectorSize', 1);
    check(opts.connections, 'connections', 1);
    check(opts.depth, 'depth', 1);
    check(opts.timeoutMs, 'timeoutMs', 0);
    check(opts.sizeCheckMs, 'sizeCheckMs', 0);
    check(opts.reconnect?.attempts, 'reconnect.attempts', 0);
    check(opts.reconnect?.baseDelayMs, 'reconnect.baseDelayMs', 0);
    check(opts.reconnect?.maxDelayMs, 'reconnect.maxDelayMs', 0);
    const where = formatNbdUri(target);
    const timeoutMs = opts.timeoutMs ?? 30_000;
    const first = await openSession(target, where, timeoutMs);
    let client: NbdClient;
    try {
      client = new NbdClient(target, first.info, opts.sectorSize ?? 512, opts);
    } catch (e) {
      first.socket.destroy();
      throw e;
    }
    const { pool } = client;
    pool.add(first);
    const multi = (first.info.transmissionFlags & NBD_FLAG_CAN_MULTI_CONN) !== 0;
    const wanted = multi ? Math.min(opts.connections ?? 1, MAX_CONNECTIONS) : 1;
    if (wanted < (opts.connections ?? 1)) {
      pool.log(multi
        ? `${where}: using ${wanted} connections, the most allowed`
        : `${where}: the server does not allow multiple connections (no NBD_FLAG_CAN_MULTI_CONN): using one`);
    }
    if (wanted > 1) {
      const more = await Promise.allSettled(Array.from({ length: wanted - 1 }, () => openSession(target, where, timeoutMs)));
      const failed = more.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      for (const r of more) {
        if (r.status !== 'fulfilled') continue;
        if (failed === undefined) pool.add(r.value);
        else r.value.socket.destroy();
      }
      if (failed !== undefined) {
        await client.close();
        throw failed.reason;
      }
    }
    return client;
  }

  /** The export's size in bytes, as the server last reported it (at connect or a later `refreshSize`). */
  get size(): number {
    return this.currentSize;
  }

  /** Whether the server accepted structured replies. */
  get structuredReplies(): boolean {
    return this.info.structuredReplies;
  }

  /** Several connections see one another's writes and flushes (NBD_FLAG_CAN_MULTI_CONN). */
  get multiConn(): boolean {
    return (this.info.transmissionFlags & NBD_FLAG_CAN_MULTI_CONN) !== 0;
  }

  get stats(): NbdClientStats {
    return this.pool.stats();
  }

  /** NBD_CMD_READ into `buffers` (consecutive bytes from `offset`), split at the server's maximum. */
  async read(offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    this.assertOpen();
    await this.run(NBD_CMD_READ, 0, offset, totalLength(buffers), this.ioMax, (at, n) => slice(buffers, at - offset, n));
  }

  /** NBD_CMD_WRITE of `buffers` to consecutive bytes from `offset`, split at the server's maximum. */
  async write(offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    this.assertOpen();
    await this.run(NBD_CMD_WRITE, 0, offset, totalLength(buffers), this.ioMax, (at, n) => slice(buffers, at - offset, n));
  }

  /** NBD_CMD_FLUSH on every connection (nothing when the server does not take flushes). */
  async flush(): Promise<void> {
    this.assertOpen();
    if ((this.info.transmissionFlags & NBD_FLAG_SEND_FLUSH) === 0) return;
    const targets = this.pool.conns.filter((c) => c.state !== 'dead');
    await settleAll(targets.map((c) => this.pool.submit(NBD_CMD_FLUSH, 0, 0, 0, [], c)));
  }

  /**
   * NBD_CMD_WRITE_ZEROES, with NBD_CMD_FLAG_NO_HOLE when `noHole` (else the server may
   * deallocate); writes zeroes where the server cannot write zeroes itself.
   */
  async writeZeroes(offset: number, length: number, noHole: boolean): Promise<void> {
    this.assertOpen();
    if ((this.info.transmissionFlags & NBD_FLAG_SEND_WRITE_ZEROES) !== 0) {
      await this.run(NBD_CMD_WRITE_ZEROES, noHole ? NBD_CMD_FLAG_NO_HOLE : 0, offset, length, MAX_EFFECT, () => []);
    } else {
      const max = Math.min(this.ioMax, ZERO_CHUNK);
      this.zeroes ??= new Uint8Array(max);
      const zeroes = this.zeroes;
      await this.run(NBD_CMD_WRITE, 0, offset, length, max, (_at, n) => [zeroes.subarray(0, n)]);
    }
  }

  /**
   * NBD tells of a resize only in a handshake: asks the server again (NBD_OPT_INFO on a connection
   * of its own) at most every `sizeCheckMs`; calls meanwhile, and a failed query, keep the size.
   */
  async refreshSize(now = false): Promise<number> {
    this.assertOpen();
    if (this.sizeCheck === undefined && this.sizeCheckMs > 0 && (now || performance.now() >= this.nextSizeCheck)) {
      this.sizeCheck = this.checkSize().finally(() => {
        this.nextSizeCheck = performance.now() + this.sizeCheckWait;
        this.sizeCheck = undefined;
      });
    }
    await this.sizeCheck;
    return this.currentSize;
  }

  /** Describes the export on a connection of its own (NBD_OPT_INFO), then hangs up. */
  queryExport(timeoutMs = this.timeoutMs): Promise<NbdExportInfo> {
    return queryExport(this.target, this.where, timeoutMs);
  }

  private async checkSize(): Promise<void> {
    let info: NbdExportInfo;
    try {
      // A short wait: a server busy with its one allowed client never answers.
      info = await this.queryExport(Math.min(this.timeoutMs > 0 ? this.timeoutMs : 5000, 5000));
    } catch (e) {
      if (!this.sizeCheckFailed) this.pool.log(`${this.where}: cannot ask the server for the export's size (${why(e)}); keeping ${this.currentSize} bytes, asking less often`);
      this.sizeCheckFailed = true;
      this.sizeCheckWait = Math.min(this.sizeCheckWait * 2, 300_000);
      return;
    }
    if (this.sizeCheckFailed) this.pool.log(`${this.where}: the export's size can be asked again`);
    this.sizeCheckFailed = false;
    this.sizeCheckWait = this.sizeCheckMs;
    const size = info.exportSize;
    if (size === this.currentSize || this.closing !== undefined) return;
    this.pool.log(`${this.where}: the export is now ${size} bytes (was ${this.currentSize})`);
    this.currentSize = size;
    // A connection re-established later must serve at least the whole sectors of this size.
    this.pool.cfg.size = size - (size % this.sectorSize);
  }

  /**
   * Lets pending requests finish (up to 5 s), sends NBD_CMD_DISC on every connection and closes
   * them. Requests still pending then fail with EIO, as does every later one. Idempotent.
   */
  close(): Promise<void> {
    this.closing ??= this.pool.shutdown(CLOSE_DRAIN_MS);
    return this.closing;
  }

  /** Splits [offset, offset+length) into requests of at most `max` bytes, runs them all, throws the first error. */
  private async run(command: number, flags: number, offset: number, length: number, max: number, segs: (at: number, n: number) => Uint8Array[]): Promise<void> {
    if (length === 0) return;
    const all: Promise<void>[] = [];
    for (let at = offset; at < offset + length; at += max) {
      const n = Math.min(max, offset + length - at);
      all.push(this.pool.submit(command, flags, at, n, segs(at, n)));
    }
    await settleAll(all);
  }

  /** Throws EIO once closed, or once the server is given up on. */
  assertOpen(): void {
    if (this.closing !== undefined) throw new NbdClientError('EIO', `NBD storage ${this.where} is closed`);
    const failure = this.pool.failure;
    if (failure !== undefined) throw new NbdClientError('EIO', failure.message);
  }
}

/** Views of `buffers` covering bytes [from, from+length) of their concatenation. */
function slice(buffers: readonly Uint8Array[], from: number, length: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  let pos = 0;
  for (const b of buffers) {
    const end = pos + b.length;
    if (end > from && pos < from + length && b.length > 0) {
      const a = Math.max(from, pos) - pos;
      const z = Math.min(from + length, end) - pos;
      out.push(a === 0 && z === b.length ? b : b.subarray(a, z));
    }
    pos = end;
    if (pos >= from + length) break;
  }
  return out;
}

function totalLength(buffers: readonly Uint8Array[]): number {
  let n = 0;
  for (const b of buffers) n += b.length;
  return n;
}

/** Waits for every promise; then throws the first rejection, if any. */
async function settleAll(all: Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(all);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}
