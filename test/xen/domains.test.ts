import { test, describe, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import type { Worker } from 'node:worker_threads';
import { Hypervisor, EVTCHNSTAT_unbound, GNTST_bad_domain, threadComm, type XenCounters } from '../../src/xen/index.js';
import { eventually } from '../support/common.js';
import type { GuestCmd, GuestReply } from './fixtures/guest.js';

const GUEST = new URL('./fixtures/guest.js', import.meta.url);

function next(w: Worker): Promise<GuestReply> {
  return new Promise((resolve, reject) => {
    const onErr = (e: unknown) => { w.off('message', onMsg); reject(e instanceof Error ? e : new Error(String(e))); };
    const onMsg = (m: GuestReply) => { w.off('error', onErr); resolve(m); };
    w.once('message', onMsg);
    w.once('error', onErr);
  });
}
const send = (w: Worker, c: GuestCmd) => w.postMessage(c);

function assertSettled(c: XenCounters): void {
  assert.equal(c.grantsActive, 0, 'grants');
  assert.equal(c.mapsActive, 0, 'mappings');
  assert.equal(c.portsOpen, 0, 'ports');
  assert.equal(c.channelsBound, 0, 'channels');
}

describe('worker-thread domains', () => {
  let hv: Hypervisor | undefined;
  afterEach(async () => {
    await hv?.shutdown();
    hv = undefined;
  });

  test('two guests share a page and ping-pong notifications, then tear down to zero', async () => {
    hv = new Hypervisor({ dom0MemoryPages: 4 });
    const destroyed: number[] = [];
    hv.onDomainDestroyed((d) => destroyed.push(d));
    const a = await hv.createDomain({ script: GUEST, memoryPages: 8, pollMicros: 0 });
    const b = await hv.createDomain({ script: GUEST, memoryPages: 8, pollMicros: 0 });
    const rounds = 50;
    // The newer domain serves the page, so the older one learns its memory through the
    // hypervisor's control port at map time (not from its bootstrap).
    send(b.worker, { op: 'serve-page', peer: a.domid, rounds });
    const offer = await next(b.worker);
    assert.equal(offer.op, 'offer');
    if (offer.op !== 'offer') return;
    const bDone = next(b.worker);
    const aDone = next(a.worker);
    send(a.worker, { op: 'use-page', peer: b.domid, ref: offer.ref, port: offer.port, rounds });
    const ra = await aDone;
    const rb = await bDone;
    assert.ok(ra.op === 'done' && rb.op === 'done');
    assert.deepEqual({ ...ra, counters: undefined }, { op: 'done', ok: true, detail: 'unmap=0', counters: undefined });
    assert.deepEqual({ ...rb, counters: undefined }, { op: 'done', ok: true, detail: 'endAccess=true', counters: undefined });
    // Each domain's counters as it read them before its script ended: once a script ends its
    // thread exits and is reaped, and hv.domainCounters() forgets the domain (a race the test lost
    // under load).
    const ca = ra.counters;
    const cb = rb.counters;
    assert.ok(ca !== undefined && cb !== undefined, 'both domains sent their counters');
    assert.ok(cb.notifySent >= rounds && ca.notifySent >= rounds + 1, 'notifications both ways');
    assert.ok(ca.notifyReceived > 0 && cb.notifyReceived > 0, 'events received both ways (fewer than sent: coalesced)');
    assert.equal(ca.mapOps, 1);
    assert.equal(ca.unmapOps, 1);
    assertSettled(ca);
    assertSettled(cb);
    // Both scripts finished: their threads exit on their own and are reaped.
    const [ea, eb] = await Promise.all([a.exited, b.exited]);
    assert.equal(ea.exitCode, 0);
    assert.equal(eb.exitCode, 0);
    assert.deepEqual(destroyed.sort(), [a.domid, b.domid].sort());
    assertSettled(hv.counters());
    assert.deepEqual(hv.domids, []);
  });

  for (const mode of ['destroyed', 'throws'] as const) {
    const what = mode === 'destroyed' ? 'is destroyed' : 'throws';
    test(`a guest holding a mapping and a bound channel that ${what} releases them`, async () => {
      hv = new Hypervisor({ dom0MemoryPages: 4, dom0PollMicros: 0 });
      const dom0 = hv.dom0;
      const g = await hv.createDomain({ script: GUEST, memoryPages: 4 });
      const seen: number[] = [];
      hv.onDomainDestroyed((d) => seen.push(d));
      const [frame] = dom0.memory.alloc(1);
      const ref = dom0.grants.grantAccess(g.domid, frame!, false);
      const port = dom0.events.allocUnbound(g.domid);
      send(g.worker, { op: 'map-bind', peer: 0, ref, port });
      const bound = await next(g.worker);
      assert.equal(bound?.op, 'bound');
      assert.equal(dom0.grants.isMapped(ref), true);
      assert.equal(dom0.grants.endAccess(ref), false, 'mapped by the guest');
      assert.equal(hv.counters().mapsActive, 1);
      assert.equal(hv.counters().channelsBound, 2);
      if (mode === 'destroyed') await hv.destroyDomain(g.domid);
      else send(g.worker, { op: 'crash' });
      const exit = await g.exited;
      if (mode === 'throws') {
        assert.match(String(exit.error), /crashed on purpose/);
        assert.equal(exit.destroyed, false);
      } else {
        assert.equal(exit.destroyed, true);
      }
      assert.deepEqual(seen, [g.domid]);
      // dom0 sees the port fall back to unbound, through an event.
      assert.deepEqual(await dom0.events.wait(), [port]);
      assert.equal(dom0.events.status(port).status, EVTCHNSTAT_unbound);
      assert.equal(dom0.grants.isMapped(ref), false, 'its mapping was dropped');
      assert.equal(dom0.grants.endAccess(ref), true);
      assert.equal(dom0.events.close(port), 0);
      dom0.memory.free([frame!]);
      assert.equal(dom0.grants.mapGrant(g.domid, 8, false).status, GNTST_bad_domain);
      assertSettled(hv.counters());
      assert.equal(hv.domainCounters(g.domid), undefined, 'slot released');
    });
  }

  test('grant end racing a peer that maps and unmaps in a loop: no map succeeds after the end', async (t) => {
    hv = new Hypervisor({ dom0MemoryPages: 4 });
    const g = await hv.createDomain({ script: GUEST, memoryPages: 4 });
    const dom0 = hv.dom0;
    const [frame] = dom0.memory.alloc(1);
    const page = dom0.memory.page(frame!);
    const ref = dom0.grants.grantAccess(g.domid, frame!, false);
    send(g.worker, { op: 'hammer', peer: 0, ref });
    assert.equal((await next(g.worker)).op, 'bound');
    const done = next(g.worker);
    while (page[0] !== 0xab) await new Promise((r) => setImmediate(r)); // the peer is mapping
    let busy = 0;
    while (!dom0.grants.endAccess(ref)) busy++; // spins against the peer's pins, both threads running
    page[0] = 0;
    const r = await done;
    assert.equal(r.op, 'hammered');
    if (r.op !== 'hammered') return;
    assert.ok(r.ok > 0);
    assert.deepEqual(r.statuses, [-1], 'only GNTST_general_error after the end');
    // Each refused map used an ended grant: the checked hypervisor reports them all.
    const kinds = new Set(hv.takeViolations().map((v) => v.kind));
    assert.deepEqual([...kinds].filter((k) => k !== 'violations-lost'), hv.checked && r.fail > 0 ? ['ended-grant-mapped'] : []);
    assert.equal(page[0], 0, 'no write through a mapping made after the grant ended');
    t.diagnostic(`endAccess refused ${busy} times while mapped; peer maps ok ${r.ok}, refused ${r.fail}`);
    dom0.memory.free([frame!]);
    await g.exited;
    assertSettled(hv.counters());
  });

  test('polling: a notify sent while the peer polls is seen without a sleep', async () => {
    hv = new Hypervisor({ dom0MemoryPages: 4 });
    const g = await hv.createDomain({ script: GUEST, memoryPages: 4, pollMicros: 5_000_000 });
    send(g.worker, { op: 'poll-wait', peer: 0, pollMicros: 5_000_000 });
    const r1 = await next(g.worker);
    assert.equal(r1.op, 'bound');
    if (r1.op !== 'bound') return;
    const p = hv.dom0.events.bindInterdomain(g.domid, r1.port);
    assert.ok(p > 0);
    await eventually(() => hv!.isPolling(g.domid), 'the guest polling (inside its 5 s budget)', 4_000, 0);
    const done = next(g.worker);
    assert.equal(hv.dom0.events.notify(p), 0);
    const r2 = await done;
    assert.equal(r2.op, 'polled');
    if (r2.op !== 'polled') return;
    assert.ok(r2.pollHits >= 1, `pollHits ${r2.pollHits}`);
    assert.equal(r2.sleeps, 0);
    await hv.dom0.events.wait({ pollMicros: 0 }); // bind-time event + the close
    hv.dom0.events.close(p);
    await g.exited;
    assertSettled(hv.counters());
  });

  test('an idle waiting domain sleeps instead of burning CPU', async () => {
    hv = new Hypervisor({ dom0MemoryPages: 4 });
    const g = await hv.createDomain({ script: GUEST, memoryPages: 4 });
    send(g.worker, { op: 'idle-wait', pollMicros: 50, idleMs: 200 });
    const r = await next(g.worker);
    assert.equal(r.op, 'idle');
    if (r.op !== 'idle') return;
    // It waited until told to stop, in one sleep (a spinning wait never sleeps). What the idle
    // wait costs in CPU is measured by the bench (bench/xen.ts), not asserted here.
    assert.equal(r.aborted, true, 'the wait ended by its abort, not early');
    assert.equal(r.sleeps, 1);
    await g.exited;
  });

  test('a domain\'s thread carries its name (for ps and /proc) and counts its scavenges', async () => {
    hv = new Hypervisor({ dom0MemoryPages: 4 });
    const g = await hv.createDomain({ script: GUEST, memoryPages: 4, name: 'a-long-domain-name' });
    const before = hv.domainCounters(g.domid)!.scavenges;
    send(g.worker, { op: 'allocate', mib: 64 });
    const r = await next(g.worker);
    assert.equal(r.op, 'allocated');
    if (r.op !== 'allocated') return;
    if (process.platform === 'linux') assert.equal(r.comm, threadComm('a-long-domain-name', 0));
    assert.equal(threadComm('a-long-domain-name', 0), 'a-long-domain-n');
    assert.equal(threadComm('a-long-domain-name', 3), 'a-long-domain/3');
    // A GC observer reports after the collection: give it the event loop's next turn.
    await eventually(() => hv!.domainCounters(g.domid)!.scavenges > before, 'a scavenge counted', 30_000);
  });
});

describe('domain slots', { timeout: 60_000 }, () => {
  test('a hypervisor holds as many domains as it was made for, and says so when full', async () => {
    for (const maxDomains of [4, 40]) {
      const hv = new Hypervisor({ maxDomains, dom0MemoryPages: 16 });
      try {
        // Slot 0 is dom0's.
        const doms = Array.from({ length: maxDomains - 1 }, () => hv.createLocalDomain({ memoryPages: 16 }));
        assert.throws(() => hv.createLocalDomain({ memoryPages: 16 }), new RegExp(`no free domain slot \\(${maxDomains} in this hypervisor\\)`));
        // The last slot works like the first: a grant across them counts per domain and in the sum.
        const [a, b] = [doms[0]!, doms.at(-1)!];
        const [f] = a.memory.alloc(1);
        const ref = a.grants.grantAccess(b.domid, f!, false);
        const m = b.grants.mapGrant(a.domid, ref, false);
        assert.equal(hv.counters().mapsActive, 1);
        assert.equal(hv.domainCounters(b.domid)!.mapsActive, 1);
        b.grants.unmapGrant(m.handle);
        assert.equal(a.grants.endAccess(ref), true);
        a.memory.free([f!]);
        for (const d of doms) await hv.destroyDomain(d.domid);
        hv.createLocalDomain({ memoryPages: 16 }); // a freed slot is claimed again
      } finally {
        await hv.shutdown();
      }
    }
    assert.throws(() => new Hypervisor({ maxDomains: 1 }), /maxDomains 1: 2\.\.1024/);
  });
});
