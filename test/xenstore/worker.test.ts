// A guest in a worker thread and the daemon in the main thread share the page.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Worker } from 'node:worker_threads';
import { XenstoreDaemon, XenstoreClient, XenstorePageClient, attachPage } from '../../src/xenstore/index.js';
import { listenBell, ringBell } from './helpers.js';


test('guest in a worker thread over a SharedArrayBuffer page', async () => {
  const daemon = new XenstoreDaemon();
  // dom0 uses its own page connection to prepare the guest's home.
  const p0 = new Uint8Array(new SharedArrayBuffer(4096));
  let s0: { onEvent(): void } | undefined;
  const t0 = new XenstorePageClient(p0, () => queueMicrotask(() => s0?.onEvent()));
  s0 = attachPage(daemon, 0, p0, () => queueMicrotask(() => t0.onEvent()));
  const dom0 = new XenstoreClient(t0);
  await dom0.write('/local/domain/0/name', 'Domain-0');
  await dom0.mkdir('/local/domain/6');
  await dom0.setPerms('/local/domain/6', [{ domid: 6, perm: 'n' }]);

  const page = new SharedArrayBuffer(4096);
  const bells = new SharedArrayBuffer(8);
  const bell = new Int32Array(bells);
  const server = attachPage(daemon, 6, new Uint8Array(page), () => ringBell(bell, 1)); // daemon -> guest
  const listener = listenBell(bell, 0, () => server.onEvent());
  const worker = new Worker(new URL('./guest-worker.js', import.meta.url), { workerData: { page, bells } });
  try {
    const out = await new Promise<string[]>((resolve, reject) => {
      worker.once('message', resolve);
      worker.once('error', reject);
      worker.once('exit', (code) => reject(new Error(`worker exited ${code}`)));
    });
    assert.deepEqual(out, ['from-worker', 'EACCES', 'event worker', 'event worker/again']);
    assert.equal(await dom0.read('/local/domain/6/worker/hello'), 'from-worker');
  } finally {
    await listener.stop();
    await worker.terminate();
    await daemon.close();
  }
});
