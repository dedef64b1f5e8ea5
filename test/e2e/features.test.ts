/**
 * Features Linux grew after 3.11, end to end: the persistent-grant cache stays within its bound,
 * purges what sits idle and ends empty after a disconnect; an image that grows while the guest
 * does verified I/O is picked up online (`sectors` rewritten, then `state`), nothing dropped,
 * with queues in the backend's thread or in threads of their own; a queue thread that dies takes
 * its VBD through a reconnection, and nothing is lost.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { truncateSync } from 'node:fs';
import { join } from 'node:path';
import type { DeviceInfo } from '../../src/blkfront/index.js';
import { backendMemory } from '../../src/product/index.js';
import { Toolstack, type DomainProxy } from '../../src/toolstack/index.js';
import { XenbusStateClosed, waitForState } from '../../src/xenbus/index.js';
import { Rng, firstDifference, sparseImage, tempDir } from './helpers.js';
import { eventually } from '../support/common.js';

let ts: Toolstack;
let back: DomainProxy;
let guest: DomainProxy;
const tmp = tempDir('blkif-features-');

before(async () => {
  ts = await Toolstack.start();
  back = await ts.createBackendDomain();
  guest = await ts.createGuest('guest', 4096);
});
after(async () => {
  await ts.shutdown();
  tmp.cleanup();
});


test('the persistent-grant cache keeps to its bound, purges idle grants and ends empty', async () => {
  const disk = await ts.plug({
    guest, backend: back, storage: { kind: 'memory', size: 32 * 1024 * 1024 },
    backendOptions: { maxPersistentGrants: 64, persistentIdleMs: 300, housekeepingMs: 50, maxIndirectSegments: 256 },
    frontendOptions: { bufferPages: 2048 },
  });
  assert.equal(disk.info.persistent, true);
  const rng = new Rng(11);
  // Deep, wide I/O: far more distinct pages than the cache may hold.
  await Promise.all(Array.from({ length: 32 }, async (_, i) => {
    const data = rng.bytes(512 * 1024);
    await disk.write(i * 512 * 1024, data);
    assert.equal(firstDifference(await disk.read(i * 512 * 1024, data.length), data), -1);
  }));
  let bs = await disk.backendStatus();
  assert.ok(bs.counters.persistent_grants_peak > 0 && bs.counters.persistent_grants_peak <= 64, `peak ${bs.counters.persistent_grants_peak}`);
  assert.ok(bs.counters.grant_map_ops > 64, 'grants past the bound were mapped per request');
  // Idle past persistentIdleMs: the housekeeping purges them, however late it runs.
  await eventually(async () => (bs = await disk.backendStatus()).counters.persistent_grants === 0, 'idle grants purged', 30_000, 25);
  assert.ok(bs.counters.persistent_purged > 0);
  // Used again, then a disconnect: the cache is emptied before the backend says Closed.
  await disk.write(0, rng.bytes(64 * 1024));
  assert.ok((await disk.backendStatus()).counters.persistent_grants > 0);
  await guest.rpc.call('detach', disk.paths.frontDir);
  await waitForState(ts.xs, disk.paths.backDir, (s) => s === XenbusStateClosed, 30_000);
  bs = await disk.backendStatus();
  assert.equal(bs.counters.persistent_grants, 0, 'nothing left mapped after disconnect');
  assert.equal(bs.counters.grant_map_ops, bs.counters.grant_unmap_ops);
  await back.rpc.call('removeVbd', disk.paths.backDir);
});

// With queue threads, each thread re-reads its own storage handle's size before the frontend learns it.
for (const threads of [false, true]) test(`an image that grows during verified I/O is picked up online${threads ? ' (2 queues in threads of their own)' : ''}`, async () => {
  const path = join(tmp.dir, `grow-${threads}.img`);
  const small = 8 * 1024 * 1024;
  sparseImage(path, small);
  const disk = await ts.plug({
    guest, backend: back, storage: { kind: 'file', path },
    backendOptions: { housekeepingMs: 50, queueThreads: threads },
    frontendOptions: { bufferPages: 2048, queues: threads ? 2 : 1 },
  });
  assert.equal((await disk.backendStatus()).queueVcpus.length, threads ? 2 : 0);
  const model = new Uint8Array(4 * small);
  const rng = new Rng(5);
  let running = true;
  let ios = 0;
  const load = (async () => {
    while (running) {
      const off = rng.int(0, small / 4096 - 16) * 4096;
      const data = rng.bytes(16 * 4096);
      await disk.write(off, data);
      model.set(data, off);
      assert.equal(firstDifference(await disk.read(off, data.length), data), -1);
      ios++;
    }
  })();
  await eventually(() => ios >= 5, 'verified I/O running before the image grows', 30_000);
  const before = ios;
  truncateSync(path, 4 * small);
  await eventually(async () => (await guest.rpc.call<DeviceInfo>('info', disk.paths.frontDir)).size === 4 * small, 'the frontend sees the new size', 30_000, 25);
  const tail = rng.bytes(1024 * 1024);
  await disk.write(3 * small, tail);
  model.set(tail, 3 * small);
  await eventually(() => ios > before, 'verified I/O going on across the growth', 30_000);
  running = false;
  await load;
  assert.equal(firstDifference(await disk.read(0, 4 * small), model), -1, 'every byte as written, old end and new');
  const bs = await disk.backendStatus();
  assert.equal(bs.counters.errors, 0);
  await disk.unplug();
});

test('a queue thread that dies mid-I/O: the VBD reconnects, nothing is lost, nothing is left behind', async () => {
  const path = join(tmp.dir, 'thread-death.img');
  const size = 16 * 1024 * 1024;
  sparseImage(path, size);
  const before = ts.hv.domainCounters(back.domid)!;
  const disk = await ts.plug({
    guest, backend: back, storage: { kind: 'file', path },
    backendOptions: { queueThreads: true },
    frontendOptions: { bufferPages: 2048, queues: 2 },
  });
  const vcpus = (await disk.backendStatus()).queueVcpus;
  assert.equal(vcpus.length, 2);
  const model = new Uint8Array(size);
  const rng = new Rng(17);
  let running = true;
  let ios = 0;
  // Eight writers on disjoint stripes, each verifying what it wrote.
  const load = Promise.all(Array.from({ length: 8 }, async (_, w) => {
    const stripe = size / 8;
    while (running) {
      const off = w * stripe + rng.int(0, stripe / 4096 - 64) * 4096;
      const data = rng.bytes(rng.int(1, 64) * 4096);
      await disk.write(off, data);
      model.set(data, off);
      assert.equal(firstDifference(await disk.read(off, data.length), data), -1, `read back at ${off}`);
      ios++;
    }
  }));
  await eventually(() => ios >= 20, 'the load running', 30_000);
  const exit = await ts.hv.stopVcpu(back.domid, vcpus[0]!);
  assert.equal(exit.stopped, true);
  const at = ios;
  // The backend goes fatal for that VBD, the frontend closes and comes back, with new threads.
  let bs = await disk.backendStatus();
  await eventually(async () => {
    bs = await disk.backendStatus();
    return bs.connected && bs.queueVcpus.length === 2 && ios > at + 20;
  }, 'reconnected with two queue threads and I/O going on', 60_000, 25).catch((e: Error) => { throw new Error(`${e.message}: ${JSON.stringify(bs)}`); });
  running = false;
  await load;
  assert.ok(bs.connected && bs.queueVcpus.length === 2, `reconnected with two queue threads: ${JSON.stringify(bs)}`);
  assert.ok(ios > at + 20, 'I/O went on after the thread died');
  assert.ok(ts.logs.some((l) => l.includes('thread died')), 'the death is logged');
  assert.equal(firstDifference(await disk.read(0, size), model), -1, 'every byte as written');
  await disk.unplug();
  const after = ts.hv.domainCounters(back.domid)!;
  assert.deepEqual(ts.hv.vcpusOf(back.domid), [], 'no queue thread left');
  assert.equal(after.mapsActive, before.mapsActive, 'the dead thread\'s mappings were released');
  assert.equal(after.portsOpen, before.portsOpen, 'its channel was closed');
});

test('queue threads on storage that cannot be opened twice (memory): every queue served in the backend thread, and said so', async () => {
  const disk = await ts.plug({
    guest, backend: back, storage: { kind: 'memory', size: 4 * 1024 * 1024 },
    backendOptions: { queueThreads: true }, frontendOptions: { queues: 2, bufferPages: 1024 },
  });
  try {
    assert.deepEqual((await disk.backendStatus()).queueVcpus, []);
    const data = new Rng(3).bytes(256 * 1024);
    await disk.write(4096, data);
    assert.equal(firstDifference(await disk.read(4096, data.length), data), -1);
    assert.ok(ts.logs.some((l) => l.includes(disk.paths.backDir) && l.includes('cannot be shared between threads')), 'the fallback is logged');
  } finally {
    await disk.unplug();
  }
});

for (const grantCopy of [false, true]) test(`more queues than the driver domain has vCPUs: the rest are served in its main thread, and said so${grantCopy ? ' (grant copy)' : ''}`, async () => {
  const features = { queueThreads: true, grantCopy };
  const small = await ts.createBackendDomain('driver-2vcpus', backendMemory(features, 1), { maxVcpus: 2 });
  const path = join(tmp.dir, `few-vcpus-${grantCopy}.img`);
  sparseImage(path, 8 * 1024 * 1024);
  const disk = await ts.plug({
    guest, backend: small, storage: { kind: 'file', path },
    backendOptions: features, frontendOptions: { queues: 3, bufferPages: 1024 },
  });
  try {
    assert.deepEqual((await disk.backendStatus()).queueVcpus, [1], 'one queue thread, the only vCPU left');
    const rng = new Rng(23);
    await Promise.all(Array.from({ length: 12 }, async (_, i) => {
      const data = rng.bytes(64 * 1024);
      await disk.write(i * 512 * 1024, data);
      assert.equal(firstDifference(await disk.read(i * 512 * 1024, data.length), data), -1);
    }));
    assert.ok(ts.logs.some((l) => l.includes('no free vCPU') && l.includes('in this thread')), 'the fallback is logged');
    const bs = await disk.backendStatus();
    assert.equal(bs.counters.errors, 0);
    if (grantCopy) assert.ok(bs.counters.grant_copy_ops > 0, 'grant copy in the thread and here');
  } finally {
    await disk.unplug();
    await ts.destroy(small);
  }
});
