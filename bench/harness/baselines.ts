/**
 * What the machine does without blkif: the same image read and written directly (pread/pwrite
 * on this thread, or many fs.read/fs.write at once on libuv's pool), and memory copy bandwidth
 * (Buffer.copy), the ceiling of a memory disk. Same block sizes, offsets and depths as the runs
 * through blkfront.
 */
import { closeSync, openSync, read, readSync, write, writeSync } from 'node:fs';
import { perfOf, percentiles, sizeId, sizeLabel, workloadId, xorshift, type Perf, type Row, type Workload } from './types.js';

const isWrite = (w: Workload) => w.pattern === 'write' || w.pattern === 'randwrite';
const isRandom = (w: Workload) => w.pattern.startsWith('rand');

/** Block picker of the in-guest workload: random (xorshift) or sequential, shared by all slots. */
function picker(w: Workload, span: number): () => number {
  const blocks = Math.floor(span / w.blockSize);
  if (blocks < 1) throw new Error(`span ${span} holds no block of ${w.blockSize}`);
  const rand = xorshift();
  let next = 0;
  return isRandom(w) ? () => (rand() % blocks) * w.blockSize : () => (next++ % blocks) * w.blockSize;
}

/** readSync/writeSync in a loop for `ms` (QD 1 on this thread). */
export function directSync(path: string, w: Workload, span: number, ms: number): Perf {
  const fd = openSync(path, 'r+');
  try {
    const buf = Buffer.alloc(w.blockSize, 0x5a);
    const at = picker(w, span);
    const lat: number[] = [];
    const wr = isWrite(w);
    const start = performance.now();
    const deadline = start + ms;
    let t = start;
    while (t < deadline) {
      const off = at();
      if (wr) writeSync(fd, buf, 0, buf.length, off);
      else readSync(fd, buf, 0, buf.length, off);
      const t1 = performance.now();
      lat.push(t1 - t);
      t = t1;
    }
    const seconds = (t - start) / 1000;
    const { p50us, p99us } = percentiles(lat);
    return perfOf(lat.length, lat.length * w.blockSize, seconds, p50us, p99us);
  } finally {
    closeSync(fd);
  }
}

/** `w.depth` fs.read/fs.write in flight at once, on libuv's thread pool, for `ms`. */
export async function directPool(path: string, w: Workload, span: number, ms: number): Promise<Perf> {
  const fd = openSync(path, 'r+');
  try {
    const at = picker(w, span);
    const wr = isWrite(w);
    const lat: number[] = [];
    const one = (buf: Buffer, off: number) => new Promise<void>((resolve, reject) => {
      const done = (e: NodeJS.ErrnoException | null) => (e !== null ? reject(e) : resolve());
      if (wr) write(fd, buf, 0, buf.length, off, done);
      else read(fd, buf, 0, buf.length, off, done);
    });
    const start = performance.now();
    const deadline = start + ms;
    await Promise.all(Array.from({ length: w.depth }, async () => {
      const buf = Buffer.alloc(w.blockSize, 0x5a);
      while (performance.now() < deadline) {
        const t0 = performance.now();
        await one(buf, at());
        lat.push(performance.now() - t0);
      }
    }));
    const seconds = (performance.now() - start) / 1000;
    const { p50us, p99us } = percentiles(lat);
    return perfOf(lat.length, lat.length * w.blockSize, seconds, p50us, p99us);
  } finally {
    closeSync(fd);
  }
}

export function directLabel(w: Workload): string {
  const call = isWrite(w) ? 'pwrite' : 'pread';
  return w.depth === 1 ? `${call} (fs.${isWrite(w) ? 'writeSync' : 'readSync'}), QD1` : `${call} (fs.${isWrite(w) ? 'write' : 'read'} on the libuv pool), QD${w.depth}`;
}

export async function directBaseline(path: string, w: Workload, span: number, ms: number): Promise<Row> {
  const perf = w.depth === 1 ? directSync(path, w, span, ms) : await directPool(path, w, span, ms);
  return { id: `base/file/${workloadId(w)}`, label: `${directLabel(w)}, ${sizeLabel(w.blockSize)} ${isRandom(w) ? 'random' : 'sequential'}`, storage: 'file', workload: w, perf };
}

/** One big buffer standing in for a memory disk; copies blocks out of it (read) or into it (write). */
export class MemoryCopy {
  private readonly big: Buffer;
  constructor(readonly span: number) {
    this.big = Buffer.allocUnsafe(span);
    for (let i = 0; i < span; i += 4096) this.big[i] = i & 0xff; // touch every page
  }

  /** Buffer.copy of `w.blockSize` blocks for `ms`, in batches timed as a whole (no per-op latency). */
  run(w: Workload, ms: number): Perf {
    const block = Buffer.alloc(w.blockSize, 0x5a);
    const at = picker(w, this.span);
    const wr = isWrite(w);
    const batch = Math.max(1, Math.floor((4 << 20) / w.blockSize));
    let ops = 0;
    const start = performance.now();
    const deadline = start + ms;
    let t = start;
    while (t < deadline) {
      for (let i = 0; i < batch; i++) {
        const off = at();
        if (wr) block.copy(this.big, off);
        else this.big.copy(block, 0, off, off + w.blockSize);
      }
      ops += batch;
      t = performance.now();
    }
    return perfOf(ops, ops * w.blockSize, (t - start) / 1000, Number.NaN, Number.NaN);
  }
}

export function memcpyId(w: Workload): string {
  return `base/memcpy/${w.pattern}-${sizeId(w.blockSize)}`;
}

export function memcpyBaseline(mem: MemoryCopy, w: Workload, ms: number): Row {
  const perf = mem.run(w, ms);
  const dir = isWrite(w) ? 'into' : 'out of';
  return {
    id: memcpyId(w),
    label: `Buffer.copy of ${sizeLabel(w.blockSize)} blocks ${dir} a ${sizeLabel(mem.span)} buffer, ${isRandom(w) ? 'random' : 'sequential'}`,
    storage: 'memory', workload: { ...w, depth: 1 }, perf,
  };
}
