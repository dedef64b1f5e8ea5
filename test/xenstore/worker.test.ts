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

test('XS_INTRODUCE hands the guest page to the injected introducer, which attaches a page server', async () => {
  const seen: [number, string, number][] = [];
  const guestPage = new Uint8Array(new SharedArrayBuffer(4096));
  let guestServer: { onEvent(): void } | undefined;
  let guest: XenstorePageClient | undefined;
  const daemon: XenstoreDaemon = new XenstoreDaemon({
    introduce: (domid, gfn, port) => {
      seen.push([domid, gfn, port]);
      if (domid !== 7) return false; // domain 8: introduced without a page
      guestServer = attachPage(daemon, domid, guestPage, () => queueMicrotask(() => guest?.onEvent()));
      return true;
    },
  });
  const p0 = new Uint8Array(new SharedArrayBuffer(4096));
  let s0: { onEvent(): void } | undefined;
  const t0 = new XenstorePageClient(p0, () => queueMicrotask(() => s0?.onEvent()));
  s0 = attachPage(daemon, 0, p0, () => queueMicrotask(() => t0.onEvent()));
  const dom0 = new XenstoreClient(t0);
  try {
    await dom0.mkdir('/local/domain/7');
    await dom0.setPerms('/local/domain/7', [{ domid: 7, perm: 'n' }]);
    await dom0.introduce(7, 0x1234, 5);
    await dom0.introduce(8, 99, 6);
    assert.deepEqual(seen, [[7, '4660', 5], [8, '99', 6]]);
    assert.equal(await dom0.isDomainIntroduced(7), true);
    assert.equal(await dom0.isDomainIntroduced(8), true);
    await dom0.introduce(7, 0x1234, 5); // already introduced: not asked again
    assert.equal(seen.length, 2);
    // The page the introducer attached serves the guest, as domain 7.
    guest = new XenstorePageClient(guestPage, () => queueMicrotask(() => guestServer?.onEvent()));
    const c = new XenstoreClient(guest);
    await c.write('/local/domain/7/hello', 'from-7');
    assert.equal(await dom0.read('/local/domain/7/hello'), 'from-7');
    assert.equal(await c.read('/local/domain/0').catch((e: { code?: string }) => e.code), 'EACCES', 'not dom0');
  } finally {
    await daemon.close();
  }
});
