// Guest side for worker.test: runs in a worker thread, talks to the daemon
// through the shared page; notifications are counters in a SharedArrayBuffer
// woken with Atomics.notify / Atomics.waitAsync.
import { isMainThread, parentPort, workerData } from 'node:worker_threads';
import { XenstoreClient, XenstorePageClient } from '../../src/xenstore/index.js';

interface WaitAsyncResult {
  async: boolean;
  value: Promise<string> | string;
}
type WaitAsync = (a: Int32Array, i: number, v: number) => WaitAsyncResult;

async function main(): Promise<void> {
  const { page, bells } = workerData as { page: SharedArrayBuffer; bells: SharedArrayBuffer };
  const bell = new Int32Array(bells);
  const transport = new XenstorePageClient(new Uint8Array(page), () => {
    Atomics.add(bell, 0, 1); // guest -> daemon
    Atomics.notify(bell, 0);
  });
  let running = true;
  // A pending Atomics.waitAsync does not keep the event loop alive; this does.
  const keepAlive = setInterval(() => undefined, 1000);
  void (async () => {
    const waitAsync = (Atomics as unknown as { waitAsync: WaitAsync }).waitAsync;
    let seen = Atomics.load(bell, 1);
    while (running) {
      const r = waitAsync(bell, 1, seen);
      if (r.async) await r.value;
      seen = Atomics.load(bell, 1);
      transport.onEvent();
    }
  })();
  const c = new XenstoreClient(transport);
  const out: string[] = [];
  await c.write('worker/hello', 'from-worker');
  out.push(await c.read('worker/hello'));
  out.push(await c.read('/local/domain/0/name').catch((e: { code: string }) => e.code));
  await c.watch('worker', 'w', (p) => out.push(`event ${p}`));
  await c.write('worker/again', 'x');
  await c.read('worker/again');
  running = false;
  clearInterval(keepAlive);
  Atomics.add(bell, 1, 1);
  Atomics.notify(bell, 1);
  parentPort!.postMessage(out);
}

if (!isMainThread) void main();
