/**
 * A disk served by a remote NBD server (qemu-nbd, nbdkit, nbd-server, our own NbdServer): blkback
 * serves the VBD, the bytes live on the other end of one or more NBD connections.
 *
 * Handshake (fixed newstyle): for nbds:// URIs NBD_OPT_STARTTLS first and the rest inside TLS
 * (see nbd/tls.ts for the key and certificate files); NBD_OPT_STRUCTURED_REPLY, then NBD_OPT_GO asking for
 * NBD_INFO_BLOCK_SIZE, falling back to NBD_OPT_EXPORT_NAME where GO is unsupported. The export's
 * block-size constraints are honoured: the minimum must divide the sector size, requests longer
 * than the maximum are split.
 *
 * Transmission: each connection carries up to `depth` requests at once, answered in any order,
 * simple or structured (data chunks in any order and split, holes, error chunks). With
 * NBD_FLAG_CAN_MULTI_CONN and `connections` > 1, requests are spread round-robin over several
 * connections, and a flush goes to every one of them.
 *
 * Discard is NBD_CMD_WRITE_ZEROES without NBD_CMD_FLAG_NO_HOLE rather than NBD_CMD_TRIM: the
 * server may deallocate, but must read back zeroes, as BlockStorage.discard promises (a trim
 * need not: qemu's qcow2 driver ignores trims of part of a cluster).
 *
 * Failures: a connection that drops, breaks the protocol or leaves a request unanswered for
 * `timeoutMs` after sending it is cut and reconnected with exponential backoff; what was in flight
 * on it is sent again once a connection is back (reads and writes of whole blocks are idempotent,
 * and nothing the server acknowledged is resent). A request is sent at most 3 times. If a
 * connection cannot be re-established within `reconnect.attempts`, every pending and later
 * request fails with EIO naming the server. Caveat, shared with every NBD client that retries:
 * after a timeout the server may still carry out the request it never answered, late.
 */
import { connect as netConnect, type Socket } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions } from 'node:tls';
import {
  NBD_CMD_DISC, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL, NBD_ENOSPC, NBD_EPERM, NBD_ESHUTDOWN, NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT, NBD_OPT_EXPORT_NAME,
  NBD_OPT_ABORT, NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REP_ACK, NBD_REP_ERR_POLICY, NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP, NBD_REP_INFO, commandName, errnoName, isOptionReplyError, isReplyTypeError, replyName,
} from '../nbd/constants.js';
import { NbdProtocolError, type ServerMessage, type SimpleReplyMessage, type StructuredChunkMessage } from '../nbd/messages.js';
import { ServerParser } from '../nbd/parser.js';
import {
  decodeErrorChunk, decodeInfo, decodeOffsetData, decodeOffsetHole, decodeUtf8, encodeClientFlags, encodeInfoRequest,
  encodeOption, encodeRequest,
} from '../nbd/serializer.js';
import { NbdUriError, formatNbdUri, parseNbdUri, type NbdTarget } from '../nbd/uri.js';
import { NbdTlsConfigError, clientTlsOptions } from '../nbd/tls.js';
import { checkRange, totalLength } from './range.js';
import { StorageError, type BlockStorage } from './storage.js';

export interface NbdReconnectOptions {
  /** Reconnection attempts before giving up (default 8). */
  readonly attempts?: number;
  /** Delay before the first attempt; doubled for each next one (default 100 ms). */
  readonly baseDelayMs?: number;
  /** Longest delay between attempts (default 5 s). */
  readonly maxDelayMs?: number;
}

export interface NbdStorageOptions {
  /** Connections to open when the server allows several (NBD_FLAG_CAN_MULTI_CONN); default 1, at most 8. */
  readonly connections?: number;
  /** Requests in flight per connection (default 64). */
  readonly depth?: number;
  /** A request unanswered this long cuts its connection, as does a handshake that takes longer (default 30 s; 0: never). */
  readonly timeoutMs?: number;
  /** Refuse writes even if the export accepts them. */
  readonly readOnly?: boolean;
  readonly sectorSize?: 512 | 4096;
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

/** Counters, for tests and status lines. */
export interface NbdStorageStats {
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

/** What the server said about the export during the handshake. */
export interface NbdExportInfo {
  /** Bytes, as the server reported them (not rounded to sectors). */
  readonly exportSize: number;
  readonly transmissionFlags: number;
  /** Whether NBD_OPT_STRUCTURED_REPLY was accepted. */
  readonly structuredReplies: boolean;
  /** How the export was selected: NBD_OPT_GO, or NBD_OPT_EXPORT_NAME for servers without GO. */
  readonly negotiation: 'go' | 'exportName';
  /** NBD_INFO_BLOCK_SIZE, when the server sent it. */
  readonly blockSize: { readonly minimum: number; readonly preferred: number; readonly maximum: number } | undefined;
}

/** A request is sent at most this many times (the first time and re-sends after lost connections). */
const MAX_SENDS = 3;
/** Longest READ/WRITE when the server states no maximum (the protocol's safe default). */
const DEFAULT_MAX_IO = 32 * 1024 * 1024;
/** Longest TRIM / WRITE_ZEROES request (its length is 32 bits); a multiple of every block size. */
const MAX_EFFECT = 1024 * 1024 * 1024;
/** Size of the one zero buffer written where the server cannot write zeroes itself. */
const ZERO_CHUNK = 1024 * 1024;
const MAX_CONNECTIONS = 8;
/** How long close() lets in-flight requests finish before giving up on them. */
const CLOSE_DRAIN_MS = 5000;

const why = (e: unknown): string => (e instanceof Error ? e.message : String(e));

/** One NBD request, at most the server's maximum long. */
interface Op {
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
  error: StorageError | undefined;
  readonly settle: (err?: StorageError) => void;
}

/** An established, negotiated socket. */
interface Session {
  readonly socket: Socket;
  readonly parser: ServerParser;
  readonly info: NbdExportInfo;
  /** Tells the parser how many data bytes follow a simple reply to a handle. */
  readonly setReadLengths: (f: (handle: bigint) => number | undefined) => void;
}

/** The server hung up (or reset the connection) during the handshake. */
class HangUp extends Error {}

function dial(t: NbdTarget, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = t.transport === 'unix' ? netConnect({ path: t.path }) : netConnect({ host: t.host, port: t.port });
    const timer = timeoutMs > 0 ? setTimeout(() => {
      socket.destroy();
      reject(new Error(`no connection within ${timeoutMs} ms`));
    }, timeoutMs) : undefined;
    socket.once('connect', () => {
      clearTimeout(timer);
      if (t.transport === 'tcp') {
        socket.setNoDelay(true);
        socket.setKeepAlive(true, 10_000);
      }
      resolve(socket);
    });
    // Stays attached for the socket's life: an 'error' without a listener would throw. The
    // connection's own listeners (added once it is adopted) act on errors.
    socket.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
}

/** Connects and negotiates; on success the socket is paused, its parser in the transmission phase. */
async function openSession(t: NbdTarget, where: string, timeoutMs: number): Promise<Session> {
  let socket: Socket;
  try {
    socket = await dial(t, timeoutMs);
  } catch (e) {
    throw new StorageError('EIO', `cannot connect to NBD server ${where}: ${why(e)}`);
  }
  let lookup = (_h: bigint): number | undefined => undefined;
  const parser = new ServerParser({ readDataLength: (h) => lookup(h) });
  const current = { socket };
  try {
    const tls = t.tls === undefined ? undefined : tlsOptionsOf(t);
    const info = await negotiate(current, parser, t.exportName, where, timeoutMs, tls);
    return { socket: current.socket, parser, info, setReadLengths: (f) => (lookup = f) };
  } catch (e) {
    current.socket.destroy();
    socket.destroy();
    throw e instanceof StorageError ? e : new StorageError('EIO', `NBD server ${where}: handshake failed: ${why(e)}`);
  }
}

/** Describes the export on a connection of its own (NBD_OPT_INFO), then NBD_OPT_ABORT and hangs up. */
async function queryExport(t: NbdTarget, where: string, timeoutMs: number): Promise<NbdExportInfo> {
  let socket: Socket;
  try {
    socket = await dial(t, timeoutMs);
  } catch (e) {
    throw new StorageError('EIO', `cannot connect to NBD server ${where}: ${why(e)}`);
  }
  const current = { socket };
  try {
    const tls = t.tls === undefined ? undefined : tlsOptionsOf(t);
    return await negotiate(current, new ServerParser({ readDataLength: () => undefined }), t.exportName, where, timeoutMs, tls, true);
  } finally {
    // NBD_OPT_ABORT: a polite goodbye; the server's reply is not worth waiting for.
    if (!current.socket.destroyed) current.socket.end(encodeOption(NBD_OPT_ABORT));
    current.socket.destroySoon();
    if (current.socket !== socket) socket.destroySoon();
  }
}

/** The TLS options of an nbds:// target (its key or certificate files read now). */
function tlsOptionsOf(t: NbdTarget): ConnectionOptions {
  try {
    return clientTlsOptions(t.tls!, t.transport === 'tcp' ? t.host : undefined);
  } catch (e) {
    if (e instanceof NbdTlsConfigError) throw new StorageError('EINVAL', `${formatNbdUri(t)}: ${e.message}`);
    throw e;
  }
}

/**
 * Fixed newstyle negotiation on `current.socket`; with `tls`, NBD_OPT_STARTTLS first, after which
 * `current.socket` is the TLS session. `query`: NBD_OPT_INFO instead of NBD_OPT_GO (the export is
 * described, not entered; no fallback).
 */
async function negotiate(
  current: { socket: Socket }, parser: ServerParser, name: string, where: string, timeoutMs: number, tls: ConnectionOptions | undefined, query = false,
): Promise<NbdExportInfo> {
  let socket = current.socket;
  const inbox: ServerMessage[] = [];
  let failure: Error | undefined;
  let wake: (() => void) | undefined;
  const poke = () => {
    const w = wake;
    wake = undefined;
    w?.();
  };
  const onData = (chunk: Buffer) => {
    parser.push(chunk);
    try {
      for (let m = parser.next(); m; m = parser.next()) inbox.push(m);
    } catch (e) {
      failure ??= e as Error;
    }
    poke();
  };
  const onClose = () => {
    failure ??= new HangUp('the server closed the connection');
    poke();
  };
  const onError = (e: Error) => {
    failure ??= (e as NodeJS.ErrnoException).code === 'ECONNRESET' || (e as NodeJS.ErrnoException).code === 'EPIPE' ? new HangUp(e.message) : e;
    poke();
  };
  socket.on('data', onData);
  socket.on('close', onClose);
  socket.on('error', onError);
  const timer = timeoutMs > 0 ? setTimeout(() => {
    failure ??= new Error(`no answer within ${timeoutMs} ms`);
    poke();
  }, timeoutMs) : undefined;
  const next = async (): Promise<ServerMessage> => {
    for (;;) {
      const m = inbox.shift();
      if (m !== undefined) return m;
      if (failure !== undefined) throw failure;
      await new Promise<void>((r) => (wake = r));
    }
  };
  const nextReply = async (option: number) => {
    const m = await next();
    if (m.kind !== 'optionReply') throw new NbdProtocolError(`expected an option reply, got ${m.kind}`);
    if (m.option !== option) throw new NbdProtocolError(`reply for option ${m.option} while waiting for option ${option}`);
    return m;
  };
  const quoted = JSON.stringify(name);
  try {
    const g = await next();
    if (g.kind !== 'greeting') throw new NbdProtocolError(`expected the greeting, got ${g.kind}`);
    const fixed = (g.handshakeFlags & NBD_FLAG_FIXED_NEWSTYLE) !== 0;
    const noZeroes = (g.handshakeFlags & NBD_FLAG_NO_ZEROES) !== 0;
    socket.write(encodeClientFlags((fixed ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0)));
    if (tls !== undefined) {
      if (!fixed) throw new StorageError('EIO', `NBD server ${where} is not fixed newstyle, so it cannot do TLS`);
      socket.write(encodeOption(NBD_OPT_STARTTLS));
      const r = await nextReply(NBD_OPT_STARTTLS);
      if (r.replyType !== NBD_REP_ACK) {
        const text = decodeUtf8(r.data) ?? '';
        throw new StorageError('EIO', `NBD server ${where} refused TLS (${replyName(r.replyType)}${text === '' ? '' : `: ${text}`})`);
      }
      // Anything after the ACK and before our handshake would be plaintext we never asked for.
      if (inbox.length > 0 || parser.buffered > 0) throw new NbdProtocolError('data after the NBD_OPT_STARTTLS reply, before the TLS handshake');
      const plain = socket;
      plain.off('data', onData);
      plain.off('close', onClose);
      plain.off('error', onError);
      socket = tlsConnect({ ...tls, socket: plain });
      current.socket = socket;
      let secured = false;
      socket.once('secureConnect', () => {
        secured = true;
        poke();
      });
      socket.on('data', onData);
      socket.on('close', onClose);
      socket.on('error', onError);
      try {
        while (!secured) {
          if (failure !== undefined) throw failure;
          await new Promise<void>((r) => (wake = r));
        }
      } catch (e) {
        const hint = e instanceof HangUp ? ' (a key or certificate the server does not accept?)' : '';
        throw new StorageError('EIO', `NBD server ${where}: TLS handshake failed: ${why(e)}${hint}`);
      }
    }
    let structured = false;
    if (fixed) {
      socket.write(encodeOption(NBD_OPT_STRUCTURED_REPLY));
      try {
        structured = (await nextReply(NBD_OPT_STRUCTURED_REPLY)).replyType === NBD_REP_ACK;
      } catch (e) {
        // In TLS 1.3 a client's handshake is over before the server has checked its certificate.
        if (tls !== undefined && e instanceof HangUp) throw new StorageError('EIO', `NBD server ${where} hung up right after the TLS handshake: it did not accept our certificate or key`);
        throw e;
      }
      const option = query ? NBD_OPT_INFO : NBD_OPT_GO;
      socket.write(encodeOption(option, encodeInfoRequest({ name, infos: [NBD_INFO_BLOCK_SIZE] })));
      let exp: { size: bigint; transmissionFlags: number } | undefined;
      let blockSize: NbdExportInfo['blockSize'];
      for (;;) {
        const r = await nextReply(option);
        if (r.replyType === NBD_REP_INFO) {
          const info = decodeInfo(r.data);
          if (info === undefined) throw new NbdProtocolError('malformed NBD_REP_INFO');
          if (info.info === NBD_INFO_EXPORT && 'size' in info) exp = info;
          else if (info.info === NBD_INFO_BLOCK_SIZE && 'minimum' in info) blockSize = { minimum: info.minimum, preferred: info.preferred, maximum: info.maximum };
          continue;
        }
        if (r.replyType === NBD_REP_ACK) {
          if (exp === undefined) throw new NbdProtocolError(`${query ? 'NBD_OPT_INFO' : 'NBD_OPT_GO'} acknowledged without NBD_INFO_EXPORT`);
          if (!query) parser.enterTransmission();
          return { exportSize: exportSize(exp.size, where), transmissionFlags: exp.transmissionFlags, structuredReplies: structured, negotiation: 'go', blockSize };
        }
        if (r.replyType === NBD_REP_ERR_UNSUP) {
          if (query) throw new StorageError('EIO', `NBD server ${where} does not support NBD_OPT_INFO`);
          break; // an older server: fall back to NBD_OPT_EXPORT_NAME
        }
        if (!isOptionReplyError(r.replyType)) throw new NbdProtocolError(`unexpected ${replyName(r.replyType)} to NBD_OPT_GO`);
        const text = decodeUtf8(r.data) ?? '';
        const detail = text === '' ? replyName(r.replyType) : `${replyName(r.replyType)}: ${text}`;
        if (r.replyType === NBD_REP_ERR_UNKNOWN) throw new StorageError('ENOENT', `NBD server ${where} has no export ${quoted} (${detail})`);
        if (r.replyType === NBD_REP_ERR_TLS_REQD) throw new StorageError('EIO', `NBD server ${where} requires TLS: use an nbds:// URI with tls-psk-file= or tls-certificates= (${detail})`);
        if (r.replyType === NBD_REP_ERR_POLICY) throw new StorageError('EIO', `NBD server ${where} refused export ${quoted} by policy (${detail})`);
        throw new StorageError('EIO', `NBD server ${where} refused export ${quoted}: ${detail}`);
      }
    }
    if (query) throw new StorageError('EIO', `NBD server ${where} is not fixed newstyle: it cannot be asked for NBD_OPT_INFO`);
    parser.expectExportNameReply(noZeroes);
    socket.write(encodeOption(NBD_OPT_EXPORT_NAME, new TextEncoder().encode(name)));
    let m: ServerMessage;
    try {
      m = await next();
    } catch (e) {
      // The only way a server can refuse NBD_OPT_EXPORT_NAME is to hang up.
      if (e instanceof HangUp) throw new StorageError('ENOENT', `NBD server ${where} hung up when asked for export ${quoted} (NBD_OPT_EXPORT_NAME): no such export?`);
      throw e;
    }
    if (m.kind !== 'exportNameReply') throw new NbdProtocolError(`expected the NBD_OPT_EXPORT_NAME reply, got ${m.kind}`);
    return { exportSize: exportSize(m.size, where), transmissionFlags: m.transmissionFlags, structuredReplies: structured, negotiation: 'exportName', blockSize: undefined };
  } finally {
    clearTimeout(timer);
    socket.off('data', onData);
    socket.off('close', onClose);
    socket.off('error', onError);
    socket.pause();
  }
}

function exportSize(size: bigint, where: string): number {
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw new StorageError('EINVAL', `NBD server ${where}: export size ${size} is too large`);
  return Number(size);
}

/** The StorageError for an NBD error value. */
function storageCode(errno: number): StorageError['code'] {
  if (errno === NBD_EPERM) return 'EROFS';
  if (errno === NBD_ENOSPC) return 'ENOSPC';
  if (errno === NBD_EINVAL) return 'EINVAL';
  return 'EIO';
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
class Connection {
  state: 'ready' | 'down' | 'dead' = 'down';
  readonly inflight = new Map<bigint, Op>();
  /** Requests that must go on this connection, waiting for room or for the connection. */
  readonly bound: Op[] = [];
  private session: Session | undefined;
  private timer: NodeJS.Timeout | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  private attempt = 0;
  private lastError = '';

  constructor(readonly owner: Pool, readonly id: number) {}

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
    if (m.error === NBD_ESHUTDOWN) return this.shuttingDown();
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
      if (err.error === NBD_ESHUTDOWN) return this.shuttingDown();
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
      op.error = new StorageError('EIO', `NBD server ${this.owner.where}: the reply to a read of ${op.length} bytes at ${op.offset} covered ${op.got}`);
    }
    this.complete(op, op.error);
  }

  private serverError(op: Op, errno: number, message: string): StorageError {
    const text = `NBD server ${this.owner.where}: ${commandName(op.command)} of ${op.length} bytes at ${op.offset} failed: ${errnoName(errno)}${message ? ` (${message})` : ''}`;
    return new StorageError(storageCode(errno), text);
  }

  /** NBD_ESHUTDOWN: the server is going away; what is in flight goes again on the next connection. */
  private shuttingDown(): void {
    this.drop('the server is shutting down (NBD_ESHUTDOWN)');
  }

  private complete(op: Op, err: StorageError | undefined): void {
    this.inflight.delete(op.handle);
    if (err !== undefined) this.owner.counters.errors++;
    op.settle(err);
  }

  private armTimer(): void {
    const limit = this.owner.cfg.timeoutMs;
    if (limit <= 0 || this.timer !== undefined) return;
    const check = () => {
      this.timer = undefined;
      if (this.state !== 'ready') return;
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
    if (this.state !== 'ready') return;
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
        op.settle(new StorageError('EIO', `NBD server ${this.owner.where}: ${commandName(op.command)} of ${op.length} bytes at ${op.offset} lost its connection ${op.sends} times (last: ${reason})`));
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

interface PoolConfig {
  readonly target: NbdTarget;
  readonly where: string;
  readonly sectorSize: number;
  /** Smallest export size a reconnected session may report (the size in use; follows a resize). */
  size: number;
  readonly depth: number;
  readonly timeoutMs: number;
  readonly reconnect: Required<NbdReconnectOptions>;
  readonly log: (msg: string) => void;
}

/** The connections to one export and the requests waiting for them. */
class Pool {
  readonly conns: Connection[] = [];
  readonly counters = { requests: 0, resent: 0, drops: 0, timeouts: 0, reconnects: 0, errors: 0 };
  /** Set once close() tears down: no more reconnecting. */
  stopping = false;
  /** Set once the server is given up on: every request fails with it. */
  failure: StorageError | undefined;
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

  stats(): NbdStorageStats {
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
    if (this.failure !== undefined) return Promise.reject(new StorageError('EIO', this.failure.message));
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
    if (info.exportSize < this.cfg.size) throw new StorageError('EIO', `the export shrank to ${info.exportSize} bytes`);
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
    this.failure = new StorageError('EIO', `NBD server ${this.where} is unreachable: ${reason}`);
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
    const err = new StorageError('EIO', `NBD storage ${this.where} was closed with the request pending`);
    for (const op of left) op.settle(err);
  }
}

export class NbdStorage implements BlockStorage {
  readonly sectorSize: number;
  readonly readOnly: boolean;
  /** Whether discard lets the server free space (it can both trim and write zeroes). */
  readonly canDiscard: boolean;
  /** Several connections see one another's writes and flushes (NBD_FLAG_CAN_MULTI_CONN). */
  readonly shareable: boolean;
  /** The server and export, as a canonical URI (what logs and errors name). */
  readonly where: string;
  /** What the server said about the export when it was first connected. */
  readonly info: NbdExportInfo;
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

  private constructor(target: NbdTarget, info: NbdExportInfo, sectorSize: number, opts: NbdStorageOptions) {
    this.where = formatNbdUri(target);
    this.target = target;
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    this.sizeCheckMs = opts.sizeCheckMs ?? 5000;
    this.sizeCheckWait = this.sizeCheckMs;
    this.info = info;
    this.sectorSize = sectorSize;
    this.ioMax = ioLimit(info, sectorSize, this.where);
    const f = info.transmissionFlags;
    this.readOnly = opts.readOnly === true || (f & NBD_FLAG_READ_ONLY) !== 0;
    this.canDiscard = (f & NBD_FLAG_SEND_TRIM) !== 0 && (f & NBD_FLAG_SEND_WRITE_ZEROES) !== 0;
    this.shareable = (f & NBD_FLAG_CAN_MULTI_CONN) !== 0;
    this.currentSize = info.exportSize - (info.exportSize % sectorSize);
    this.pool = new Pool({
      target,
      where: this.where,
      sectorSize,
      size: this.currentSize,
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
  static async connect(uri: string, opts: NbdStorageOptions = {}): Promise<NbdStorage> {
    let target: NbdTarget;
    try {
      target = parseNbdUri(uri);
    } catch (e) {
      throw new StorageError('EINVAL', e instanceof NbdUriError ? e.message : `${uri}: ${why(e)}`);
    }
    // Key and certificate files are read again at each (re)connection; a bad one fails here first.
    if (target.tls !== undefined) tlsOptionsOf(target);
    const ss = opts.sectorSize ?? 512;
    if (ss !== 512 && ss !== 4096) throw new StorageError('EINVAL', `sector size ${String(ss)}: use 512 or 4096`);
    const check = (v: number | undefined, what: string, min: number) => {
      if (v !== undefined && (!Number.isSafeInteger(v) || v < min)) throw new StorageError('EINVAL', `${what} ${v}: must be an integer of at least ${min}`);
    };
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
    let storage: NbdStorage;
    try {
      storage = new NbdStorage(target, first.info, ss, opts);
    } catch (e) {
      first.socket.destroy();
      throw e;
    }
    const { pool } = storage;
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
        await storage.close();
        throw failed.reason;
      }
    }
    return storage;
  }

  /** Usable bytes: the export's size rounded down to whole sectors. */
  get size(): number {
    return this.currentSize;
  }

  /**
   * The export's preferred block size (NBD_INFO_BLOCK_SIZE): smaller writes cost the server a
   * read-modify-write, which is what a physical sector means to a guest. Bounded to the sector
   * size below and 64 KiB above; the sector size when the server gave none.
   */
  get physicalSectorSize(): number {
    const p = this.info.blockSize?.preferred;
    if (p === undefined || (p & (p - 1)) !== 0 || p <= this.sectorSize) return this.sectorSize;
    return Math.min(p, 65536);
  }

  /** Whether the server accepted structured replies. */
  get structuredReplies(): boolean {
    return this.info.structuredReplies;
  }

  get stats(): NbdStorageStats {
    return this.pool.stats();
  }

  async read(offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    this.usable();
    const length = totalLength(buffers);
    checkRange(offset, length, this.currentSize, this.sectorSize);
    await this.run(NBD_CMD_READ, 0, offset, length, this.ioMax, (at, n) => slice(buffers, at - offset, n));
  }

  async write(offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    this.writable();
    const length = totalLength(buffers);
    checkRange(offset, length, this.currentSize, this.sectorSize);
    await this.run(NBD_CMD_WRITE, 0, offset, length, this.ioMax, (at, n) => slice(buffers, at - offset, n));
  }

  /** NBD_CMD_FLUSH on every connection (nothing when the server does not take flushes). */
  async flush(): Promise<void> {
    this.usable();
    if (this.readOnly || (this.info.transmissionFlags & NBD_FLAG_SEND_FLUSH) === 0) return;
    const targets = this.pool.conns.filter((c) => c.state !== 'dead');
    await settleAll(targets.map((c) => this.pool.submit(NBD_CMD_FLUSH, 0, 0, 0, [], c)));
  }

  /**
   * Drops a range so that it reads back as zeroes: NBD_CMD_WRITE_ZEROES without NO_HOLE (the
   * server may deallocate, as for a trim, but must leave zeroes, which NBD_CMD_TRIM does not
   * promise: qemu's qcow2 ignores a trim of part of a cluster); writes zeroes where the server
   * cannot write zeroes itself.
   */
  async discard(offset: number, length: number): Promise<void> {
    this.writable();
    checkRange(offset, length, this.currentSize, this.sectorSize);
    if ((this.info.transmissionFlags & NBD_FLAG_SEND_WRITE_ZEROES) !== 0) {
      await this.run(NBD_CMD_WRITE_ZEROES, 0, offset, length, MAX_EFFECT, () => []);
    } else {
      await this.zeroByWriting(offset, length);
    }
  }

  /** Overwrites with zeroes: NBD_CMD_WRITE_ZEROES with NO_HOLE, else writes zeroes. */
  async writeZeroes(offset: number, length: number): Promise<void> {
    this.writable();
    checkRange(offset, length, this.currentSize, this.sectorSize);
    if ((this.info.transmissionFlags & NBD_FLAG_SEND_WRITE_ZEROES) !== 0) {
      await this.run(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, offset, length, MAX_EFFECT, () => []);
    } else {
      await this.zeroByWriting(offset, length);
    }
  }

  /**
   * NBD tells of a resize only in a handshake: asks the server again (NBD_OPT_INFO on a connection
   * of its own) at most every `sizeCheckMs`; calls meanwhile, and a failed query, keep the size.
   */
  async refreshSize(now = false): Promise<number> {
    this.usable();
    if (this.sizeCheck === undefined && this.sizeCheckMs > 0 && (now || performance.now() >= this.nextSizeCheck)) {
      this.sizeCheck = this.checkSize().finally(() => {
        this.nextSizeCheck = performance.now() + this.sizeCheckWait;
        this.sizeCheck = undefined;
      });
    }
    await this.sizeCheck;
    return this.currentSize;
  }

  private async checkSize(): Promise<void> {
    let info: NbdExportInfo;
    try {
      // A short wait: a server busy with its one allowed client never answers.
      info = await queryExport(this.target, this.where, Math.min(this.timeoutMs > 0 ? this.timeoutMs : 5000, 5000));
    } catch (e) {
      if (!this.sizeCheckFailed) this.pool.log(`${this.where}: cannot ask the server for the export's size (${why(e)}); keeping ${this.currentSize} bytes, asking less often`);
      this.sizeCheckFailed = true;
      this.sizeCheckWait = Math.min(this.sizeCheckWait * 2, 300_000);
      return;
    }
    if (this.sizeCheckFailed) this.pool.log(`${this.where}: the export's size can be asked again`);
    this.sizeCheckFailed = false;
    this.sizeCheckWait = this.sizeCheckMs;
    const size = info.exportSize - (info.exportSize % this.sectorSize);
    if (size === this.currentSize || this.closing !== undefined) return;
    this.pool.log(`${this.where}: the export is now ${size} bytes (was ${this.currentSize})`);
    this.currentSize = size;
    // A connection re-established later must serve at least this much.
    this.pool.cfg.size = size;
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

  private async zeroByWriting(offset: number, length: number): Promise<void> {
    const max = Math.min(this.ioMax, ZERO_CHUNK);
    this.zeroes ??= new Uint8Array(max);
    const zeroes = this.zeroes;
    await this.run(NBD_CMD_WRITE, 0, offset, length, max, (_at, n) => [zeroes.subarray(0, n)]);
  }

  private usable(): void {
    if (this.closing !== undefined) throw new StorageError('EIO', `NBD storage ${this.where} is closed`);
    const failure = this.pool.failure;
    if (failure !== undefined) throw new StorageError('EIO', failure.message);
  }

  private writable(): void {
    this.usable();
    if (this.readOnly) throw new StorageError('EROFS', `NBD export ${this.where} is read-only`);
  }
}

/**
 * Longest READ/WRITE for an export: its maximum block size (capped at 32 MiB), in whole sectors
 * where possible. Throws EINVAL when its minimum block size does not fit the sector size.
 */
function ioLimit(info: NbdExportInfo, sectorSize: number, where: string): number {
  const bs = info.blockSize;
  if (bs === undefined) return DEFAULT_MAX_IO;
  const { minimum, maximum } = bs;
  if (minimum > sectorSize) {
    throw new StorageError('EINVAL', `NBD server ${where} needs requests aligned to ${minimum} bytes, more than the ${sectorSize}-byte sector size${minimum <= 4096 ? ' (use sectorSize 4096)' : ''}`);
  }
  if (minimum < 1 || sectorSize % minimum !== 0) {
    throw new StorageError('EINVAL', `NBD server ${where}: its minimum block size ${minimum} does not divide the ${sectorSize}-byte sector size`);
  }
  if (maximum < minimum) throw new StorageError('EINVAL', `NBD server ${where}: maximum block size ${maximum} is below its minimum ${minimum}`);
  const cap = Math.min(maximum, DEFAULT_MAX_IO);
  return cap >= sectorSize ? cap - (cap % sectorSize) : cap - (cap % minimum);
}

/** Waits for every promise; then throws the first rejection, if any. */
async function settleAll(all: Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(all);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}
