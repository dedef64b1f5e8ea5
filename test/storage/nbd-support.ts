/**
 * Support for the NbdStorage tests. Real NBD servers: qemu-nbd and nbdkit started as child processes on
 * 127.0.0.1 (a port picked free) or on a Unix socket, waited for, and killed; plus a small
 * scripted server of our own for what real servers never do on demand (refuse NBD_OPT_GO,
 * split and reorder structured reads).
 */
import assert from 'node:assert/strict';
import { type ChildProcess } from 'node:child_process';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { existsSync } from 'node:fs';
import {
  ClientParser, NBD_CMD_DISC, NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EIO, NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS, NBD_FLAG_NO_ZEROES, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_WRITE_ZEROES, NBD_INFO_EXPORT, NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO, NBD_OPT_STRUCTURED_REPLY, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REP_ACK, NBD_REP_ERR_UNSUP,
  NBD_REP_INFO, encodeExportNameReply, encodeGreeting, encodeInfo, encodeOffsetDataHeader, encodeOptionReply, encodeSimpleReply,
  encodeStructuredError, encodeStructuredHeader, encodeStructuredNone,
} from '../../src/nbd/index.js';
import type { NbdStorage } from '../../src/storage/index.js';
import { Rng, firstDifference } from '../e2e/helpers.js';
import { concat, sharedViews, split } from './helpers.js';
import { spawnTracked } from '../support/children.js';
import { sleep } from '../support/common.js';
export { sleep };

const MiB = 1024 * 1024;

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

export type Where = { port: number } | { socket: string };

export function uriOf(where: Where, exportName = ''): string {
  return 'port' in where ? `nbd://127.0.0.1:${where.port}/${encodeURIComponent(exportName)}` : `nbd+unix:///${encodeURIComponent(exportName)}?socket=${encodeURIComponent(where.socket)}`;
}

/** Resolves once something accepts connections at `where`. */
async function reachable(where: Where, proc: ChildProcess, stderr: () => string, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`server exited (${proc.exitCode ?? proc.signalCode}): ${stderr()}`);
    const ok = await new Promise<boolean>((resolve) => {
      if ('socket' in where && !existsSync(where.socket)) return resolve(false);
      const s: Socket = 'port' in where ? connect(where.port, '127.0.0.1') : connect(where.socket);
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > end) throw new Error(`server not reachable after ${ms} ms: ${stderr()}`);
    await sleep(15); // the poll's interval: the condition (a connection accepted) is checked above
  }
}

/** A server process. */
export class ServerProcess {
  private err = '';
  private constructor(readonly proc: ChildProcess, readonly where: Where) {
    proc.stderr!.on('data', (d: Buffer) => (this.err = (this.err + d.toString()).slice(-4000)));
    proc.stdout!.resume();
  }

  get stderr(): string {
    return this.err;
  }

  uri(exportName = ''): string {
    return uriOf(this.where, exportName);
  }

  static async start(cmd: string, args: string[], where: Where): Promise<ServerProcess> {
    const proc = spawnTracked(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const s = new ServerProcess(proc, where);
    try {
      await reachable(where, proc, () => s.err);
    } catch (e) {
      await s.kill();
      throw e;
    }
    return s;
  }

  /** `nbdkit -f --exit-with-parent` with `args` (filters, -r, plugin and its parameters). */
  static nbdkit(where: Where, args: string[]): Promise<ServerProcess> {
    const listen = 'port' in where ? ['-i', '127.0.0.1', '-p', String(where.port)] : ['-U', where.socket];
    return ServerProcess.start('nbdkit', ['-f', '--exit-with-parent', ...listen, ...args], where);
  }

  /** `qemu-nbd -t` (persistent) serving `image` in `format`, up to 8 clients at once. */
  static qemuNbd(where: Where, image: string, format: 'raw' | 'qcow2', extra: string[] = []): Promise<ServerProcess> {
    const listen = 'port' in where ? ['-b', '127.0.0.1', '-p', String(where.port)] : ['-k', where.socket];
    return ServerProcess.start('qemu-nbd', ['-t', '-e', '8', '-f', format, ...listen, ...extra, image], where);
  }

  /** Sends a signal (SIGSTOP, SIGCONT...). */
  signal(sig: NodeJS.Signals): void {
    this.proc.kill(sig);
  }

  /** SIGKILL, and waits for the process to be gone. */
  async kill(): Promise<void> {
    const p = this.proc;
    if (p.exitCode !== null || p.signalCode !== null) return;
    const gone = new Promise<void>((r) => p.once('exit', () => r()));
    p.kill('SIGCONT');
    p.kill('SIGKILL');
    await gone;
  }
}

export interface ScriptedOptions {
  /** Refuse NBD_OPT_GO (and every option but EXPORT_NAME) with NBD_REP_ERR_UNSUP, as servers before GO did. */
  readonly oldStyle?: boolean;
  /** Split reads into data and hole chunks of random sizes, sent in a shuffled order, replies to a batch in reverse. */
  readonly chunky?: boolean;
  /** Reads touching this byte get an error chunk (after some data chunks). */
  readonly failReadsAt?: number;
  /** The first connection answers its first read with garbage (a bad reply magic). */
  readonly garbleFirstRead?: boolean;
}

/**
 * A minimal NBD server over an in-memory disk, scripted to exercise the client: structured reads
 * split into shuffled data/hole chunks, replies to pipelined requests in reverse order, error
 * chunks, or an old server that knows only NBD_OPT_EXPORT_NAME. And random I/O checked against a byte model.
 */
export class ScriptedServer {
  readonly disk: Uint8Array;
  private server: Server | undefined;
  private readonly sockets = new Set<Socket>();
  /** Commands received, in order. */
  readonly commands: number[] = [];
  /** Options received, in order. */
  readonly options: number[] = [];
  /** Hole chunks sent, and batches of several replies sent interleaved newest first. */
  holes = 0;
  reordered = 0;
  private seed = 12345;
  private connections = 0;

  constructor(size: number, readonly opts: ScriptedOptions = {}) {
    this.disk = new Uint8Array(size);
  }

  private rand(n: number): number {
    this.seed = (this.seed * 1103515245 + 12345) >>> 0;
    return (this.seed >>> 8) % n;
  }

  async listen(): Promise<number> {
    this.server = createServer((s) => this.serve(s));
    await new Promise<void>((r) => this.server!.listen(0, '127.0.0.1', r));
    return (this.server.address() as { port: number }).port;
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
  }

  private serve(socket: Socket): void {
    this.sockets.add(socket);
    socket.setNoDelay(true);
    socket.on('close', () => this.sockets.delete(socket));
    socket.on('error', () => undefined);
    const parser = new ClientParser();
    let garble = this.opts.garbleFirstRead === true && this.connections++ === 0;
    let structured = false;
    let noZeroes = false;
    const flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_WRITE_ZEROES;
    /** Replies (each a list of messages, each a list of byte parts), held until what one data event brought is parsed. */
    let batch: Uint8Array[][][] = [];
    socket.write(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
    socket.on('data', (chunk) => {
      parser.push(chunk);
      for (let m = parser.next(); m; m = parser.next()) {
        if (m.kind === 'clientFlags') {
          noZeroes = (m.flags & 2) !== 0;
          continue;
        }
        if (m.kind === 'option') {
          this.options.push(m.option);
          if (m.option === NBD_OPT_EXPORT_NAME) {
            socket.write(encodeExportNameReply(BigInt(this.disk.length), flags, noZeroes));
            parser.enterTransmission();
          } else if (this.opts.oldStyle || (m.option !== NBD_OPT_GO && m.option !== NBD_OPT_STRUCTURED_REPLY)) {
            socket.write(encodeOptionReply(m.option, NBD_REP_ERR_UNSUP));
          } else if (m.option === NBD_OPT_STRUCTURED_REPLY) {
            structured = true;
            socket.write(encodeOptionReply(m.option, NBD_REP_ACK));
          } else {
            socket.write(encodeOptionReply(m.option, NBD_REP_INFO, encodeInfo({ info: NBD_INFO_EXPORT, size: BigInt(this.disk.length), transmissionFlags: flags })));
            socket.write(encodeOptionReply(m.option, NBD_REP_ACK));
            parser.enterTransmission();
          }
          continue;
        }
        this.commands.push(m.command);
        const off = Number(m.offset);
        const h = m.handle;
        if (m.command === NBD_CMD_DISC) {
          socket.end();
          return;
        }
        if (m.command === NBD_CMD_WRITE) this.disk.set(m.data!, off);
        else if (m.command === NBD_CMD_WRITE_ZEROES) this.disk.fill(0, off, off + m.length);
        if (m.command !== NBD_CMD_READ) {
          batch.push([[structured ? encodeStructuredNone(h) : encodeSimpleReply(0, h)]]);
          continue;
        }
        const data = this.disk.slice(off, off + m.length);
        if (garble) {
          garble = false;
          batch.push([[new Uint8Array(16).fill(0x5a)]]);
          continue;
        }
        if (!structured) {
          batch.push([[encodeSimpleReply(0, h), data]]);
          continue;
        }
        const failAt = this.opts.failReadsAt;
        const fails = failAt !== undefined && failAt >= off && failAt < off + m.length;
        if (!this.opts.chunky && !fails) {
          batch.push([[encodeOffsetDataHeader(NBD_REPLY_FLAG_DONE, h, m.offset, m.length), data]]);
          continue;
        }
        // Random pieces; all-zero pieces as holes; shuffled; the last one carries DONE.
        const pieces: Uint8Array[][] = [];
        for (let at = 0; at < m.length;) {
          const n = Math.min(m.length - at, 1 + this.rand(3000));
          const part = data.subarray(at, at + n);
          const pos = m.offset + BigInt(at);
          if (part.every((b) => b === 0)) {
            const payload = new Uint8Array(12);
            new DataView(payload.buffer).setBigUint64(0, pos);
            new DataView(payload.buffer).setUint32(8, n);
            pieces.push([encodeStructuredHeader(0, NBD_REPLY_TYPE_OFFSET_HOLE, h, 12), payload]);
            this.holes++;
          } else {
            pieces.push([encodeOffsetDataHeader(0, h, pos, n), part]);
          }
          at += n;
        }
        for (let i = pieces.length - 1; i > 0; i--) {
          const j = this.rand(i + 1);
          [pieces[i], pieces[j]] = [pieces[j]!, pieces[i]!];
        }
        if (fails) pieces.splice(pieces.length >> 1, 0, [encodeStructuredError(h, { error: NBD_EIO, message: 'injected' }, 0)]);
        pieces.push([encodeStructuredNone(h)]);
        batch.push(pieces);
      }
      // Everything parsed from this event is answered at once: chunky, newest request first,
      // the chunks of different replies interleaved (each reply's own chunks in their order).
      const replies = this.opts.chunky ? batch.reverse() : batch;
      if (this.opts.chunky && replies.length > 1) this.reordered++;
      for (let i = 0; replies.some((r) => r.length > 0); i++) {
        const r = replies[i % replies.length]!;
        const msg = r.shift();
        if (msg !== undefined) for (const part of msg) socket.write(part);
        if (!this.opts.chunky) while (r.length > 0) for (const part of r.shift()!) socket.write(part);
      }
      batch = [];
    });
  }
}

// --- Random I/O against a model -----------------------------------------------------------------

/** Random cut points for a buffer of `len` bytes: odd-sized pieces, as the guest's segments might be. */
function cuts(rng: Rng, len: number): number[] {
  const n = rng.int(0, 5);
  return Array.from({ length: n }, () => rng.int(0, len));
}

/**
 * Random I/O in batches of disjoint ranges (the batch is what is in flight at once), each request
 * a vector of random pieces, half of them views of a SharedArrayBuffer; checked against `model`.
 */
export async function randomIo(s: NbdStorage, model: Uint8Array, rng: Rng, batches: number, maxSectors = 256): Promise<void> {
  const ss = s.sectorSize;
  const sectors = model.length / ss;
  for (let b = 0; b < batches; b++) {
    const depth = [1, 4, 16, 64][rng.int(0, 3)]!;
    const ranges: [number, number][] = [];
    for (let i = 0; i < depth; i++) {
      const len = (rng.int(0, 7) === 0 ? rng.int(1, maxSectors) : rng.int(1, 16)) * ss;
      const off = rng.int(0, sectors - len / ss) * ss;
      if (ranges.some(([o, l]) => off < o + l && o < off + len)) continue;
      ranges.push([off, len]);
    }
    await Promise.all(ranges.map(async ([off, len]) => {
      const k = rng.int(0, 19);
      const shared = rng.int(0, 1) === 0;
      if (k < 8) {
        const data = rng.bytes(len);
        await s.write(off, shared ? sharedViews(data, cuts(rng, len)) : split(data, cuts(rng, len)));
        model.set(data, off);
      } else if (k < 17) {
        const into = shared ? sharedViews(new Uint8Array(len).fill(0xee), cuts(rng, len)) : split(new Uint8Array(len).fill(0xee), cuts(rng, len));
        await s.read(off, into);
        const at = firstDifference(concat(into), model.subarray(off, off + len));
        assert.equal(at, -1, `read ${len} at ${off}: byte ${at} differs (seed ${rng.seed})`);
      } else if (k < 19) {
        await s.discard(off, len);
        model.fill(0, off, off + len);
      } else {
        await s.writeZeroes(off, len);
        model.fill(0, off, off + len);
      }
    }));
    if (b % 8 === 7) await s.flush();
  }
}

/** Reads the whole disk back (4 MiB at a time) and compares it with the model. */
export async function verifyAll(s: NbdStorage, model: Uint8Array): Promise<void> {
  for (let off = 0; off < model.length; off += 4 * MiB) {
    const len = Math.min(4 * MiB, model.length - off);
    const b = new Uint8Array(len).fill(0xee);
    await s.read(off, [b]);
    const at = firstDifference(b, model.subarray(off, off + len));
    assert.equal(at, -1, `disk differs from the model at byte ${off + at}`);
  }
}
