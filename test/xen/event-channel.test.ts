import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  Hypervisor, EINVAL, ESRCH, EVTCHNSTAT_closed, EVTCHNSTAT_interdomain, EVTCHNSTAT_unbound, NR_EVTCHN_PORTS,
  type XenDomain,
} from '../../src/xen/index.js';

describe('event channels', () => {
  let hv: Hypervisor;
  let a: XenDomain;
  let b: XenDomain;
  before(() => {
    hv = new Hypervisor({ dom0MemoryPages: 4 });
    a = hv.createLocalDomain({ memoryPages: 4, pollMicros: 0 });
    b = hv.createLocalDomain({ memoryPages: 4, pollMicros: 0 });
  });
  after(async () => {
    await hv.shutdown();
    assert.equal(hv.counters().portsOpen, 0);
    assert.equal(hv.counters().channelsBound, 0);
  });

  /** A bound pair; b's wait() sees the bind-time pending bit first (Xen sets it), drained here. */
  async function pair(): Promise<{ pa: number; pb: number }> {
    const pa = a.events.allocUnbound(b.domid);
    assert.ok(pa > 0);
    assert.deepEqual(a.events.status(pa), { status: EVTCHNSTAT_unbound, remoteDomid: b.domid, remotePort: 0 });
    const pb = b.events.bindInterdomain(a.domid, pa);
    assert.ok(pb > 0);
    assert.deepEqual(b.events.status(pb), { status: EVTCHNSTAT_interdomain, remoteDomid: a.domid, remotePort: pa });
    assert.deepEqual(a.events.status(pa), { status: EVTCHNSTAT_interdomain, remoteDomid: b.domid, remotePort: pb });
    assert.deepEqual(await b.events.wait(), [pb]);
    return { pa, pb };
  }

  test('bind rules: wrong domain, unknown domain, bad port, already bound', async () => {
    const pa = a.events.allocUnbound(hv.dom0.domid);
    assert.equal(b.events.bindInterdomain(a.domid, pa), -EINVAL, 'port is for dom0, not b');
    assert.equal(b.events.bindInterdomain(4242, pa), -ESRCH);
    assert.equal(b.events.bindInterdomain(a.domid, 0), -EINVAL);
    assert.equal(b.events.bindInterdomain(a.domid, NR_EVTCHN_PORTS), -EINVAL);
    // Xen 4.17 checks the remote domain at bind, not at alloc_unbound (docs/real-xen.md).
    const pz = a.events.allocUnbound(4242);
    assert.ok(pz > 0, 'a port for a domain that does not exist (yet)');
    assert.equal(b.events.bindInterdomain(a.domid, pz), -EINVAL, 'b is not domain 4242');
    assert.equal(a.events.close(pz), 0);
    const p0 = hv.dom0.events.bindInterdomain(a.domid, pa);
    assert.ok(p0 > 0);
    assert.equal(hv.dom0.events.bindInterdomain(a.domid, pa), -EINVAL, 'already bound');
    assert.equal(a.events.close(pa), 0);
    assert.equal(hv.dom0.events.status(p0).status, EVTCHNSTAT_unbound, 'peer port falls back to unbound');
    assert.equal(hv.dom0.events.close(p0), 0);
  });

  test('notify on a closed port fails; on an unbound port it is dropped (as Xen does)', async () => {
    assert.equal(a.events.notify(0), -EINVAL);
    assert.equal(a.events.notify(NR_EVTCHN_PORTS - 1), -EINVAL, 'never opened');
    const p = a.events.allocUnbound(b.domid);
    const dropped = a.counters.domain(a.domid)!.notifyDropped;
    assert.equal(a.events.notify(p), 0);
    assert.equal(a.counters.domain(a.domid)!.notifyDropped, dropped + 1);
    assert.equal(a.events.close(p), 0);
    assert.equal(a.events.notify(p), -EINVAL, 'closed');
    assert.equal(a.events.close(p), -EINVAL, 'double close');
    assert.equal(a.events.status(p).status, EVTCHNSTAT_closed);
    const { pa, pb } = await pair();
    assert.equal(b.events.close(pb), 0);
    assert.equal(b.events.notify(pb), -EINVAL);
    assert.equal(a.events.status(pa).status, EVTCHNSTAT_unbound);
    assert.deepEqual(await a.events.wait(), [pa], 'the peer learns of the close through an event');
    assert.equal(a.events.close(pa), 0);
  });

  test('coalescing: three notifies before the peer runs make one wake and one event', async () => {
    const { pa, pb } = await pair();
    const before = b.counters.domain(b.domid)!;
    assert.equal(a.events.notify(pa), 0);
    assert.equal(a.events.notify(pa), 0);
    assert.equal(a.events.notify(pa), 0);
    const after = b.counters.domain(b.domid)!;
    assert.equal(after.wakes - before.wakes, 1);
    assert.equal(after.notifyCoalesced - before.notifyCoalesced, 2);
    assert.deepEqual(await b.events.wait(), [pb]);
    assert.equal(b.events.isPending(pb), false);
    assert.deepEqual(a.events.portCounters(pa), { sent: 3, received: 0 });
    assert.equal(b.events.portCounters(pb).received, 2, 'bind-time event + one coalesced event');
    assert.equal(b.counters.domain(b.domid)!.notifyReceived - before.notifyReceived, 1);
    a.events.close(pa);
    b.events.close(pb);
  });

  test('mask holds a notify pending until unmask', async () => {
    const { pa, pb } = await pair();
    assert.equal(b.events.mask(pb), 0);
    const wakes = b.counters.domain(b.domid)!.wakes;
    assert.equal(a.events.notify(pa), 0);
    assert.equal(b.events.isPending(pb), true);
    assert.equal(b.counters.domain(b.domid)!.wakes, wakes, 'masked: no wake');
    const ac = new AbortController();
    const w = b.events.wait({ signal: ac.signal });
    // A pause in which a masked event that wrongly ended the wait would have done so (no event
    // marks its not happening); a busy machine can only hide a fault here, not fail the test.
    await new Promise((r) => setTimeout(r, 20));
    let settled = false;
    void w.then(() => { settled = true; });
    await new Promise((r) => setImmediate(r));
    assert.equal(settled, false, 'masked event does not end the wait');
    assert.equal(b.events.unmask(pb), 0);
    assert.deepEqual(await w, [pb]);
    assert.equal(b.counters.domain(b.domid)!.wakes, wakes + 1);
    a.events.close(pa);
    b.events.close(pb);
  });

  test('a sleeping wait is woken by a notify; abort ends a wait', async () => {
    const { pa, pb } = await pair();
    const sleeps = b.counters.domain(b.domid)!.sleeps;
    const w = b.events.wait();
    setTimeout(() => a.events.notify(pa), 10);
    assert.deepEqual(await w, [pb]);
    assert.equal(b.counters.domain(b.domid)!.sleeps, sleeps + 1);
    const ac = new AbortController();
    const w2 = b.events.wait({ signal: ac.signal });
    setTimeout(() => ac.abort(), 10);
    assert.deepEqual(await w2, []);
    a.events.close(pa);
    b.events.close(pb);
  });

  test('per-port handlers', async () => {
    const { pa, pb } = await pair();
    const seen: number[] = [];
    let wake: (() => void) | undefined;
    const off = b.events.on(pb, (p) => { seen.push(p); wake?.(); });
    const seenCount = (n: number) => new Promise<void>((r) => {
      wake = () => { if (seen.length >= n) r(); };
      wake();
    });
    a.events.notify(pa);
    await seenCount(1); // a second notify before this would coalesce with the first
    a.events.notify(pa);
    await seenCount(2);
    off();
    assert.deepEqual(seen, [pb, pb]);
    a.events.close(pa);
    b.events.close(pb);
  });

  test('counters return to zero', () => {
    assert.equal(hv.domainCounters(a.domid)!.portsOpen, 0);
    assert.equal(hv.domainCounters(b.domid)!.portsOpen, 0);
    assert.equal(hv.counters().channelsBound, 0);
  });
});

describe('adaptive polling (KVM halt-polling)', () => {
  let hv: Hypervisor;
  let a: XenDomain;
  let b: XenDomain;
  // A budget of 1 s, so that a timer lands well inside it (100 ms) or a sleep past it (2.5 s) even on a
  // busy machine, where a wait's first turn of the event loop alone took over 5 ms.
  const BUDGET_US = 1_000_000;
  before(() => {
    hv = new Hypervisor({ dom0MemoryPages: 4 });
    a = hv.createLocalDomain({ memoryPages: 4, pollMicros: 0 });
    b = hv.createLocalDomain({ memoryPages: 4, pollMicros: BUDGET_US });
  });
  after(() => hv.shutdown());

  test('polls while events come soon; after a sleep longer than the budget it sleeps at once; a wait\'s own budget is not adapted', async () => {
    const pa = a.events.allocUnbound(b.domid);
    const pb = b.events.bindInterdomain(a.domid, pa);
    assert.deepEqual(await b.events.wait({ pollMicros: 0 }), [pb]); // the bind-time pending bit
    /** One wait of b with a's notify `afterMs` later: whether polling caught it, or b slept. */
    const once = async (afterMs: number, opts: { pollMicros?: number } = {}) => {
      const before = hv.counters();
      const t = setTimeout(() => a.events.notify(pa), afterMs);
      try {
        assert.deepEqual(await b.events.wait(opts), [pb]);
      } finally {
        clearTimeout(t);
      }
      // Whether b slept is the contract; a poll hit is not counted when the event was already
      // there as the wait began (a slow turn of the event loop), so it is not asserted.
      return hv.counters().sleeps - before.sleeps;
    };
    assert.equal(await once(100), 0, 'the window starts at the budget: an event 100 ms on is caught polling, no sleep');
    assert.equal(await once(2500), 1, '2.5 s: the budget spent, then a sleep of ~1.5 s, longer than the budget');
    assert.equal(await once(100), 1, 'after a sleep past the budget the window is 0: it sleeps at once');
    assert.equal(await once(100, { pollMicros: BUDGET_US }), 0, 'a wait\'s own budget polls whatever the window');
    a.events.close(pa);
    b.events.close(pb);
  });
});
