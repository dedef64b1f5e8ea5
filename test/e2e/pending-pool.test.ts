/**
 * blkback's pending pool per ring, sized as Linux sizes it (XEN_BLKIF_REQS_PER_PAGE = 32 requests
 * per ring page): a 2-page ring's worth of requests (64) is served at once with `oo_req` staying
 * 0; with a smaller pool the rest wait on the ring, `oo_req` counts the waits, and every request
 * still completes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { XEN_BLKIF_REQS_PER_PAGE } from '../../src/blkback/index.js';
import { MemoryStorage } from '../../src/storage/index.js';
import { eventually, within } from './raw-frontend.js';
import { fileToolstack, withLocalDisk } from './helpers.js';

const suite = fileToolstack();

/** Memory storage whose reads wait until released. */
class HeldReads extends MemoryStorage {
  readonly held: (() => void)[] = [];
  hold = true;
  active = 0;
  maxActive = 0;
  override async read(o: number, b: readonly Uint8Array[]): Promise<void> {
    this.active++;
    this.maxActive = Math.max(this.maxActive, this.active);
    try {
      if (this.hold) await new Promise<void>((r) => this.held.push(r));
      await super.read(o, b);
    } finally {
      this.active--;
    }
  }
  release(): void {
    this.hold = false;
    for (const r of this.held.splice(0)) r();
  }
}

for (const reqsPerPage of [XEN_BLKIF_REQS_PER_PAGE, 4]) test(`a 2-page ring, ${reqsPerPage} pending requests per ring page`, { timeout: 60_000 }, async () => {
  const storage = new HeldReads(4 * 1024 * 1024);
  await withLocalDisk(suite.ts, { storage, back: { reqsPerPage }, front: { ringPageOrder: 1, bufferPages: 512 } }, async ({ be, f }) => {
    try {
      assert.equal(f.info.ringPageOrder, 1);
      const slots = f.info.ringSize;
      const pool = reqsPerPage * 2;
      // More 4 KiB reads than the ring holds: the ring fills, the backend takes what its pool allows.
      const reads = Array.from({ length: slots + 16 }, (_, i) => f.read(i * 4096, 4096));
      await eventually(() => storage.held.length === Math.min(pool, slots) && f.inFlight === slots, `${Math.min(pool, slots)} reads at the storage, ${slots} on the ring`);
      if (pool >= slots) assert.equal(be.counters.oo_req, 0, 'a pool of 32 per ring page never runs dry before the ring');
      else assert.equal(be.counters.oo_req, 1, 'the backend found the pool empty with requests on the ring');
      storage.release();
      await within(Promise.all(reads), 'every read completes');
      assert.equal(storage.maxActive, Math.min(pool, slots), 'never more at the storage than the pool');
      // How many more waits follow depends on how completions interleave (exact counts: test/blkback/data-path.test.ts).
      if (pool < slots) assert.ok(be.counters.oo_req >= 1 && be.counters.oo_req <= reads.length - pool, `waits counted: ${be.counters.oo_req}`);
      assert.equal(be.counters.rd_req, reads.length);
      assert.equal(be.counters.rd_sect, reads.length * 8);
    } finally {
      storage.release();
    }
  });
});
