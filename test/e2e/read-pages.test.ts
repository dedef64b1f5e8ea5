/**
 * Blkfront.readPages: a read's data handed over in the pages the backend filled, not copied out.
 * The pages are the data, in order, across requests and with a partial last page; while on loan
 * they carry no other request (a read or write meanwhile cannot change them, and a read needing
 * them waits for their release); a failed read lends nothing; pages released after the device
 * closed go back to the domain. With and without persistent grants.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { type Blkfront, BlkfrontError } from '../../src/blkfront/index.js';
import { MemoryStorage } from '../../src/storage/index.js';
import { Rng, firstDifference, fileToolstack, withLocalDisk } from './helpers.js';
import { within } from './raw-frontend.js';

const suite = fileToolstack();
const PAGE = 4096;
const POOL = 80;

function withDisk(persistent: boolean, body: (f: Blkfront, G: { memory: { freePages: number } }) => Promise<void>): Promise<void> {
  // 16 segments a request: a 64 KiB read is four requests, answered one by one.
  return withLocalDisk(suite.ts, { storage: new MemoryStorage(4 * 1024 * 1024), back: { persistent, housekeepingMs: 1000 }, front: { bufferPages: POOL, persistent, maxIndirectSegments: 16 } }, async ({ f, G }) => {
    assert.equal(f.info.persistent, persistent);
    await body(f, G);
  });
}

for (const persistent of [true, false]) {
  const how = persistent ? 'persistent grants' : 'a grant per request';

  test(`readPages lends the pages the backend filled: the data, in order, the last page cut (${how})`, { timeout: 60_000 }, async () => {
    await withDisk(persistent, async (f) => {
      const a = new Rng(7).bytes(256 * 1024);
      await f.write(0, a);
      for (const [offset, length] of [[0, 256 * 1024], [512, 3 * PAGE + 512], [PAGE, 512]] as const) {
        const lent = await f.readPages(offset, length);
        assert.equal(lent.pages.length, Math.ceil(length / PAGE), `${length} bytes: one page per 4 KiB`);
        assert.ok(lent.pages.every((p, i) => p.length === Math.min(PAGE, length - i * PAGE)));
        assert.equal(firstDifference(Buffer.concat(lent.pages), a.subarray(offset, offset + length)), -1, `${length} bytes at ${offset}`);
        lent.release();
        lent.release();
      }
      const empty = await f.readPages(0, 0);
      assert.equal(empty.pages.length, 0);
      empty.release();
    });
  });

  test(`pages on loan carry no other request until released (${how})`, { timeout: 60_000 }, async () => {
    await withDisk(persistent, async (f) => {
      const old = new Uint8Array(64 * 1024).fill(0x11);
      await f.write(0, old);
      const held = await f.readPages(0, old.length);
      // Other I/O while the 16 pages are on loan: writes over the same range, reads of it.
      const fresh = new Uint8Array(old.length).fill(0x22);
      await f.write(0, fresh);
      for (let i = 0; i < 8; i++) assert.equal(firstDifference(await f.read(0, fresh.length), fresh), -1);
      assert.equal(firstDifference(Buffer.concat(held.pages), old), -1, 'the lent pages still hold what was read');
      // With all but 4 pages on loan, a read needing a request of 16 (+1 indirect) waits for
      // a loan to end, then goes.
      const more = await f.readPages(0, (POOL - 16 - 4) * PAGE);
      let done = false;
      const waiting = f.read(0, fresh.length).then((d) => { done = true; return d; });
      // A pause in which a read that did not wait for the loan would have finished (no event
      // marks its waiting); a busy machine can only hide a fault here, not fail the test.
      await new Promise((r) => setTimeout(r, 50));
      assert.equal(done, false, 'the read waits for pages on loan');
      more.release();
      const got = await within(waiting, 'the read once the pages came back');
      assert.equal(firstDifference(Buffer.concat(held.pages), old), -1, 'the first loan is still intact');
      held.release();
      assert.equal(firstDifference(got.subarray(0, fresh.length), fresh), -1);
    });
  });
}

test('a failed read lends nothing; pages released after close go back to the domain', { timeout: 60_000 }, async () => {
  await withDisk(true, async (f, G) => {
    await assert.rejects(f.readPages(8 * 1024 * 1024, PAGE), BlkfrontError, 'past the end');
    const held = await f.readPages(0, 64 * 1024);
    const free = G.memory.freePages;
    await f.close();
    const afterClose = G.memory.freePages;
    assert.ok(afterClose > free, 'close gave back the free pages');
    held.release();
    assert.equal(G.memory.freePages, afterClose + 16, 'the 16 lent ones follow on release');
  });
});
