/**
 * Test support for the NBD server: an in-memory NbdExportDevice with hooks (delays, failures,
 * gates), a raw-socket NBD client built on the module's own serializer and ServerParser, and
 * helpers to run the real clients (nbdinfo, qemu-img, qemu-io, nbdcopy, fio).
 */
import { connect, type Socket } from 'node:net';
import { execFile } from 'node:child_process';
import {
  NBD_CMD_READ, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_OPT_GO, NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK, NBD_REP_INFO, NBD_INFO_BLOCK_SIZE, ServerParser, encodeClientFlags, encodeInfoRequest,
  encodeOption, encodeRequest, decodeInfo, type InfoReply, type NbdExportDevice, type OptionReplyMessage,
  type ServerMessage,
} from '../../src/nbd/index.js';
import { sleep, tempDir } from '../support/common.js';
export { sleep, tempDir };

export interface MemoryDeviceOptions {
  readOnly?: boolean;
  blockSize?: number;
  canFlush?: boolean;
  canTrim?: boolean;
  multiConn?: boolean;
}

/** Operation names a test can hook. */
export type DeviceOp = 'read' | 'write' | 'flush' | 'trim' | 'writeZeroes';

/** An export backed by a Uint8Array, recording every call. */
export class MemoryDevice implements NbdExportDevice {
  readonly bytes: Uint8Array;
  readonly readOnly: boolean;
  readonly blockSize: number;
  readonly canFlush: boolean;
  readonly canTrim: boolean;
  readonly multiConn: boolean;
  /** Every call, in order: [op, offset, length]. */
  readonly calls: [DeviceOp, number, number][] = [];
  /** Operations started and not yet finished. */
  active = 0;
  /** Called before each operation touches the bytes; may delay (return a promise) or throw. */
  hook: ((op: DeviceOp, offset: number, length: number) => Promise<void> | void) | undefined;

  constructor(size: number, options: MemoryDeviceOptions = {}) {
    this.bytes = new Uint8Array(size);
    this.readOnly = options.readOnly ?? false;
    this.blockSize = options.blockSize ?? 512;
    this.canFlush = options.canFlush ?? true;
    this.canTrim = options.canTrim ?? true;
    this.multiConn = options.multiConn ?? true;
  }

  get size(): number {
    return this.bytes.length;
  }

  count(op: DeviceOp): number {
    return this.calls.filter(([o]) => o === op).length;
  }

  private async run<T>(op: DeviceOp, offset: number, length: number, body: () => T): Promise<T> {
    this.calls.push([op, offset, length]);
    this.active++;
    try {
      await this.hook?.(op, offset, length);
      if (op !== 'flush' && (offset < 0 || offset + length > this.bytes.length)) {
        throw new RangeError(`${op} ${offset}+${length} outside 0..${this.bytes.length}`);
      }
      return body();
    } finally {
      this.active--;
    }
  }

  read(offset: number, length: number): Promise<Uint8Array> {
    return this.run('read', offset, length, () => this.bytes.slice(offset, offset + length));
  }
  write(offset: number, data: Uint8Array): Promise<void> {
    return this.run('write', offset, data.length, () => {
      if (this.readOnly) throw new Error('read-only device written');
      this.bytes.set(data, offset);
    });
  }
  flush(): Promise<void> {
    return this.run('flush', 0, 0, () => undefined);
  }
  trim(offset: number, length: number): Promise<void> {
    return this.run('trim', offset, length, () => this.bytes.fill(0, offset, offset + length) && undefined);
  }
  writeZeroes(offset: number, length: number, _mayTrim?: boolean): Promise<boolean | void> {
    return this.run('writeZeroes', offset, length, () => this.bytes.fill(0, offset, offset + length) && undefined);
  }
}

/**
 * A device that deallocates quickly when allowed (as a disk whose backend offers discard): a zero
 * without NO_HOLE is fast and leaves a hole. Records each zero's `mayTrim`.
 */
export class TrimmingDevice extends MemoryDevice {
  readonly mayTrim: boolean[] = [];
  override async writeZeroes(offset: number, length: number, mayTrim = false): Promise<boolean> {
    this.mayTrim.push(mayTrim);
    await super.writeZeroes(offset, length);
    return mayTrim;
  }
  fastZero(mayTrim: boolean): boolean {
    return mayTrim;
  }
}

/** A promise with its resolver, for gating device operations. */
export function deferred<T = void>(): { promise: Promise<T>; resolve: (v: T) => void } {
  let resolve!: (v: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

/** Polls `cond` until it holds (or fails the test after `ms`). */
export async function until(cond: () => boolean, ms = 5000, what = 'condition'): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** xorshift32 bytes: reproducible pseudo-random data. */
export function randomBytes(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}

/** A temp directory removed by `cleanup`. */
/**
 * A byte-level NBD client over one socket: send raw bytes, receive parsed server messages.
 * Reads it sent (by `request`) are remembered so simple replies can be parsed.
 */
export class RawClient {
  readonly parser: ServerParser;
  private readonly reads = new Map<bigint, number>();
  private readonly inbox: ServerMessage[] = [];
  private waiters: (() => void)[] = [];
  private nextHandle = 1n;
  closed = false;
  error: Error | undefined;

  private constructor(readonly socket: Socket) {
    this.parser = new ServerParser({ readDataLength: (h) => this.reads.get(h) });
    socket.on('data', (chunk) => {
      this.parser.push(chunk);
      try {
        for (let m = this.parser.next(); m; m = this.parser.next()) {
          if (m.kind === 'simpleReply') this.reads.delete(m.handle);
          this.inbox.push(m);
        }
      } catch (e) {
        this.error = e as Error;
        socket.destroy();
      }
      this.wake();
    });
    socket.on('error', (e) => (this.error ??= e));
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
  }

  static connect(where: { port: number; host?: string } | { path: string }): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = 'path' in where ? connect(where.path) : connect(where.port, where.host ?? '127.0.0.1');
      s.once('connect', () => {
        s.off('error', reject);
        resolve(new RawClient(s));
      });
      s.once('error', reject);
    });
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  send(bytes: Uint8Array): void {
    this.socket.write(bytes);
  }

  /** The next server message; undefined if the connection closes first. */
  async recv(ms = 5000): Promise<ServerMessage | undefined> {
    const end = Date.now() + ms;
    while (this.inbox.length === 0) {
      if (this.closed) return undefined;
      if (Date.now() > end) throw new Error('timed out waiting for a server message');
      await new Promise<void>((r) => {
        const t = setTimeout(r, Math.max(1, end - Date.now()));
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
    return this.inbox.shift();
  }

  async recvOptionReply(): Promise<OptionReplyMessage> {
    const m = await this.recv();
    if (m?.kind !== 'optionReply') throw new Error(`expected an option reply, got ${m ? m.kind : 'close'}`);
    return m;
  }

  /** Resolves once the server has closed the connection. */
  async closedByServer(ms = 5000): Promise<void> {
    await until(() => this.closed, ms, 'the server to close the connection');
  }

  /** Reads the greeting and sends client flags. */
  async handshake(flags = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES): Promise<number> {
    const g = await this.recv();
    if (g?.kind !== 'greeting') throw new Error('no greeting');
    this.send(encodeClientFlags(flags));
    return g.handshakeFlags;
  }

  /** Sends one option and collects its replies up to the final one. */
  async option(option: number, data?: Uint8Array): Promise<OptionReplyMessage[]> {
    this.send(encodeOption(option, data));
    const out: OptionReplyMessage[] = [];
    for (;;) {
      const r = await this.recvOptionReply();
      out.push(r);
      if (r.replyType !== NBD_REP_INFO && r.replyType !== 2 /* NBD_REP_SERVER */) return out;
    }
  }

  /**
   * Full negotiation: greeting, flags, (structured replies), NBD_OPT_GO for `name` asking for
   * block sizes. Returns the NBD_REP_INFO payloads.
   */
  async go(name = '', opts: { structured?: boolean; blockSize?: boolean } = {}): Promise<InfoReply[]> {
    await this.handshake();
    if (opts.structured) {
      const [r] = await this.option(NBD_OPT_STRUCTURED_REPLY);
      if (r!.replyType !== NBD_REP_ACK) throw new Error('structured replies refused');
    }
    const infos = opts.blockSize === false ? [] : [NBD_INFO_BLOCK_SIZE];
    const replies = await this.option(NBD_OPT_GO, encodeInfoRequest({ name, infos }));
    const last = replies[replies.length - 1]!;
    if (last.replyType !== NBD_REP_ACK) throw new Error(`NBD_OPT_GO failed: 0x${last.replyType.toString(16)}`);
    this.parser.enterTransmission();
    return replies.filter((r) => r.replyType === NBD_REP_INFO).map((r) => decodeInfo(r.data)!);
  }

  /** Sends a request; returns its handle. */
  request(command: number, offset: number, length: number, opts: { flags?: number; data?: Uint8Array; handle?: bigint } = {}): bigint {
    const handle = opts.handle ?? this.nextHandle++;
    if (command === NBD_CMD_READ) this.reads.set(handle, length);
    const req = { flags: opts.flags ?? 0, command, handle, offset: BigInt(offset), length, ...(opts.data ? { data: opts.data } : {}) };
    this.send(encodeRequest(req));
    return handle;
  }

  end(): Promise<void> {
    return new Promise((r) => {
      if (this.closed) return r();
      this.socket.once('close', () => r());
      this.socket.end();
      setTimeout(() => this.socket.destroy(), 1000).unref();
    });
  }

  destroy(): void {
    this.socket.destroy();
  }
}

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a client program asynchronously (the server lives in this process), with a time limit. */
export function run(cmd: string, args: string[], timeoutMs = 30_000): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 16 << 20, encoding: 'utf8' }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : null) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

/** Runs and fails with the output unless the exit status is 0. */
export async function runOk(cmd: string, args: string[], timeoutMs = 30_000): Promise<RunResult> {
  const r = await run(cmd, args, timeoutMs);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}\n${r.stdout}\n${r.stderr}`);
  return r;
}
