/**
 * One NBD connection of the client: sends requests (up to the pool's depth at once), matches
 * replies to them by handle, simple or structured (data chunks in any order and split, holes,
 * error chunks), cuts the connection when a request goes unanswered for `timeoutMs`, and
 * reconnects with exponential backoff, handing what was in flight back to its pool to send again.
 */
import {
  NBD_CMD_DISC, NBD_CMD_READ, NBD_CMD_WRITE, NBD_ESHUTDOWN, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE, commandName, errnoName, isReplyTypeError,
} from './constants.js';
import { NbdClientError, clientErrorCode, why } from './client-error.js';
import { openSession, type NbdExportInfo, type Session } from './client-handshake.js';
import { NbdProtocolError, type ServerMessage, type SimpleReplyMessage, type StructuredChunkMessage } from './messages.js';
import { decodeErrorChunk, decodeOffsetData, decodeOffsetHole, encodeRequest } from './serializer.js';
import type { NbdTarget } from './uri.js';

/** A request is sent at most this many times (the first time and re-sends after lost connections). */
const MAX_SENDS = 3;
/** How long a server has to close after our NBD_CMD_DISC. */
const DISC_GRACE_MS = 2000;
const SHUTDOWN = 'the server is shutting down (NBD_ESHUTDOWN)';

/** One NBD request, at most the server's maximum long. */
export interface Op {
  readonly command: number;
  readonly flags: number;
  readonly offset: number;
  readonly length: number;
  /** READ: where the data goes; WRITE: what is sent. Views of the caller's buffers. */
  readonly segments: readonly Uint8Array[];
  /** Set for requests that must go on one connection (a flush of that connection). */
  bound: Connection | undefined;
  sends: number;
  handle: bigint;
  sentAt: number;
  /** Bytes of a structured read covered so far. */
  got: number;
  /** The first error chunk of a structured reply. */
  error: NbdClientError | undefined;
  readonly settle: (err?: NbdClientError) => void;
}

/** How reconnection backs off. */
export interface ReconnectPolicy {
  /** Reconnection attempts before giving up. */
  readonly attempts: number;
  /** Delay before the first attempt; doubled for each next one. */
  readonly baseDelayMs: number;
  /** Longest delay between attempts. */
  readonly maxDelayMs: number;
}

/** What a connection needs of the pool it belongs to (client-pool.ts). */
export interface ConnectionOwner {
  readonly cfg: { readonly target: NbdTarget; readonly depth: number; readonly timeoutMs: number; readonly reconnect: ReconnectPolicy };
  readonly where: string;
  readonly counters: { requests: number; resent: number; drops: number; timeouts: number; reconnects: number; errors: number };
  /** Set once the client closes: no more reconnecting. */
  readonly stopping: boolean;
  log(msg: string): void;
  nextHandle(): bigint;
  /** Hands waiting requests to connections with room. */
  pump(): void;
  /** A lost connection's request, back at the head of the line (call in order, then requeueDone). */
  requeue(op: Op): void;
  requeueDone(): void;
  /** Throws unless a reconnected session still serves the export in use. */
  checkCompatible(info: NbdExportInfo): void;
  /** The connection could not be re-established. */
  connectionGaveUp(c: Connection, reason: string): void;
}

/** Copies `data` (or zeroes, `data` being a length) into `segments` from byte `at` of their concatenation. */
function scatter(segments: readonly Uint8Array[], at: number, data: Uint8Array | number): void {
  const n = typeof data === 'number' ? data : data.length;
  let pos = 0;
  let done = 0;
  for (const s of segments) {
    if (done === n) break;
    const end = pos + s.length;
    if (end > at + done) {
      const from = at + done - pos;
      const count = Math.min(s.length - from, n - done);
      if (typeof data === 'number') s.fill(0, from, from + count);
      else s.set(data.subarray(done, done + count), from);
      done += count;
    }
    pos = end;
  }
}

/** One NBD connection, reconnected whenever it is lost. */
export class Connection {
  /** draining: NBD_ESHUTDOWN was heard; nothing new is sent, what is in flight is answered, then NBD_CMD_DISC. */
  state: 'ready' | 'draining' | 'down' | 'dead' = 'down';
  readonly inflight = new Map<bigint, Op>();
  /** Requests that must go on this connection, waiting for room or for the connection. */
  readonly bound: Op[] = [];
  private session: Session | undefined;
  private timer: NodeJS.Timeout | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  private attempt = 0;
  private lastError = '';

  constructor(readonly owner: ConnectionOwner, readonly id: number) {}

  get room(): boolean {
    return this.state === 'ready' && this.inflight.size < this.owner.cfg.depth;
  }

  /** Takes over a negotiated session. */
  adopt(session: Session): void {
    this.session = session;
    this.state = 'ready';
    const { socket, parser } = session;
    session.setReadLengths((h) => {
      const op = this.inflight.get(h);
      return op?.command === NBD_CMD_READ ? op.length : undefined;
    });
    socket.on('data', (chunk: Buffer) => {
      if (this.session !== session) return;
      parser.push(chunk);
      try {
        for (let m = parser.next(); m && this.session === session; m = parser.next()) this.receive(m);
      } catch (e) {
        this.drop(`protocol error: ${why(e)}`);
      }
      this.owner.pump();
    });
    socket.on('error', (e) => {
      if (this.session === session) this.drop(why(e));
    });
    socket.on('close', () => {
      if (this.session === session) this.drop('the server closed the connection');
    });
    socket.resume();
    if (socket.destroyed) this.drop('the server closed the connection');
  }

  send(op: Op): void {
    const socket = this.session!.socket;
    op.handle = this.owner.nextHandle();
    op.sends++;
    op.sentAt = Date.now();
    op.got = 0;
    op.error = undefined;
    this.inflight.set(op.handle, op);
    this.owner.counters.requests++;
    if (op.sends > 1) this.owner.counters.resent++;
    const header = encodeRequest({ flags: op.flags, command: op.command, handle: op.handle, offset: BigInt(op.offset), length: op.length });
    if (op.command !== NBD_CMD_WRITE) {
      socket.write(header);
    } else {
      // Header and data in one writev, straight from the caller's buffers.
      socket.cork();
      socket.write(header);
      for (const s of op.segments) socket.write(s);
      socket.uncork();
    }
    this.armTimer();
  }

  /** Sends what waits for this connection in particular. */
  pumpBound(): void {
    while (this.bound.length > 0 && this.room) this.send(this.bound.shift()!);
  }

  cork(): void {
    this.session?.socket.cork();
  }

  uncork(): void {
    this.session?.socket.uncork();
  }

  private receive(m: ServerMessage): void {
    if (m.kind === 'simpleReply') return this.simpleReply(m);
    if (m.kind === 'structuredChunk') return this.chunk(m);
    throw new NbdProtocolError(`unexpected ${m.kind} during transmission`);
  }

  private simpleReply(m: SimpleReplyMessage): void {
    const op = this.inflight.get(m.handle);
    if (op === undefined) throw new NbdProtocolError(`reply for unknown handle ${m.handle}`);
    if (m.error === NBD_ESHUTDOWN) return this.shuttingDown(op);
    if (m.error === 0 && op.command === NBD_CMD_READ && m.data !== undefined) scatter(op.segments, 0, m.data);
    this.complete(op, m.error === 0 ? undefined : this.serverError(op, m.error, ''));
  }

  private chunk(m: StructuredChunkMessage): void {
    const op = this.inflight.get(m.handle);
    if (op === undefined) throw new NbdProtocolError(`structured reply for unknown handle ${m.handle}`);
    if (!this.session!.info.structuredReplies) throw new NbdProtocolError('structured reply without negotiating them');
    const { type, payload } = m;
    if (isReplyTypeError(type)) {
      const err = decodeErrorChunk(type, payload);
      if (err === undefined) throw new NbdProtocolError(`malformed error chunk for ${commandName(op.command)}`);
      if (err.error === NBD_ESHUTDOWN) return this.shuttingDown(op);
      op.error ??= this.serverError(op, err.error, err.message);
    } else if (type === NBD_REPLY_TYPE_OFFSET_DATA || type === NBD_REPLY_TYPE_OFFSET_HOLE) {
      if (op.command !== NBD_CMD_READ) throw new NbdProtocolError(`data chunk in reply to ${commandName(op.command)}`);
      const piece = type === NBD_REPLY_TYPE_OFFSET_DATA ? decodeOffsetData(payload) : decodeOffsetHole(payload);
      if (piece === undefined) throw new NbdProtocolError('malformed data chunk');
      const length = 'data' in piece ? piece.data.length : piece.length;
      const at = Number(piece.offset) - op.offset;
      if (piece.offset < BigInt(op.offset) || at + length > op.length) {
        throw new NbdProtocolError(`chunk of ${length} bytes at ${piece.offset} outside the read of ${op.length} at ${op.offset}`);
      }
      scatter(op.segments, at, 'data' in piece ? piece.data : length);
      op.got += length;
    } else if (type !== NBD_REPLY_TYPE_NONE || payload.length !== 0) {
      throw new NbdProtocolError(`unexpected structured reply type ${type}`);
    }
    if ((m.flags & NBD_REPLY_FLAG_DONE) === 0) return;
    if (op.error === undefined && op.command === NBD_CMD_READ && op.got !== op.length) {
      op.error = new NbdClientError('EIO', `NBD server ${this.owner.where}: the reply to a read of ${op.length} bytes at ${op.offset} covered ${op.got}`);
    }
    this.complete(op, op.error);
  }

  private serverError(op: Op, errno: number, message: string): NbdClientError {
    const text = `NBD server ${this.owner.where}: ${commandName(op.command)} of ${op.length} bytes at ${op.offset} failed: ${errnoName(errno)}${message ? ` (${message})` : ''}`;
    return new NbdClientError(clientErrorCode(errno), text);
  }

  /**
   * NBD_ESHUTDOWN: the server is going away, and "the client MUST initiate a soft disconnect"
   * (proto.md, Terminating the transmission phase): this request goes again on the next
   * connection, nothing new is sent here, the rest in flight are answered, then NBD_CMD_DISC and
   * close; the connection is made again as after any loss.
   */
  private shuttingDown(op: Op): void {
    this.inflight.delete(op.handle);
    if (this.state === 'ready') {
      this.state = 'draining';
      this.owner.log(`${this.owner.where}: connection ${this.id}: the server is shutting down (NBD_ESHUTDOWN): disconnecting once ${this.inflight.size} request(s) in flight are answered`);
    }
    if (op.sends >= MAX_SENDS) op.settle(this.lost(op, SHUTDOWN));
    else {
      this.owner.requeue(op);
      this.owner.requeueDone();
    }
    this.disconnectIfDrained();
  }

  private disconnectIfDrained(): void {
    if (this.state !== 'draining' || this.inflight.size > 0) return;
    const socket = this.session!.socket;
    if (socket.writableEnded) return;
    socket.end(encodeRequest({ flags: 0, command: NBD_CMD_DISC, handle: this.owner.nextHandle(), offset: 0n, length: 0 }));
    // The server closes after NBD_CMD_DISC; one that does not is cut (the socket's close then drops the session).
    setTimeout(() => socket.destroy(), DISC_GRACE_MS).unref();
  }

  private lost(op: Op, reason: string): NbdClientError {
    return new NbdClientError('EIO', `NBD server ${this.owner.where}: ${commandName(op.command)} of ${op.length} bytes at ${op.offset} lost its connection ${op.sends} times (last: ${reason})`);
  }

  private complete(op: Op, err: NbdClientError | undefined): void {
    this.inflight.delete(op.handle);
    if (err !== undefined) this.owner.counters.errors++;
    op.settle(err);
    this.disconnectIfDrained();
  }

  private armTimer(): void {
    const limit = this.owner.cfg.timeoutMs;
    if (limit <= 0 || this.timer !== undefined) return;
    const check = () => {
      this.timer = undefined;
      if (this.state !== 'ready' && this.state !== 'draining') return;
      const oldest = this.inflight.values().next();
      if (oldest.done === true) return;
      const waited = Date.now() - oldest.value.sentAt;
      if (waited >= limit) {
        this.owner.counters.timeouts++;
        this.drop(`no reply in ${limit} ms to ${commandName(oldest.value.command)} of ${oldest.value.length} bytes at ${oldest.value.offset}`, true);
        return;
      }
      this.timer = setTimeout(check, limit - waited);
    };
    const oldest = this.inflight.values().next();
    const waited = oldest.done === true ? 0 : Date.now() - oldest.value.sentAt;
    this.timer = setTimeout(check, Math.max(0, limit - waited));
  }

  /** Cuts the connection; its requests go back in line; reconnects. */
  drop(reason: string, reset = false): void {
    if (this.state !== 'ready' && this.state !== 'draining') return;
    if (this.state === 'draining') reason = SHUTDOWN;
    const session = this.session!;
    this.session = undefined;
    this.state = 'down';
    clearTimeout(this.timer);
    this.timer = undefined;
    // After a timeout, a reset rather than a FIN: the server should drop what it has not read.
    if (reset && this.owner.cfg.target.transport === 'tcp') session.socket.resetAndDestroy();
    else session.socket.destroy();
    this.owner.counters.drops++;
    const ops = [...this.inflight.values()];
    this.inflight.clear();
    this.lastError = reason;
    const again: Op[] = [];
    for (const op of ops) {
      if (op.sends >= MAX_SENDS) {
        op.settle(this.lost(op, reason));
      } else if (op.bound === this) {
        again.push(op);
      } else {
        this.owner.requeue(op);
      }
    }
    this.bound.unshift(...again);
    this.owner.log(`${this.owner.where}: connection ${this.id} lost (${reason}); ${ops.length} request(s) in flight will be sent again; reconnecting`);
    this.owner.requeueDone();
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    if (this.owner.stopping || this.state !== 'down') return;
    const { attempts, baseDelayMs, maxDelayMs } = this.owner.cfg.reconnect;
    if (this.attempt >= attempts) {
      this.owner.connectionGaveUp(this, `gave up after ${attempts} reconnection attempt(s) (last error: ${this.lastError})`);
      return;
    }
    this.attempt++;
    const n = this.attempt;
    const delay = Math.min(maxDelayMs, baseDelayMs * 2 ** (n - 1));
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      void this.reconnectNow(n, attempts);
    }, delay);
  }

  private async reconnectNow(n: number, attempts: number): Promise<void> {
    let session: Session;
    try {
      session = await openSession(this.owner.cfg.target, this.owner.where, this.owner.cfg.timeoutMs);
      this.owner.checkCompatible(session.info);
    } catch (e) {
      if (this.owner.stopping || this.state !== 'down') return;
      this.lastError = why(e);
      this.owner.log(`${this.owner.where}: connection ${this.id}: reconnection attempt ${n}/${attempts} failed: ${this.lastError}`);
      this.scheduleReconnect();
      return;
    }
    if (this.owner.stopping || this.state !== 'down') {
      session.socket.destroy();
      return;
    }
    this.attempt = 0;
    this.adopt(session);
    this.owner.counters.reconnects++;
    this.owner.log(`${this.owner.where}: connection ${this.id} reconnected (attempt ${n}/${attempts})`);
    this.owner.pump();
  }

  /** Sends NBD_CMD_DISC (if up) and closes; resolves once the socket is closed (at most `ms`). */
  async disconnect(ms: number): Promise<void> {
    this.stop();
    const session = this.session;
    this.session = undefined;
    this.state = 'dead';
    if (session === undefined) return;
    const { socket } = session;
    if (socket.destroyed) return;
    await new Promise<void>((resolve) => {
      const t = setTimeout(() => {
        socket.destroy();
        resolve();
      }, ms);
      socket.once('close', () => {
        clearTimeout(t);
        resolve();
      });
      socket.end(encodeRequest({ flags: 0, command: NBD_CMD_DISC, handle: this.owner.nextHandle(), offset: 0n, length: 0 }));
    });
  }

  /** Stops timers and reconnection; the socket (if any) is destroyed by `kill`. */
  stop(): void {
    clearTimeout(this.timer);
    clearTimeout(this.retryTimer);
    this.timer = undefined;
    this.retryTimer = undefined;
  }

  /** Gives up on this connection: takes back everything it holds. */
  kill(): Op[] {
    this.stop();
    this.session?.socket.destroy();
    this.session = undefined;
    this.state = 'dead';
    const ops = [...this.inflight.values(), ...this.bound];
    this.inflight.clear();
    this.bound.length = 0;
    return ops;
  }
}
