/**
 * Grant copy's bounce pool takes the driver domain's pages as copies first need them
 * (BOUNCE_CHUNK at a time, up to its capacity, never beyond), queues takers in order once full,
 * and gives every page back when disposed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BOUNCE_CHUNK, BouncePool } from '../../src/blkback/page-access.js';
import { Hypervisor, type XenDomain } from '../../src/xen/index.js';

const used = (x: XenDomain) => x.memory.totalPages - x.memory.freePages;

test('a lazy bounce pool grows as taken, up to its capacity, then queues; dispose gives all back', { timeout: 60_000 }, async () => {
  const hv = new Hypervisor({ dom0MemoryPages: 16 });
  try {
    const B = hv.createLocalDomain({ memoryPages: 1024 });
    const pool = new BouncePool(B, [], 300);
    assert.equal(used(B), 0, 'nothing taken at creation');
    const a = pool.take(8);
    assert.ok(Array.isArray(a) && a.length === 8);
    assert.equal(used(B), BOUNCE_CHUNK, 'one chunk for a small copy');
    const b = pool.take(200);
    assert.ok(Array.isArray(b) && b.length === 200);
    assert.equal(used(B), 208, 'grown by what a big copy lacks');
    assert.throws(() => pool.take(301), /exceeds the 300-page bounce pool/);
    const c = pool.take(92);
    assert.ok(Array.isArray(c));
    assert.equal(used(B), 300, 'never beyond its capacity');
    const waiting = pool.take(10);
    assert.ok(waiting instanceof Promise, 'full: the taker waits');
    pool.give(a);
    pool.give(b.slice(0, 2));
    const got = await waiting;
    assert.equal(got.length, 10);
    assert.equal(used(B), 300);
    pool.dispose();
    assert.equal(used(B), 0, 'every page back to the domain');
    // A domain with less memory than the capacity: the pool stops where the memory ends.
    const S = hv.createLocalDomain({ memoryPages: 100 });
    const small = new BouncePool(S, [], 300);
    assert.throws(() => small.take(150), /exceeds the 100-page bounce pool/);
    const all = small.take(100);
    assert.ok(Array.isArray(all) && all.length === 100);
    small.dispose();
    assert.equal(used(S), 0);
  } finally {
    await hv.shutdown();
  }
});
