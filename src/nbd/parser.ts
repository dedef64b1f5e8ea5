/**
 * Incremental parsers for both directions of an NBD connection. Bytes go in with `push` in
 * whatever pieces TCP delivered; whole messages come out of `next()`, one at a time, so the
 * caller can switch phase (options → transmission) between two messages of the same chunk.
 * Lengths read from the wire are never trusted: an option or payload over the cap is a protocol
 * error (`NbdProtocolError`), after which the parser stays failed.
 */
import {
  DEFAULT_MAX_OPTION_LENGTH, DEFAULT_MAX_PAYLOAD, IHAVEOPT, NBDMAGIC, NBD_CMD_WRITE, NBD_EXPORT_NAME_ZEROES,
  NBD_EXTENDED_REQUEST_MAGIC, NBD_GREETING_SIZE, NBD_OPTION_HEADER_SIZE, NBD_OPTION_REPLY_HEADER_SIZE,
  NBD_REP_MAGIC, NBD_REQUEST_MAGIC, NBD_REQUEST_SIZE, NBD_SIMPLE_REPLY_MAGIC, NBD_SIMPLE_REPLY_SIZE,
  NBD_STRUCTURED_REPLY_HEADER_SIZE, NBD_STRUCTURED_REPLY_MAGIC, commandName,
} from './constants.js';
import { ByteQueue } from './byte-queue.js';
import { NbdProtocolError, type ClientMessage, type ServerMessage } from './messages.js';

const view = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.byteLength);
const hex = (v: number | bigint) => `0x${v.toString(16)}`;

export interface ClientParserOptions {
  /** Largest option data accepted (default 64 KiB). */
  maxOptionLength?: number;
  /** Largest NBD_CMD_WRITE payload accepted (default 32 MiB). */
  maxPayload?: number;
}

/** Where a client connection is: what the next bytes from the client must be. */
export type ClientPhase = 'clientFlags' | 'options' | 'transmission';

/**
 * Parses what a client sends: the 32-bit client flags, then options, then (once the server
 * calls `enterTransmission`) requests with their write payloads. The server sends the greeting
 * itself; the client flags are the first thing to parse.
 */
/**
 * What both directions' parsers share: a byte queue fed by `push`, and `next` returning whole
 * messages from the subclass's `step` — once a message breaks the protocol the parser stays
 * failed (the stream can no longer be framed) and drops what it holds.
 */
abstract class StreamParser<M> {
  protected readonly queue = new ByteQueue();
  protected failure: NbdProtocolError | undefined;

  push(chunk: Uint8Array): void {
    if (!this.failure) this.queue.push(chunk);
  }

  /** Bytes received but not yet returned as messages. */
  get buffered(): number {
    return this.queue.length;
  }

  /** The next whole message, or undefined until more bytes arrive. Throws NbdProtocolError. */
  next(): M | undefined {
    if (this.failure) throw this.failure;
    try {
      return this.step();
    } catch (e) {
      if (e instanceof NbdProtocolError) {
        this.failure = e;
        this.queue.clear();
      }
      throw e;
    }
  }

  protected abstract step(): M | undefined;
}

export class ClientParser extends StreamParser<ClientMessage> {
  readonly maxOptionLength: number;
  readonly maxPayload: number;
  private _phase: ClientPhase = 'clientFlags';
  private pendingOption: { option: number; length: number } | undefined;
  private pendingWrite: { flags: number; command: number; handle: bigint; offset: bigint; length: number } | undefined;

  constructor(options: ClientParserOptions = {}) {
    super();
    this.maxOptionLength = options.maxOptionLength ?? DEFAULT_MAX_OPTION_LENGTH;
    this.maxPayload = options.maxPayload ?? DEFAULT_MAX_PAYLOAD;
  }

  get phase(): ClientPhase {
    return this._phase;
  }

  /** Switches to requests: call once NBD_OPT_GO succeeded or NBD_OPT_EXPORT_NAME was answered. */
  enterTransmission(): void {
    if (this._phase !== 'options' || this.pendingOption) throw new Error(`cannot enter transmission from ${this._phase}`);
    this._phase = 'transmission';
  }

  /** Drops whatever is buffered and ignores anything pushed later (after NBD_CMD_DISC, say). */
  discard(): void {
    this.queue.clear();
    this.failure ??= new NbdProtocolError('parser discarded');
  }

  protected step(): ClientMessage | undefined {
    const q = this.queue;
    switch (this._phase) {
      case 'clientFlags': {
        if (q.length < 4) return undefined;
        this._phase = 'options';
        return { kind: 'clientFlags', flags: view(q.take(4)).getUint32(0) };
      }
      case 'options': {
        if (!this.pendingOption) {
          if (q.length < NBD_OPTION_HEADER_SIZE) return undefined;
          const v = view(q.take(NBD_OPTION_HEADER_SIZE));
          const magic = v.getBigUint64(0);
          if (magic !== IHAVEOPT) throw new NbdProtocolError(`bad option magic ${hex(magic)}`);
          const option = v.getUint32(8);
          const length = v.getUint32(12);
          if (length > this.maxOptionLength) {
            throw new NbdProtocolError(`option ${option} carries ${length} bytes, more than the ${this.maxOptionLength} allowed`);
          }
          this.pendingOption = { option, length };
        }
        const { option, length } = this.pendingOption;
        if (q.length < length) return undefined;
        this.pendingOption = undefined;
        return { kind: 'option', option, data: q.take(length) };
      }
      case 'transmission': {
        if (!this.pendingWrite) {
          if (q.length < NBD_REQUEST_SIZE) return undefined;
          const v = view(q.take(NBD_REQUEST_SIZE));
          const magic = v.getUint32(0);
          if (magic !== NBD_REQUEST_MAGIC) {
            const what = magic === NBD_EXTENDED_REQUEST_MAGIC ? 'extended request header (not negotiated)' : `bad request magic ${hex(magic)}`;
            throw new NbdProtocolError(what);
          }
          const req = {
            flags: v.getUint16(4),
            command: v.getUint16(6),
            handle: v.getBigUint64(8),
            offset: v.getBigUint64(16),
            length: v.getUint32(24),
          };
          if (req.command !== NBD_CMD_WRITE) return { kind: 'request', ...req };
          if (req.length > this.maxPayload) {
            throw new NbdProtocolError(`${commandName(req.command)} payload of ${req.length} bytes exceeds ${this.maxPayload}`);
          }
          this.pendingWrite = req;
        }
        const req = this.pendingWrite;
        if (q.length < req.length) return undefined;
        this.pendingWrite = undefined;
        // A view of the socket's chunk where it holds the whole payload: the device copies it
        // (blkfront into its granted pages) before the write is answered.
        return { kind: 'request', ...req, data: q.takeView(req.length) };
      }
    }
  }
}

export interface ServerParserOptions {
  /**
   * For a simple reply without error: how many data bytes follow it (the length of the read
   * with that handle), or undefined/0 for none. Simple replies are not self-describing.
   */
  readDataLength?: (handle: bigint) => number | undefined;
  /** Largest option reply or structured chunk payload accepted (default 32 MiB + 64 KiB). */
  maxPayload?: number;
}

/** What the next bytes from a server must be. */
export type ServerPhase = 'greeting' | 'options' | 'exportName' | 'transmission';

/**
 * Parses what a server sends: greeting, option replies, the NBD_OPT_EXPORT_NAME answer (after
 * `expectExportNameReply`), then simple replies and structured chunks (after
 * `enterTransmission`). Used by the tests, and by any NBD client built on this module.
 */
export class ServerParser extends StreamParser<ServerMessage> {
  private _phase: ServerPhase = 'greeting';
  private noZeroes = false;
  private pending:
    | { kind: 'optionReply'; option: number; replyType: number; length: number }
    | { kind: 'simpleReply'; error: number; handle: bigint; length: number }
    | { kind: 'structuredChunk'; flags: number; type: number; handle: bigint; length: number }
    | undefined;
  private readonly readDataLength: (handle: bigint) => number | undefined;
  private readonly maxPayload: number;

  constructor(options: ServerParserOptions = {}) {
    super();
    this.readDataLength = options.readDataLength ?? (() => undefined);
    this.maxPayload = options.maxPayload ?? DEFAULT_MAX_PAYLOAD + 64 * 1024;
  }

  get phase(): ServerPhase {
    return this._phase;
  }

  /** The client sent NBD_OPT_EXPORT_NAME: the next bytes are size, flags (and maybe zeroes). */
  expectExportNameReply(noZeroes: boolean): void {
    this._phase = 'exportName';
    this.noZeroes = noZeroes;
  }

  /** NBD_OPT_GO was acknowledged: the next bytes are replies. */
  enterTransmission(): void {
    this._phase = 'transmission';
  }

  private checkLength(length: number): void {
    if (length > this.maxPayload) throw new NbdProtocolError(`server announced ${length} bytes, more than ${this.maxPayload}`);
  }

  protected step(): ServerMessage | undefined {
    const q = this.queue;
    if (this.pending) {
      const p = this.pending;
      if (q.length < p.length) return undefined;
      this.pending = undefined;
      const bytes = q.take(p.length);
      switch (p.kind) {
        case 'optionReply':
          return { kind: 'optionReply', option: p.option, replyType: p.replyType, data: bytes };
        case 'simpleReply':
          return { kind: 'simpleReply', error: p.error, handle: p.handle, data: bytes };
        case 'structuredChunk':
          return { kind: 'structuredChunk', flags: p.flags, type: p.type, handle: p.handle, payload: bytes };
      }
    }
    switch (this._phase) {
      case 'greeting': {
        if (q.length < NBD_GREETING_SIZE) return undefined;
        const v = view(q.take(NBD_GREETING_SIZE));
        if (v.getBigUint64(0) !== NBDMAGIC) throw new NbdProtocolError(`bad server magic ${hex(v.getBigUint64(0))}`);
        if (v.getBigUint64(8) !== IHAVEOPT) throw new NbdProtocolError('not a newstyle server');
        this._phase = 'options';
        return { kind: 'greeting', handshakeFlags: v.getUint16(16) };
      }
      case 'options': {
        if (q.length < NBD_OPTION_REPLY_HEADER_SIZE) return undefined;
        const v = view(q.take(NBD_OPTION_REPLY_HEADER_SIZE));
        if (v.getBigUint64(0) !== NBD_REP_MAGIC) throw new NbdProtocolError(`bad option reply magic ${hex(v.getBigUint64(0))}`);
        const length = v.getUint32(16);
        this.checkLength(length);
        this.pending = { kind: 'optionReply', option: v.getUint32(8), replyType: v.getUint32(12), length };
        return this.step();
      }
      case 'exportName': {
        const n = 10 + (this.noZeroes ? 0 : NBD_EXPORT_NAME_ZEROES);
        if (q.length < n) return undefined;
        const v = view(q.take(n));
        this._phase = 'transmission';
        return { kind: 'exportNameReply', size: v.getBigUint64(0), transmissionFlags: v.getUint16(8) };
      }
      case 'transmission': {
        if (q.length < 4) return undefined;
        // The magic tells which header follows; the headers differ in size.
        const magic = view(q.peek(4)).getUint32(0);
        if (magic === NBD_SIMPLE_REPLY_MAGIC) {
          if (q.length < NBD_SIMPLE_REPLY_SIZE) return undefined;
          const v = view(q.take(NBD_SIMPLE_REPLY_SIZE));
          const error = v.getUint32(4);
          const handle = v.getBigUint64(8);
          const length = error === 0 ? this.readDataLength(handle) ?? 0 : 0;
          this.checkLength(length);
          if (length === 0) return { kind: 'simpleReply', error, handle };
          this.pending = { kind: 'simpleReply', error, handle, length };
          return this.step();
        }
        if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
          if (q.length < NBD_STRUCTURED_REPLY_HEADER_SIZE) return undefined;
          const v = view(q.take(NBD_STRUCTURED_REPLY_HEADER_SIZE));
          const length = v.getUint32(16);
          this.checkLength(length);
          this.pending = { kind: 'structuredChunk', flags: v.getUint16(4), type: v.getUint16(6), handle: v.getBigUint64(8), length };
          return this.step();
        }
        throw new NbdProtocolError(`bad reply magic ${hex(magic)}`);
      }
    }
  }
}
