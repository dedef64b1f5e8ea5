/**
 * Two threads, one ring: a frontend worker and a backend worker exchange `entries` requests and
 * responses through a SharedArrayBuffer ring, kicking each other with Atomics only when the
 * event indexes ask for it. It is the ring demo (`blkif ring demo`), the two-thread test and a
 * benchmark, all on the same code.
 */
import { Worker } from 'node:worker_threads';
import { abiByName } from '../abi/index.js';
import { FrontRing, SharedRing } from '../ring/index.js';
import type { ExchangeWorkerData, ExchangeWorkerResult } from './ring-exchange-worker.js';

export interface ExchangeOptions {
  entries: number;
  protocol?: string;
  order?: number;
}

export interface ExchangeResult {
  entries: number;
  ringSize: number;
  elapsedMs: number;
  front: ExchangeWorkerResult;
  back: ExchangeWorkerResult;
}

export async function runRingExchange(opts: ExchangeOptions): Promise<ExchangeResult> {
  const protocol = opts.protocol ?? 'native';
  const abi = abiByName(protocol);
  if (abi === undefined) throw new Error(`unknown ABI ${protocol}`);
  const ring = SharedRing.allocate(opts.order ?? 0, abi.entrySize);
  FrontRing.init(ring);
  const kicks = new Int32Array(new SharedArrayBuffer(8));
  const start = performance.now();
  const workers: Worker[] = [];
  const run = (role: 'front' | 'back'): Promise<ExchangeWorkerResult> =>
    new Promise((resolve, reject) => {
      const data: ExchangeWorkerData = { role, pages: [...ring.pages], protocol, entries: opts.entries, kicks };
      const w = new Worker(new URL('./ring-exchange-worker.js', import.meta.url), { workerData: data });
      workers.push(w);
      let result: ExchangeWorkerResult | undefined;
      w.on('message', (m: ExchangeWorkerResult) => (result = m));
      w.on('error', reject);
      w.on('exit', (code) => (result !== undefined ? resolve(result) : reject(new Error(`${role} worker exited with code ${code}`))));
    });
  let front: ExchangeWorkerResult;
  let back: ExchangeWorkerResult;
  try {
    [front, back] = await Promise.all([run('front'), run('back')]);
  } catch (e) {
    // The survivor would wait for its peer forever: stop it too.
    await Promise.all(workers.map((w) => w.terminate()));
    throw e;
  }
  return { entries: opts.entries, ringSize: ring.size, elapsedMs: performance.now() - start, front, back };
}
