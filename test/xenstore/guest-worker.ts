// Guest side for worker.test: runs in a worker thread, talks to the daemon
// through the shared page; notifications are counters in a SharedArrayBuffer
// woken with Atomics.notify / Atomics.waitAsync.
import { isMainThread, parentPort, workerData } from 'node:worker_threads';
import { XenstoreClient, XenstorePageClient } from '../../src/xenstore/index.js';
import { listenBell, ringBell } from './helpers.js';

async function main(): Promise<void> {
  const { page, bells } = workerData as { page: SharedArrayBuffer; bells: SharedArrayBuffer };
  const bell = new Int32Array(bells);
  const transport = new XenstorePageClient(new Uint8Array(page), () => ringBell(bell, 0)); // guest -> daemon
  const listener = listenBell(bell, 1, () => transport.onEvent());
  const c = new XenstoreClient(transport);
  const out: string[] = [];
  await c.write('worker/hello', 'from-worker');
  out.push(await c.read('worker/hello'));
  out.push(await c.read('/local/domain/0/name').catch((e: { code: string }) => e.code));
  await c.watch('worker', 'w', (p) => out.push(`event ${p}`));
  await c.write('worker/again', 'x');
  await c.read('worker/again');
  await listener.stop();
  parentPort!.postMessage(out);
}

if (!isMainThread) void main();
