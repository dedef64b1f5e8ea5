/**
 * Soak: several VBDs in two guests do verified random I/O while their driver domain is moved to
 * fresh ones with random features or killed outright, at random. At the end every byte of every
 * image matches its model and no grant, mapping or channel is left anywhere. Bounded for CI;
 * `BLKIF_SOAK_SECONDS=600 npm run soak` runs it longer.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { backendMemory, randomBackendFeatures } from '../../src/product/index.js';
import { Toolstack, type DomainProxy, type GuestDisk } from '../../src/toolstack/index.js';
import { Rng, firstDifference, sparseImage, tempDir } from '../e2e/helpers.js';

const SECONDS = Number(process.env.BLKIF_SOAK_SECONDS ?? 8);
const VBDS = 4;
const SIZE = 8 * 1024 * 1024;

test(`soak: ${VBDS} VBDs, verified I/O, driver domains moved and killed for ${SECONDS} s`, { timeout: (SECONDS + 120) * 1000 }, async (t) => {
  const tmp = tempDir('blkif-soak-');
  const ts = await Toolstack.start();
  try {
    const rng = new Rng(Number(process.env.BLKIF_SOAK_SEED ?? 4242));
    const guests = [await ts.createGuest('soak-a', 4096), await ts.createGuest('soak-b', 4096)];
    let back: DomainProxy = await ts.createBackendDomain('soak-driver');
    const disks: GuestDisk[] = [];
    const models: Uint8Array[] = [];
    const paths: string[] = [];
    for (let i = 0; i < VBDS; i++) {
      const path = join(tmp.dir, `vbd${i}.img`);
      sparseImage(path, SIZE);
      paths.push(path);
      models.push(new Uint8Array(SIZE));
      disks.push(await ts.plug({ guest: guests[i % 2]!, backend: back, storage: { kind: 'file', path }, frontendOptions: { bufferPages: 1024, connectTimeoutMs: 30_000, queues: 2 } }));
    }
    let running = true;
    let ops = 0;
    const workers = disks.map(async (_, i) => {
      const r = new Rng(rng.next());
      while (running) {
        const len = r.int(1, 64) * 4096;
        const off = r.int(0, (SIZE - len) / 4096) * 4096;
        if (r.int(0, 2) === 0) {
          const got = await disks[i]!.read(off, len);
          assert.equal(firstDifference(got, models[i]!.subarray(off, off + len)), -1, `vbd${i} read ${len} at ${off}`);
        } else {
          const data = r.bytes(len);
          await disks[i]!.write(off, data);
          models[i]!.set(data, off);
        }
        ops++;
      }
    });
    const deadline = Date.now() + SECONDS * 1000;
    let moves = 0;
    let kills = 0;
    while (Date.now() < deadline) {
      // Scenario, not synchronisation: the next move comes at a random moment of the load.
      await new Promise((r) => setTimeout(r, rng.int(200, 800)));
      const features = randomBackendFeatures(() => rng.next() / 2 ** 32);
      const next = await ts.createBackendDomain(`soak-driver-${moves + kills}`, backendMemory(features, VBDS));
      const kill = rng.int(0, 2) === 0;
      if (kill) {
        await ts.hv.destroyDomain(back.domid);
        kills++;
      }
      await Promise.all(disks.map(async (d, i) => { disks[i] = await ts.migrate(d, next, features); }));
      await ts.destroy(back);
      back = next;
      moves++;
    }
    running = false;
    await Promise.all(workers);
    t.diagnostic(`${ops} verified I/Os, ${moves} moves of which ${kills} after killing the driver domain`);
    for (let i = 0; i < VBDS; i++) {
      assert.equal(firstDifference(await disks[i]!.read(0, SIZE), models[i]!), -1, `vbd${i} matches its model`);
      await disks[i]!.unplug();
      assert.equal(firstDifference(readFileSync(paths[i]!), models[i]!), -1, `vbd${i}'s image matches its model`);
    }
  } finally {
    await ts.shutdown();
    tmp.cleanup();
  }
  const c = ts.hv.counters();
  assert.deepEqual([c.grantsActive, c.mapsActive, c.channelsBound, c.portsOpen], [0, 0, 0, 0], 'nothing left anywhere');
});
