/**
 * Persistent grants on both ends age together (Linux blkback's idle purge, blkfront's
 * `purge_persistent_grants`): while the backend keeps a page mapped the frontend cannot and does
 * not end its grant; once the backend's idle purge unmaps them, the frontend's periodic purge ends
 * them, and the pages are granted afresh when used again, with the data intact.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStorage } from '../../src/storage/index.js';
import { Rng, firstDifference, fileToolstack, withLocalDisk } from './helpers.js';
import { eventually } from './raw-frontend.js';

const suite = fileToolstack();

test('grants the backend purged are ended by the frontend, and granted again on use', { timeout: 60_000 }, async () => {
  // The backend drops a mapping idle for 300 ms; the frontend looks every 20 ms.
  const storage = new MemoryStorage(8 * 1024 * 1024);
  await withLocalDisk(suite.ts, { storage, back: { persistentIdleMs: 300, housekeepingMs: 20 }, front: { bufferPages: 512, purgeIntervalMs: 20 } }, async ({ be, f }) => {
    assert.equal(f.info.persistent, true);
    const rng = new Rng(21);
    const a = rng.bytes(256 * 1024);
    await f.write(0, a);
    const granted = f.persistentGrants;
    assert.ok(granted >= 64, `one persistent grant per page used (${granted})`);
    assert.equal(be.counters.persistent_grants, granted, 'the backend maps each of them');
    // Still mapped by the backend: nothing can be ended.
    assert.equal(f.purgePersistentGrants(), 0);
    assert.equal(f.persistentGrants, granted);

    // The backend's idle purge unmaps them; the frontend's next purge ends them all.
    await eventually(() => be.counters.persistent_grants === 0, 'the backend purges its idle mappings');
    await eventually(() => f.persistentGrants === 0, 'the frontend ends the grants the backend let go of');
    assert.equal(f.counters.persistent_purged, granted);

    // Used again: granted afresh, mapped afresh, data as written.
    const grantsBefore = f.counters.grants;
    assert.equal(firstDifference(await f.read(0, a.length), a), -1);
    assert.ok(f.counters.grants > grantsBefore, 'pages are granted again');
    assert.ok(f.persistentGrants > 0);
    assert.equal(be.counters.persistent_grants, f.persistentGrants);
  });
});
