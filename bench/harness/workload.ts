/**
 * A synthetic workload run inside a guest against its blkfront device, as fio would from inside a
 * VM: random or sequential reads or writes of one block size at a fixed queue depth, for a time
 * or an operation count. Returns what it measured; the benchmarks put that beside baselines.
 */
import type { Blkfront } from '../../src/blkfront/index.js';
import type { GuestApplicationModule, GuestContext, GuestDisk } from '../../src/toolstack/index.js';

/** This module as a guest application (`Toolstack.createGuest`): the workload runs in the guest's thread. */
export const WORKLOAD_APPLICATION = new URL(import.meta.url);

export function guestHandlers(guest: GuestContext) {
  return {
    workload: (frontDir: string, spec: WorkloadSpec): Promise<WorkloadResult> => runWorkload(guest.disk(frontDir), spec),
  } satisfies ReturnType<GuestApplicationModule['guestHandlers']>;
}

/**
 * Runs a synthetic workload inside the guest, against `disk` (no control-channel hop per I/O);
 * its guest was created with WORKLOAD_APPLICATION.
 */
export function guestWorkload(disk: GuestDisk, spec: WorkloadSpec): Promise<WorkloadResult> {
  return disk.guest.rpc.call('workload', disk.paths.frontDir, spec);
}

export interface WorkloadSpec {
  readonly pattern: 'randread' | 'randwrite' | 'read' | 'write';
  readonly blockSize: number;
  readonly depth: number;
  /** Stop after this many operations, or this many ms, whichever first. */
  readonly ops?: number;
  readonly ms?: number;
  /** Bytes of the disk to touch from offset 0 (default: all of it). */
  readonly span?: number;
}

export interface WorkloadResult {
  ops: number;
  bytes: number;
  seconds: number;
  /** Latency percentiles in microseconds. */
  p50: number;
  p99: number;
}

export async function runWorkload(f: Blkfront, w: WorkloadSpec): Promise<WorkloadResult> {
  const span = Math.min(w.span ?? f.info.size, f.info.size);
  const blocks = Math.floor(span / w.blockSize);
  if (blocks < 1) throw new Error(`span ${span} holds no block of ${w.blockSize}`);
  const maxOps = w.ops ?? Number.MAX_SAFE_INTEGER;
  const deadline = performance.now() + (w.ms ?? 3_600_000);
  const write = w.pattern === 'write' || w.pattern === 'randwrite';
  const random = w.pattern.startsWith('rand');
  // One buffer per slot of the queue: nothing allocated per operation.
  const bufs = Array.from({ length: w.depth }, () => new Uint8Array(w.blockSize).fill(0x5a));
  const lat: number[] = [];
  let issued = 0;
  let next = 0;
  let seed = 0x9e3779b9;
  const rand = () => { seed ^= seed << 13; seed >>>= 0; seed ^= seed >>> 17; seed ^= seed << 5; seed >>>= 0; return seed; };
  const start = performance.now();
  const worker = async (slot: number) => {
    const buf = bufs[slot]!;
    while (issued < maxOps && performance.now() < deadline) {
      issued++;
      const block = random ? rand() % blocks : next++ % blocks;
      const t0 = performance.now();
      if (write) await f.write(block * w.blockSize, buf);
      else await f.readInto(block * w.blockSize, buf);
      lat.push(performance.now() - t0);
    }
  };
  await Promise.all(bufs.map((_, i) => worker(i)));
  const seconds = (performance.now() - start) / 1000;
  lat.sort((a, b) => a - b);
  const pct = (p: number) => (lat.length === 0 ? 0 : lat[Math.min(lat.length - 1, Math.floor(p * lat.length))]! * 1000);
  return { ops: lat.length, bytes: lat.length * w.blockSize, seconds, p50: pct(0.5), p99: pct(0.99) };
}
