/**
 * Two worker-thread domains set up a virtual block device the way blkif.h describes: each talks
 * to xenstore through its own shared page and event channel, they walk the xenbus states,
 * share a granted ring page and an interdomain event channel, exchange requests, close, and
 * leave nothing behind: grants, mappings and channels back to zero.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Hypervisor } from '../../src/xen/index.js';
import { XenstoreClient, XenstoreDaemon, XenstoreSocketServer } from '../../src/xenstore/index.js';
import { XS_BACKEND, XS_BACKEND_ID, XS_FRONTEND, XS_FRONTEND_ID, XS_STATE, XenbusStateClosed, acceptGuestXenstore, backendPath, frontendPath, xvdVirtualDevice } from '../../src/xenbus/index.js';
import type { VbdDomainData, VbdDomainReport } from './fixtures/vbd-domain.js';

test('frontend and backend domains handshake through xenstore, share a ring, close and leave nothing behind', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'blkif-xenbus-'));
  const hv = new Hypervisor();
  const daemon = new XenstoreDaemon();
  const server = await XenstoreSocketServer.listen(daemon, join(dir, 'socket'));
  const xs = await XenstoreClient.connectSocket(join(dir, 'socket'));
  const teardowns: (() => void)[] = [];
  try {
    const script = new URL('./fixtures/vbd-domain.js', import.meta.url);
    const devid = xvdVirtualDevice(0);
    const entries = 5000;
    const fData: VbdDomainData = { role: 'front', devid, entries };
    const front = await hv.createDomain({ script, workerData: fData, name: 'guest' });
    teardowns.push(await acceptGuestXenstore(hv, daemon, front.domid, front.worker));
    const bData: VbdDomainData = { role: 'back', devid, entries, frontDomid: front.domid };
    const back = await hv.createDomain({ script, workerData: bData, name: 'driver-domain' });
    teardowns.push(await acceptGuestXenstore(hv, daemon, back.domid, back.worker));
    const reports = [front, back].map(
      (d) => new Promise<VbdDomainReport>((resolve, reject) => {
        d.worker.on('message', (m: VbdDomainReport) => { if (m.role !== undefined) resolve(m); });
        d.worker.on('error', reject);
      }),
    );

    // The toolstack creates both directories, each owned by its domain and readable by the other.
    const fDir = frontendPath(front.domid, devid);
    const bDir = backendPath(back.domid, front.domid, devid);
    await xs.transaction(async (tx) => {
      await xs.mkdir(fDir, tx);
      await xs.setPerms(fDir, [{ domid: front.domid, perm: 'n' }, { domid: back.domid, perm: 'r' }], tx);
      await xs.mkdir(bDir, tx);
      await xs.setPerms(bDir, [{ domid: back.domid, perm: 'n' }, { domid: front.domid, perm: 'r' }], tx);
      await xs.write(`${fDir}/${XS_BACKEND}`, bDir, tx);
      await xs.write(`${fDir}/${XS_BACKEND_ID}`, String(back.domid), tx);
      await xs.write(`${bDir}/${XS_FRONTEND}`, fDir, tx);
      await xs.write(`${bDir}/${XS_FRONTEND_ID}`, String(front.domid), tx);
      await xs.write(`${fDir}/${XS_STATE}`, '1', tx);
      await xs.write(`${bDir}/${XS_STATE}`, '1', tx);
    });

    const [fr, br] = await Promise.all(reports);
    assert.deepEqual(fr!.errors, []);
    assert.deepEqual(br!.errors, []);
    assert.equal(fr!.exchanged, entries);
    assert.equal(br!.exchanged, entries);
    assert.deepEqual(fr!.states, ['backend InitWait', 'backend Connected', 'backend Closed']);
    assert.deepEqual(br!.states, ['frontend Initialised', 'frontend Closing']);
    assert.equal(br!.protocol, 'x86_64-abi');
    assert.equal(fr!.maxIndirect, '256');
    // Each reads its own final state: once a domain's thread ends, the nodes it owned go with it.
    assert.equal(fr!.finalState, String(XenbusStateClosed));
    assert.equal(br!.finalState, String(XenbusStateClosed));

    // A domain whose thread finished is already gone; destroy whichever still runs.
    for (const d of [front, back]) {
      if (hv.domain(d.domid) !== undefined) await hv.destroyDomain(d.domid);
      await d.exited;
    }
    // Destruction released everything: the xenstore page mappings and ports, the ring, and the
    // daemon's state for both domains (watches gone, nodes they owned removed).
    const c = hv.counters();
    assert.deepEqual([c.grantsActive, c.mapsActive, c.channelsBound, c.portsOpen], [0, 0, 0, 0]);
    for (const d of [front, back]) {
      assert.equal(daemon.isDomainIntroduced(d.domid), false);
      assert.equal(daemon.watchCount(d.domid), 0);
    }
    assert.equal(await xs.exists(fDir), false, 'the frontend directory, owned by the guest, went with it');
  } finally {
    for (const t of teardowns) t();
    xs.close();
    await hv.shutdown();
    await server.close();
    daemon.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a domain that ends before offering its xenstore page fails the toolstack wait instead of hanging', async () => {
  const hv = new Hypervisor();
  const daemon = new XenstoreDaemon();
  try {
    const d = await hv.createDomain({ script: new URL('./fixtures/quits.js', import.meta.url) });
    await assert.rejects(acceptGuestXenstore(hv, daemon, d.domid, d.worker), /exited .* before offering its xenstore page/);
  } finally {
    await hv.shutdown();
    daemon.close();
  }
});
