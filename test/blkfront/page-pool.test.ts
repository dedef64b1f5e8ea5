/**
 * blkfront's page pool takes guest pages as the load first needs them (GROW_CHUNK at a time, up
 * to bufferPages, never beyond) and gives them all back at close: a lightly used disk holds few.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GROW_CHUNK, PagePool } from '../../src/blkfront/page-pool.js';
import { MemoryStorage } from '../../src/storage/index.js';
import { Hypervisor, type XenDomain } from '../../src/xen/index.js';
import { within } from '../e2e/raw-frontend.js';
import { fileToolstack, withLocalDisk } from '../e2e/helpers.js';

const suite = fileToolstack();
const PAGE = 4096;
const used = (x: XenDomain) => x.memory.totalPages - x.memory.freePages;

test('the pool grows in chunks as asked, never beyond its size, and gives back all but stuck pages', { timeout: 60_000 }, async () => {
  const hv = new Hypervisor({ dom0MemoryPages: 16 });
  try {
    const G = hv.createLocalDomain({ memoryPages: 4096 });
    const pool = new PagePool(G, 1000);
    assert.equal(pool.frames.length, 0, 'nothing taken at creation');
    assert.equal(pool.usable, 1000, 'but it may carry its size');
    assert.equal(used(G), 0);
    assert.equal(pool.reserve(8), true);
    assert.equal(pool.frames.length, GROW_CHUNK, 'one chunk for a small request');
    const out: number[] = [];
    pool.take(8, out);
    assert.equal(pool.reserve(GROW_CHUNK - 8), true);
    assert.equal(pool.frames.length, GROW_CHUNK, 'no growth while enough are free');
    assert.equal(pool.reserve(300), true);
    assert.equal(pool.frames.length, 300 + 8, 'grown by what a big request lacks');
    assert.equal(pool.reserve(1000), false, 'never beyond its size');
    assert.equal(pool.frames.length, 1000);
    assert.equal(used(G), 1000);
    assert.equal(new Set(pool.frames).size, 1000);
    for (const f of out) assert.equal(pool.page(f).byteLength, PAGE);
    // A page a backend keeps mapped is out of use and not given back.
    const ref = G.grants.grantAccess(0, out[0]!, false);
    const m = hv.dom0.grants.mapGrant(G.domid, ref, true);
    pool.stick(out[0]!, ref);
    assert.equal(pool.leaked, 1);
    assert.equal(pool.usable, 999);
    for (const f of out.slice(1)) pool.give(f);
    pool.dispose();
    assert.equal(used(G), 1, 'every page but the stuck one is back');
    hv.dom0.grants.unmapGrant(m.handle);
    assert.equal(pool.retryStuck(), 1);
    pool.dispose();
    assert.equal(used(G), 0);
    // A domain with less memory than the pool's size: it stops where the memory ends.
    const S = hv.createLocalDomain({ memoryPages: 100 });
    const small = new PagePool(S, 1000);
    assert.equal(small.reserve(200), false);
    assert.equal(small.frames.length, 100);
    assert.equal(small.usable, 100, 'the pool says what it can carry');
    small.dispose();
    assert.equal(used(S), 0);
  } finally {
    await hv.shutdown();
  }
});

test('through blkfront: a small workload takes a chunk, a big one at most bufferPages, and close gives them back', { timeout: 60_000 }, async () => {
  const bufferPages = 1024;
  await withLocalDisk(suite.ts, { storage: new MemoryStorage(64 * 1024 * 1024), guestPages: 8192, front: { bufferPages, ringPageOrder: 0 } }, async ({ G, f }) => {
    const base = used(G); // the ring
    assert.ok(base < 16, `attached with ${base} pages: the pool took none yet`);
    // 4 KiB writes and reads, 8 at a time.
    for (let round = 0; round < 4; round++) {
      await Promise.all(Array.from({ length: 8 }, (_, i) => f.write((round * 8 + i) * PAGE, new Uint8Array(PAGE).fill(i + 1))));
      const back = await Promise.all(Array.from({ length: 8 }, (_, i) => f.read((round * 8 + i) * PAGE, PAGE)));
      back.forEach((b, i) => assert.ok(new Uint8Array(b).every((x) => x === i + 1)));
    }
    assert.equal(used(G) - base, GROW_CHUNK, 'a small workload took one chunk');
    // 1 MiB writes, 16 at a time: more than the pool holds at once (16 x 257 pages).
    const big = new Uint8Array(1 << 20);
    for (let i = 0; i < big.length; i++) big[i] = (i * 7) & 0xff;
    await Promise.all(Array.from({ length: 16 }, (_, i) => f.write(i << 20, big)));
    const grown = used(G) - base;
    assert.ok(grown > GROW_CHUNK && grown <= bufferPages, `the pool grew to ${grown} pages (at most ${bufferPages})`);
    assert.deepEqual(new Uint8Array(await f.read(5 << 20, 1 << 20)), big);
    await within(f.close(), 'close()');
    assert.equal(used(G), 0, 'close gave every page back');
  });
});
