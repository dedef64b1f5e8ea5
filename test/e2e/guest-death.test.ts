/**
 * A guest that dies mid-I/O is cleaned up by the backend — ring and data pages unmapped,
 * persistent grants dropped, channel closed, its VBD Closed — while another guest's VBD on the
 * same driver domain never notices.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { Toolstack, type DomainProxy } from '../../src/toolstack/index.js';
import { XenbusStateClosed, waitForState } from '../../src/xenbus/index.js';
import { Rng, firstDifference } from './helpers.js';
import { eventually } from '../support/common.js';

let ts: Toolstack;
let back: DomainProxy;
before(async () => {
  ts = await Toolstack.start();
  back = await ts.createBackendDomain();
});
after(async () => { await ts.shutdown(); });

test('a guest killed mid-I/O leaves nothing mapped; the other guest keeps going', async () => {
  const victim = await ts.createGuest('victim', 4096);
  const bystander = await ts.createGuest('bystander', 4096);
  const size = 16 * 1024 * 1024;
  const dv = await ts.plug({ guest: victim, backend: back, storage: { kind: 'memory', size }, frontendOptions: { bufferPages: 2048 } });
  const db = await ts.plug({ guest: bystander, backend: back, storage: { kind: 'memory', size }, frontendOptions: { bufferPages: 2048 } });
  const base = ts.hv.domainCounters(back.domid)!;
  const rng = new Rng(17);
  const model = new Uint8Array(size);
  let running = true;
  const bystanding = (async () => {
    let n = 0;
    while (running || n < 50) {
      const off = rng.int(0, size / 65536 - 1) * 65536;
      const data = rng.bytes(65536);
      await db.write(off, data);
      model.set(data, off);
      assert.equal(firstDifference(await db.read(off, 65536), data), -1);
      n++;
    }
    return n;
  })();
  // The victim has plenty in flight when its domain is destroyed: 64 writers each keep a write
  // issued (the ring and the buffer pages stay full), and it dies once I/O has been flowing.
  let done = 0;
  const failures: string[] = [];
  const writer = async (i: number) => {
    for (;;) {
      const failed = await dv.write((i % 64) * 256 * 1024, rng.bytes(256 * 1024)).then(() => { done++; return false; }, (e: Error) => { failures.push(e.message); return true; });
      if (failed) return;
    }
  };
  const victimIo = Array.from({ length: 64 }, (_, i) => writer(i));
  await eventually(() => done >= 64, 'the victim\'s writes flowing', 30_000);
  assert.deepEqual(failures, [], 'no write failed before the domain died');
  await ts.hv.destroyDomain(victim.domid);
  await Promise.all(victimIo);
  // Each writer's outstanding write failed, and because the domain died.
  assert.equal(failures.length, 64);
  for (const m of failures) assert.match(m, /domain thread exited|no disk attached/);
  await waitForState(ts.xs, dv.paths.backDir, (s) => s === XenbusStateClosed, 30_000);
  const st = await back.rpc.call<{ counters: { inflight_req: number; grant_map_ops: number; grant_unmap_ops: number; persistent_grants: number } }>('status', dv.paths.backDir);
  assert.equal(st.counters.inflight_req, 0);
  assert.equal(st.counters.persistent_grants, 0);
  assert.equal(st.counters.grant_map_ops, st.counters.grant_unmap_ops, 'every page the dead guest lent was unmapped');
  await back.rpc.call('removeVbd', dv.paths.backDir);
  running = false;
  assert.ok((await bystanding) >= 50);
  assert.equal(firstDifference(await db.read(0, size), model), -1, 'the other VBD never noticed');
  const bs = await db.backendStatus();
  assert.equal(bs.state, 'Connected');
  assert.equal(bs.counters.errors, 0);
  await db.unplug();
  const after = ts.hv.domainCounters(back.domid)!;
  assert.ok(after.mapsActive <= base.mapsActive, `driver domain maps ${after.mapsActive} (was ${base.mapsActive} with both connected)`);
  await ts.destroy(victim);
  await ts.destroy(bystander);
});
