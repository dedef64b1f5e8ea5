import { test, describe, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { MessageChannel, type MessagePort } from 'node:worker_threads';
import {
  Hypervisor, EINVAL, ENOENT, ENOSPC, GNTST_bad_handle, GNTST_okay, MAX_VCPUS, NR_MAPTRACK,
  type DomainHandle, type VcpuExit, type VcpuHandle, type XenCounters, type XenDomain,
} from '../../src/xen/index.js';
import { SharedTables, V_SLEEPING, V_UPCALL, vcpuWord } from '../../src/xen/shared-tables.js';
import { eventually } from '../support/common.js';
import { hammer, unmapRace, VcpuClient, type HammerResult } from './fixtures/vcpu-rpc.js';

const VCPU = new URL('./fixtures/vcpu.js', import.meta.url);
const DOMAIN = new URL('./fixtures/vcpu-domain.js', import.meta.url);
const TEARDOWN = new URL('./fixtures/vcpu-teardown.js', import.meta.url);
/** Upper bound for an event that must come; only reached when the test is failing. */
const MUST_COME_MS = 30_000;


/** The hypervisor's shared tables (private), to observe a vCPU's upcall word. */
const tables = (hv: Hypervisor) => (hv as unknown as { t: SharedTables }).t;
function upcallWord(hv: Hypervisor, domid: number, vcpu: number): number {
  const t = tables(hv);
  return vcpuWord(t.slotOf(domid), vcpu, V_UPCALL);
}
const upcall = (hv: Hypervisor, domid: number, vcpu: number) => Atomics.load(tables(hv).dom, upcallWord(hv, domid, vcpu));
/** Resolves once vCPU `vcpu` of `domid` sleeps in its wait (so that a send must wake it). */
const asleep = (hv: Hypervisor, domid: number, vcpu: number) => eventually(
  () => Atomics.load(tables(hv).dom, vcpuWord(tables(hv).slotOf(domid), vcpu, V_SLEEPING)) !== 0, `vCPU ${vcpu} of domain ${domid} asleep`, MUST_COME_MS, 1);
const clearUpcall = (hv: Hypervisor, domid: number, vcpu: number) => { Atomics.store(tables(hv).dom, upcallWord(hv, domid, vcpu), 0); };

function assertSettled(c: XenCounters): void {
  assert.equal(c.grantsActive, 0, 'grants');
  assert.equal(c.mapsActive, 0, 'mappings');
  assert.equal(c.portsOpen, 0, 'ports');
  assert.equal(c.channelsBound, 0, 'channels');
}

interface Vcpu extends VcpuHandle { readonly c: VcpuClient }

/** The vCPU limit the limit tests give their domains (MAX_VCPUS threads would be too many here). */
const MAX = 8;

/** A fresh hypervisor; a local domain L with one vCPU thread; 64 writable dom0 grants to L over 8 frames. */
async function grantedToVcpu(): Promise<{ hv: Hypervisor; dom0: XenDomain; L: XenDomain; v: Vcpu; frames: number[]; refs: number[] }> {
  const hv = new Hypervisor({ dom0MemoryPages: 16, dom0PollMicros: 0 });
  const dom0 = hv.dom0;
  const L = hv.createLocalDomain({ memoryPages: 16 });
  const v = await startLocalVcpu(L);
  const frames = dom0.memory.alloc(8);
  const refs = Array.from({ length: 64 }, (_, i) => dom0.grants.grantAccess(L.domid, frames[i % 8]!, false));
  return { hv, dom0, L, v, frames, refs };
}

/** Every grant unpinned (pins counted right) and ended, the frames freed, nothing left anywhere. */
function endGrants(hv: Hypervisor, dom0: XenDomain, refs: readonly number[], frames: readonly number[]): void {
  for (const r of refs) {
    assert.equal(dom0.grants.isMapped(r), false, `ref ${r} still pinned`);
    assert.equal(dom0.grants.endAccess(r), true);
  }
  dom0.memory.free(frames);
  assertSettled(hv.counters());
}

/** Starts a vCPU (fixtures/vcpu.ts) of a local domain, with a command port to it. */
async function startLocalVcpu(dom: XenDomain, frames?: readonly number[]): Promise<Vcpu> {
  const { port1, port2 } = new MessageChannel();
  const h = await dom.startVcpu({ script: VCPU, workerData: { port: port2 }, transferList: [port2], ...(frames ? { frames } : {}) });
  return { ...h, c: new VcpuClient(port1) };
}

/** A worker domain (fixtures/vcpu-domain.ts) with a command port to its vCPU 0. */
async function startGuest(hv: Hypervisor, maxVcpus?: number): Promise<{ g: DomainHandle; c: VcpuClient }> {
  const g = await hv.createDomain({ script: DOMAIN, memoryPages: 16, pollMicros: 0, ...(maxVcpus === undefined ? {} : { maxVcpus }) });
  const [msg] = await once(g.worker, 'message') as [{ port: MessagePort }];
  return { g, c: new VcpuClient(msg.port) };
}

/** Starts a vCPU from inside a worker domain; the test gets a command port to it. */
async function startGuestVcpu(c: VcpuClient, frames?: readonly number[]): Promise<{ vcpu: number; c: VcpuClient }> {
  const r = await c.call<{ vcpu: number; port: MessagePort }>({ op: 'startVcpu', ...(frames ? { frames } : {}) });
  return { vcpu: r.vcpu, c: new VcpuClient(r.port) };
}

interface WaitResult { got: boolean; seen: number[] }

describe('vCPUs', () => {
  let hv: Hypervisor | undefined;
  const clients: VcpuClient[] = [];
  afterEach(async () => {
    await hv?.shutdown();
    hv = undefined;
    for (const c of clients.splice(0)) c.close();
  });

  /**
   * A local domain L with vCPU 1 up; vCPU 1 bound a channel with dom0 (dom0's port p0, L's lp)
   * and consumed the bind-time event.
   */
  async function vcpuChannel(): Promise<{ hv: Hypervisor; L: XenDomain; v: Vcpu; p0: number; lp: number }> {
    const h = new Hypervisor({ dom0MemoryPages: 16, dom0PollMicros: 0 });
    hv = h;
    const L = h.createLocalDomain({ memoryPages: 16, pollMicros: 0 });
    const v = await startLocalVcpu(L);
    clients.push(v.c);
    assert.equal(v.vcpu, 1);
    assert.deepEqual(h.vcpusOf(L.domid), [1]);
    assert.deepEqual(await v.c.call({ op: 'info' }), { domid: L.domid, vcpu: 1, totalPages: 0, freePages: 0 });
    const p0 = h.dom0.events.allocUnbound(L.domid);
    assert.ok(p0 > 0);
    const lp = await v.c.call<number>({ op: 'bindInterdomain', remote: 0, port: p0 });
    assert.ok(lp > 0, `bind from vCPU 1: ${lp}`);
    // event_channel.h: a new port notifies vCPU 0, so the bind-time event raised vCPU 0.
    assert.equal(L.events.vcpuOf(lp), 0, 'a new port notifies vCPU 0');
    assert.equal(upcall(h, L.domid, 0), 1, 'the bind-time event raised vCPU 0');
    clearUpcall(h, L.domid, 0);
    // vCPU 1 binds it to itself (EVTCHNOP_bind_vcpu, as Linux sets an IRQ's affinity): the
    // pending event follows, and vCPU 0 neither sees it nor gets an upcall any more.
    assert.equal(await v.c.call({ op: 'bindVcpu', port: lp, vcpu: 1 }), 0);
    assert.equal(L.events.vcpuOf(lp), 1);
    assert.equal(await v.c.call({ op: 'vcpuOf', port: lp }), 1);
    assert.equal(upcall(h, L.domid, 1), 1, 'the pending event raised vCPU 1');
    assert.equal(L.events.isPending(lp), true);
    assert.deepEqual(L.events.takePending(), []);
    assert.equal(L.events.isPending(lp), true, "vCPU 0's scan leaves vCPU 1's port pending");
    assert.equal(upcall(h, L.domid, 0), 0, "vCPU 0's upcall untouched since the move");
    const w = await v.c.call<WaitResult>({ op: 'waitFor', port: lp, timeoutMs: MUST_COME_MS });
    assert.deepEqual(w, { got: true, seen: [lp] });
    return { hv: h, L, v, p0, lp };
  }

  test('1. a port bound to a vCPU wakes that vCPU only; a port of vCPU 0 wakes vCPU 0 only', async () => {
    const { hv: h, L, v, p0, lp } = await vcpuChannel();
    const dom0 = h.dom0;
    const before = h.domainCounters(L.domid)!;
    // vCPU 1 sleeps in wait (pollMicros 0); dom0's send must wake it.
    const waiting = v.c.call<WaitResult>({ op: 'waitFor', port: lp, timeoutMs: MUST_COME_MS });
    await asleep(h, L.domid, 1);
    assert.equal(dom0.events.notify(p0), 0);
    assert.deepEqual(await waiting, { got: true, seen: [lp] }, 'vCPU 1 woken by the peer');
    assert.equal(upcall(h, L.domid, 0), 0, "vCPU 0's upcall not raised");
    assert.deepEqual(L.events.takePending(), [], 'vCPU 0 sees nothing');
    const after = h.domainCounters(L.domid)!;
    assert.equal(after.notifyReceived - before.notifyReceived, 1, 'one event, taken by vCPU 1');
    assert.equal(after.wakes - before.wakes, 1, 'one upcall raised in the domain (vCPU 1)');
    // Many sends while vCPU 1 is not waiting: pending on vCPU 1, still nothing for vCPU 0.
    for (let i = 0; i < 100; i++) assert.equal(dom0.events.notify(p0), 0);
    assert.equal(upcall(h, L.domid, 1), 1);
    assert.equal(upcall(h, L.domid, 0), 0);
    assert.deepEqual(L.events.takePending(), []);
    assert.deepEqual(await v.c.call({ op: 'takePending' }), [lp]);

    // Vice versa: a port of vCPU 0 (the default) notifies vCPU 0, not vCPU 1.
    const q = L.events.allocUnbound(0);
    assert.ok(q > 0);
    assert.equal(L.events.vcpuOf(q), 0);
    const dq = dom0.events.bindInterdomain(L.domid, q);
    assert.ok(dq > 0);
    clearUpcall(h, L.domid, 1);
    const w0 = L.events.wait({ pollMicros: 0, signal: AbortSignal.timeout(MUST_COME_MS) });
    await asleep(h, L.domid, 0);
    assert.equal(dom0.events.notify(dq), 0);
    assert.deepEqual(await w0, [q], 'vCPU 0 woken');
    assert.equal(upcall(h, L.domid, 1), 0, "vCPU 1's upcall not raised");
    assert.deepEqual(await v.c.call({ op: 'takePending' }), [], 'vCPU 1 sees nothing');
    assert.equal(dom0.events.notify(dq), 0);
    assert.equal(upcall(h, L.domid, 1), 0);
    assert.equal(upcall(h, L.domid, 0), 1);
    assert.deepEqual(await v.c.call({ op: 'takePending' }), []);
    assert.deepEqual(L.events.takePending(), [q]);

    // vCPU 1 sends to dom0 on its port; dom0 gets it.
    assert.equal(await v.c.call({ op: 'notify', port: lp }), 0);
    assert.ok(dom0.events.takePending().includes(p0));

    assert.equal(await v.c.call({ op: 'close', port: lp }), 0);
    assert.equal(L.events.close(q), 0);
    assert.equal(dom0.events.close(p0), 0);
    assert.equal(dom0.events.close(dq), 0);
    assertSettled(h.counters());
  });

  test('2. bindVcpu moves delivery, hands over a pending event, and checks vCPU and port', async () => {
    const { hv: h, L, v, p0, lp } = await vcpuChannel();
    const dom0 = h.dom0;
    // Move vCPU 1's port to vCPU 0.
    assert.equal(L.events.bindVcpu(lp, 0), 0);
    assert.equal(L.events.vcpuOf(lp), 0);
    assert.equal(await v.c.call({ op: 'vcpuOf', port: lp }), 0, 'both threads see the move');
    clearUpcall(h, L.domid, 0);
    clearUpcall(h, L.domid, 1);
    assert.equal(dom0.events.notify(p0), 0);
    assert.equal(upcall(h, L.domid, 0), 1, 'vCPU 0 notified');
    assert.equal(upcall(h, L.domid, 1), 0, 'vCPU 1 not notified');
    assert.deepEqual(await v.c.call({ op: 'takePending' }), []);
    assert.deepEqual(L.events.takePending(), [lp]);

    // An event pending on vCPU 0 when the port moves back is delivered on vCPU 1, waking it.
    assert.equal(dom0.events.notify(p0), 0);
    assert.equal(L.events.isPending(lp), true);
    const waiting = v.c.call<WaitResult>({ op: 'waitFor', port: lp, timeoutMs: MUST_COME_MS });
    await asleep(h, L.domid, 1);
    assert.equal(L.events.bindVcpu(lp, 1), 0);
    assert.deepEqual(await waiting, { got: true, seen: [lp] }, 'the pending event followed the port');
    assert.deepEqual(L.events.takePending(), []);
    assert.equal(L.events.isPending(lp), false);

    // vCPU 1 can move a port of vCPU 0 to itself; a masked pending event stays held until unmask.
    const q = L.events.allocUnbound(0);
    const dq = dom0.events.bindInterdomain(L.domid, q);
    assert.ok(q > 0 && dq > 0);
    assert.deepEqual(L.events.takePending(), [], 'no bind-time event on the unbound side');
    assert.equal(L.events.mask(q), 0);
    assert.equal(dom0.events.notify(dq), 0);
    clearUpcall(h, L.domid, 1);
    assert.equal(await v.c.call({ op: 'bindVcpu', port: q, vcpu: 1 }), 0);
    assert.equal(upcall(h, L.domid, 1), 0, 'masked: no upcall on the move');
    assert.deepEqual(await v.c.call({ op: 'takePending' }), []);
    assert.equal(L.events.unmask(q), 0);
    assert.equal(upcall(h, L.domid, 1), 1, 'unmask raises the new vCPU');
    assert.deepEqual(L.events.takePending(), []);
    assert.deepEqual(await v.c.call({ op: 'takePending' }), [q]);

    // Errors: a vCPU that is not up, out of range; a closed or invalid port.
    assert.equal(L.events.bindVcpu(lp, 2), -ENOENT);
    assert.equal(L.events.bindVcpu(lp, MAX_VCPUS - 1), -ENOENT);
    assert.equal(L.events.bindVcpu(lp, MAX_VCPUS), -ENOENT);
    assert.equal(L.events.bindVcpu(lp, -1), -ENOENT);
    assert.equal(L.events.bindVcpu(lp, 1.5), -ENOENT);
    assert.equal(await v.c.call({ op: 'bindVcpu', port: lp, vcpu: 3 }), -ENOENT);
    assert.equal(L.events.vcpuOf(lp), 1, 'a failed bindVcpu leaves the port where it was');
    const c = L.events.allocUnbound(0);
    assert.equal(L.events.close(c), 0);
    assert.equal(L.events.bindVcpu(c, 1), -EINVAL, 'closed port');
    assert.equal(await v.c.call({ op: 'bindVcpu', port: c, vcpu: 0 }), -EINVAL);
    assert.equal(L.events.bindVcpu(0, 1), -EINVAL);
    assert.equal(L.events.bindVcpu(L.events.nrPorts, 1), -EINVAL);

    for (const [d, p] of [[L, q], [dom0, dq], [dom0, p0]] as const) assert.equal(d.events.close(p), 0);
    assert.equal(await v.c.call({ op: 'close', port: lp }), 0);
    assertSettled(h.counters());
  });

  test('3a. a vCPU thread maps a grant of another domain: reads and writes reach the granter', async () => {
    hv = new Hypervisor({ dom0MemoryPages: 16, dom0PollMicros: 0 });
    const dom0 = hv.dom0;
    const L = hv.createLocalDomain({ memoryPages: 16 });
    const v = await startLocalVcpu(L);
    clients.push(v.c);
    const [frame] = dom0.memory.alloc(1);
    const page = dom0.memory.page(frame!);
    page.set([1, 2, 3, 4]);
    const ref = dom0.grants.grantAccess(L.domid, frame!, false);
    assert.ok(ref >= 0);
    const m = await v.c.call<{ status: number; handle: number; read: number[] }>({ op: 'mapRW', dom: 0, ref, write: [9, 8, 7, 6] });
    assert.equal(m.status, GNTST_okay);
    assert.deepEqual(m.read, [1, 2, 3, 4], 'the vCPU reads what dom0 wrote');
    assert.deepEqual([...page.subarray(4, 8)], [9, 8, 7, 6], 'dom0 sees what the vCPU wrote');
    assert.equal(dom0.grants.isMapped(ref), true);
    assert.equal(dom0.grants.endAccess(ref), false, 'mapped by the vCPU');
    assert.equal(hv.counters().mapsActive, 1);
    assert.equal(await v.c.call({ op: 'unmap', handle: m.handle }), GNTST_okay);
    assert.equal(await v.c.call({ op: 'unmap', handle: m.handle }), GNTST_bad_handle, 'no second unmap');
    assert.equal(L.grants.unmapGrant(m.handle), GNTST_bad_handle, 'nor from vCPU 0');
    assert.equal(dom0.grants.isMapped(ref), false);
    assert.equal(hv.counters().mapsActive, 0);

    // The maptrack is the domain's: vCPU 0 can unmap what vCPU 1 mapped.
    const m2 = await v.c.call<{ status: number; handle: number }>({ op: 'mapRW', dom: 0, ref, write: [5] });
    assert.equal(m2.status, GNTST_okay);
    assert.equal(L.grants.unmapGrant(m2.handle), GNTST_okay);
    assert.equal(await v.c.call({ op: 'unmap', handle: m2.handle }), GNTST_bad_handle);
    assert.equal(dom0.grants.endAccess(ref), true);
    dom0.memory.free([frame!]);
    assertSettled(hv.counters());
  });

  test('3b. vCPU 0 and a vCPU thread map and unmap thousands of times at once: no handle twice', async (t) => {
    const g = await grantedToVcpu();
    hv = g.hv;
    clients.push(g.v.c);
    const { dom0, L, v, frames, refs } = g;
    assert.ok(refs.every((r) => r >= 0));
    const base = hv.counters();
    // 1500 held per round: beyond a thread's kept handles (1024), so both threads keep claiming
    // from the domain's shared maptrack while the other releases into it.
    const rounds = 20;
    const batch = 1500;
    const owners = new SharedArrayBuffer(NR_MAPTRACK * 4);
    const barrier = new SharedArrayBuffer(8);
    const args = { dom: 0, refs, rounds, batch, owners, barrier };
    const remote = v.c.call<HammerResult>({ op: 'hammer', args: { ...args, id: 2 } });
    const local = hammer(L, { ...args, id: 1 }, true);
    const r1 = await remote;
    t.diagnostic(`vCPU 0: ${JSON.stringify(local)}; vCPU 1: ${JSON.stringify(r1)}`);
    for (const r of [local, r1]) {
      assert.equal(r.duplicates, 0, 'a handle was handed out twice');
      assert.deepEqual(r.statuses, [], 'no GNTST error');
      assert.equal(r.badHandles, 0);
      assert.equal(r.maps, rounds * batch);
      assert.equal(r.unmaps, rounds * batch);
    }
    assert.equal(hv.counters().mapsActive, base.mapsActive, 'mapsActive back to baseline');
    assert.equal(hv.counters().mapOps - base.mapOps, 2 * rounds * batch);
    assert.ok(new Int32Array(owners).every((o) => o === 0));
    endGrants(hv, dom0, refs, frames);
  });

  test('3c. two threads unmapping the same handles at once: each handle is unmapped exactly once', async () => {
    const g = await grantedToVcpu();
    hv = g.hv;
    clients.push(g.v.c);
    const { dom0, L, v, frames, refs } = g;
    const n = 5000;
    const handles = new Int32Array(new SharedArrayBuffer(n * 4));
    for (let i = 0; i < n; i++) {
      const m = L.grants.mapGrant(0, refs[i % refs.length]!, false);
      assert.equal(m.status, GNTST_okay);
      handles[i] = m.handle;
    }
    assert.equal(new Set(handles).size, n);
    assert.equal(hv.counters().mapsActive, n);
    const args = { handles: handles.buffer as SharedArrayBuffer, barrier: new SharedArrayBuffer(8) };
    const remote = v.c.call<{ won: number; lost: number; other: number[] }>({ op: 'unmapRace', args });
    const local = unmapRace(L, args, true);
    const r1 = await remote;
    assert.deepEqual(local.other, []);
    assert.deepEqual(r1.other, []);
    assert.equal(local.won + r1.won, n, 'every handle unmapped once');
    assert.equal(local.lost + r1.lost, n, 'and refused once');
    assert.equal(hv.counters().mapsActive, 0);
    endGrants(hv, dom0, refs, frames);
  });

  test('3d. the maptrack handles a stopped vCPU kept for itself go back to the domain', async () => {
    hv = new Hypervisor({ dom0MemoryPages: 16, dom0PollMicros: 0 });
    const dom0 = hv.dom0;
    const L = hv.createLocalDomain({ memoryPages: 16 });
    const frames = dom0.memory.alloc(8);
    // vCPU 0 maps read-only below (255 pins per entry): 160 refs cover the whole maptrack.
    const refs = Array.from({ length: 160 }, (_, i) => dom0.grants.grantAccess(L.domid, frames[i % 8]!, false));
    assert.ok(refs.every((r) => r >= 0));
    const v = await startLocalVcpu(L);
    clients.push(v.c);
    // The vCPU holds 1100 mappings at once, then unmaps them: it keeps handles for its next maps.
    const open = new Int32Array(new SharedArrayBuffer(8));
    open[1] = 1; // nobody to wait for
    const r = await v.c.call<HammerResult>({ op: 'hammer', args: {
      dom: 0, refs, rounds: 1, batch: 1100, owners: new SharedArrayBuffer(NR_MAPTRACK * 4), barrier: open.buffer as SharedArrayBuffer, id: 1,
    } });
    assert.equal(r.maps, 1100);
    assert.equal(r.unmaps, 1100);
    assert.equal(hv.counters().mapsActive, 0);
    assert.equal((await L.stopVcpu(1)).stopped, true);
    // vCPU 0 can now map as many grants as the maptrack has handles.
    const handles: number[] = [];
    for (;;) {
      const m = L.grants.mapGrant(0, refs[handles.length % refs.length]!, true);
      if (m.status !== GNTST_okay) break;
      handles.push(m.handle);
    }
    const n = handles.length;
    for (const h of handles) assert.equal(L.grants.unmapGrant(h), GNTST_okay);
    assert.equal(n, NR_MAPTRACK, `vCPU 0 got ${n} of ${NR_MAPTRACK} handles after the vCPU stopped`);
    for (const ref of refs) assert.equal(dom0.grants.endAccess(ref), true);
    dom0.memory.free(frames);
    assertSettled(hv.counters());
  });

  test('4. a vCPU allocates only from its lent frames and cannot grant', async () => {
    hv = new Hypervisor({ dom0MemoryPages: 4 });
    const L = hv.createLocalDomain({ memoryPages: 16 });
    const lent = L.memory.alloc(3);
    const kept = L.memory.alloc(1);
    const freeBefore = L.memory.freePages;
    const v = await startLocalVcpu(L, [...lent, 999, -1]); // out-of-range frames are ignored
    clients.push(v.c);
    assert.deepEqual(await v.c.call({ op: 'info' }), { domid: L.domid, vcpu: 1, totalPages: 3, freePages: 3 });
    const a = await v.c.call<number[]>({ op: 'alloc', count: 2 });
    const b = await v.c.call<number[]>({ op: 'alloc', count: 1 });
    const got = [...a, ...b];
    assert.deepEqual([...got].sort((x, y) => x - y), [...lent].sort((x, y) => x - y), 'the lent frames, each once');
    await assert.rejects(v.c.call({ op: 'alloc', count: 1 }), /out of memory: 1 pages wanted, 0 free/);
    assert.equal(L.memory.freePages, freeBefore, "the vCPU's allocations are not vCPU 0's");
    // Same memory as vCPU 0's view of the frames.
    await v.c.call({ op: 'fill', frame: got[0]!, byte: 0x5a });
    assert.ok(L.memory.page(got[0]!).every((x) => x === 0x5a));
    // Granting stays with vCPU 0.
    assert.equal(await v.c.call({ op: 'grantAccess', dom: 0, frame: got[0]! }), -ENOSPC);
    assert.equal(await v.c.call({ op: 'grantAccess', dom: 0, frame: kept[0]! }), -EINVAL, 'not a frame of this vCPU');
    assert.equal(hv.counters().grantsActive, 0);
    // Freed frames come back to the vCPU only.
    assert.equal(await v.c.call({ op: 'free', frames: [got[1]!] }), 1);
    assert.deepEqual(await v.c.call({ op: 'alloc', count: 1 }), [got[1]!]);
    await assert.rejects(v.c.call({ op: 'free', frames: [kept[0]!] }), /not allocated/);
    // A vCPU lent nothing has nothing.
    const w = await startLocalVcpu(L);
    clients.push(w.c);
    assert.equal(w.vcpu, 2);
    assert.deepEqual(await w.c.call({ op: 'info' }), { domid: L.domid, vcpu: 2, totalPages: 0, freePages: 0 });
    await assert.rejects(w.c.call({ op: 'alloc', count: 1 }), /out of memory/);
    // vCPU 0 still grants (its own frames).
    const ref = L.grants.grantAccess(0, kept[0]!, false);
    assert.ok(ref >= 0);
    assert.equal(L.grants.endAccess(ref), true);
    await L.stopVcpu(1);
    await L.stopVcpu(2);
    L.memory.free([...lent, ...kept]);
    assertSettled(hv.counters());
  });

  test('5a. stopVcpu: the thread ends, its ports notify vCPU 0, a pending event is delivered there', async () => {
    const { hv: h, L, v, p0, lp } = await vcpuChannel();
    const dom0 = h.dom0;
    // An event pending on vCPU 1 that it never takes.
    assert.equal(dom0.events.notify(p0), 0);
    assert.equal(upcall(h, L.domid, 1), 1);
    assert.deepEqual(L.events.takePending(), []);
    const w0 = L.events.wait({ pollMicros: 0, signal: AbortSignal.timeout(MUST_COME_MS) });
    await asleep(h, L.domid, 0);
    const exit = await L.stopVcpu(1);
    assert.equal(exit.vcpu, 1);
    assert.equal(exit.stopped, true);
    assert.equal(exit.error, undefined);
    assert.deepEqual(await v.exited, exit);
    assert.deepEqual(await w0, [lp], 'vCPU 0 woken for the pending event of the stopped vCPU');
    assert.deepEqual(h.vcpusOf(L.domid), []);
    assert.equal(L.events.vcpuOf(lp), 0);
    assert.equal(L.events.bindVcpu(lp, 1), -ENOENT, 'vCPU 1 is down');
    await assert.rejects(v.c.call({ op: 'info' }), /thread gone/);
    await assert.rejects(L.stopVcpu(1), /no vCPU 1/);
    // Later sends reach vCPU 0.
    assert.equal(dom0.events.notify(p0), 0);
    assert.deepEqual(await L.events.wait({ pollMicros: 0, signal: AbortSignal.timeout(MUST_COME_MS) }), [lp]);
    assert.equal(L.events.close(lp), 0);
    assert.equal(dom0.events.close(p0), 0);
    assertSettled(h.counters());
  });

  test('5b. a vCPU thread that throws: exited carries the error, the domain lives on', async () => {
    hv = new Hypervisor({ dom0MemoryPages: 4 });
    const L = hv.createLocalDomain({ memoryPages: 16 });
    const v = await startLocalVcpu(L);
    clients.push(v.c);
    const q = await v.c.call<number>({ op: 'allocUnbound', remote: 0 });
    assert.ok(q > 0);
    assert.equal(await v.c.call({ op: 'bindVcpu', port: q, vcpu: 1 }), 0);
    assert.equal(L.events.vcpuOf(q), 1);
    await v.c.call({ op: 'throw', message: 'vcpu crashed on purpose' });
    const exit = await v.exited;
    assert.equal(exit.vcpu, 1);
    assert.equal(exit.stopped, false);
    assert.match(exit.error ?? '', /vcpu crashed on purpose/);
    assert.notEqual(exit.exitCode, 0);
    assert.deepEqual(hv.domids, [L.domid], 'the domain is still there');
    assert.deepEqual(hv.vcpusOf(L.domid), []);
    assert.equal(L.events.vcpuOf(q), 0, "the dead vCPU's port moved to vCPU 0");
    assert.equal(L.events.close(q), 0);
    const p = L.events.allocUnbound(0);
    assert.ok(p > 0);
    assert.equal(L.events.close(p), 0);
    // vCPU 1 is free again.
    const w = await startLocalVcpu(L);
    clients.push(w.c);
    assert.equal(w.vcpu, 1);
    assert.equal((await w.c.call<{ vcpu: number }>({ op: 'info' })).vcpu, 1);
    assertSettled(hv.counters());
  });

  test('5c. worker domain: a vCPU that throws, then one that is stopped; the domain thread lives on', async () => {
    hv = new Hypervisor({ dom0MemoryPages: 4 });
    const { g, c } = await startGuest(hv);
    clients.push(c);
    const v1 = await startGuestVcpu(c);
    clients.push(v1.c);
    assert.equal(v1.vcpu, 1);
    assert.deepEqual(hv.vcpusOf(g.domid), [1]);
    const info = await v1.c.call<{ domid: number; vcpu: number }>({ op: 'info' });
    assert.deepEqual([info.domid, info.vcpu], [g.domid, 1]);
    await v1.c.call({ op: 'throw', message: 'guest vcpu crashed on purpose' });
    const e1 = await c.call<VcpuExit>({ op: 'exited', vcpu: 1 });
    assert.equal(e1.stopped, false);
    assert.match(e1.error ?? '', /guest vcpu crashed on purpose/);
    assert.deepEqual(hv.vcpusOf(g.domid), []);
    assert.deepEqual(hv.domids, [g.domid]);
    assert.equal((await c.call<{ vcpu: number }>({ op: 'info' })).vcpu, 0, 'the domain thread still answers');
    await assert.rejects(c.call({ op: 'stopVcpu', vcpu: 1 }), /no vCPU 1/);
    const v2 = await startGuestVcpu(c);
    clients.push(v2.c);
    assert.equal(v2.vcpu, 1, 'the number is reused');
    const e2 = await c.call<VcpuExit>({ op: 'stopVcpu', vcpu: 1 });
    assert.equal(e2.stopped, true);
    assert.equal(e2.error, undefined);
    assert.deepEqual(await c.call({ op: 'exited', vcpu: 1 }), e2);
    await hv.destroyDomain(g.domid);
    assertSettled(hv.counters());
  });

  test('5d. a worker domain awaiting its vCPU\'s exit stays alive until it comes', async () => {
    hv = new Hypervisor({ dom0MemoryPages: 4 });
    const g = await hv.createDomain({ script: DOMAIN, memoryPages: 4, workerData: { mode: 'await-exit' } });
    const first = await Promise.race([
      once(g.worker, 'message').then(([m]) => ({ msg: m as { exit: VcpuExit } })),
      g.exited.then((e) => ({ gone: e })),
    ]);
    assert.ok('msg' in first, `the domain thread ended (${JSON.stringify(first)}) before its vCPU's exit reached it`);
    assert.match(first.msg.exit.error ?? '', /vcpu died on purpose/);
    assert.equal(first.msg.exit.stopped, false);
    const exit = await g.exited;
    assert.equal(exit.exitCode, 0);
    assertSettled(hv.counters());
  });

  test('6a. destroying a local domain ends its vCPUs and releases what they held', async () => {
    hv = new Hypervisor({ dom0MemoryPages: 16, dom0PollMicros: 0 });
    const dom0 = hv.dom0;
    const base = hv.counters();
    assertSettled(base);
    const L = hv.createLocalDomain({ memoryPages: 16 });
    const [frame] = dom0.memory.alloc(1);
    const ref = dom0.grants.grantAccess(L.domid, frame!, false);
    const vs = [await startLocalVcpu(L), await startLocalVcpu(L)];
    clients.push(...vs.map((v) => v.c));
    const dports: number[] = [];
    for (const v of vs) {
      const p0 = dom0.events.allocUnbound(L.domid);
      assert.ok(await v.c.call<number>({ op: 'bindInterdomain', remote: 0, port: p0 }) > 0);
      assert.equal((await v.c.call<{ status: number }>({ op: 'mapRW', dom: 0, ref, write: [1] })).status, GNTST_okay);
      dports.push(p0);
    }
    // vCPU 1 sleeps in a wait, vCPU 2 is blocked in a busy loop (a barrier nobody releases).
    // Their calls never return: the domain's end cuts them short (checked below through exited).
    // static-check: allow the call's rejection is the vCPU's end, checked through v.exited
    void vs[0]!.c.call({ op: 'waitFor', port: 1000, timeoutMs: 60_000 }).catch(() => undefined);
    // static-check: allow the call's rejection is the vCPU's end, checked through v.exited
    void vs[1]!.c.call({ op: 'unmapRace', args: { handles: new SharedArrayBuffer(0), barrier: new SharedArrayBuffer(8) } }).catch(() => undefined);
    const [lf] = L.memory.alloc(1);
    assert.ok(L.grants.grantAccess(0, lf!, false) >= 0);
    const c = hv.counters();
    assert.equal(c.mapsActive, 2);
    assert.equal(c.grantsActive, 2);
    assert.equal(c.channelsBound, 4);
    assert.deepEqual(hv.vcpusOf(L.domid).sort(), [1, 2]);
    await hv.destroyDomain(L.domid);
    assert.deepEqual(hv.vcpusOf(L.domid), []);
    for (const v of vs) {
      const e = await v.exited;
      assert.equal(e.stopped, true);
    }
    assert.equal(dom0.grants.isMapped(ref), false, 'the vCPUs\' mappings were dropped');
    assert.equal(dom0.grants.endAccess(ref), true);
    for (const p of dports) assert.equal(dom0.events.close(p), 0);
    dom0.memory.free([frame!]);
    assertSettled(hv.counters());
    assert.deepEqual(hv.domids, []);
  });

  test('6b. destroying a worker domain ends its vCPU threads and releases what they held', async () => {
    hv = new Hypervisor({ dom0MemoryPages: 16, dom0PollMicros: 0 });
    const dom0 = hv.dom0;
    const { g, c } = await startGuest(hv);
    clients.push(c);
    const [frame] = dom0.memory.alloc(1);
    const ref = dom0.grants.grantAccess(g.domid, frame!, false);
    const lent = await c.call<number[]>({ op: 'alloc', count: 2 });
    const vs = [await startGuestVcpu(c, lent), await startGuestVcpu(c)];
    clients.push(...vs.map((v) => v.c));
    const dports: number[] = [];
    for (const v of vs) {
      const p0 = dom0.events.allocUnbound(g.domid);
      assert.ok(await v.c.call<number>({ op: 'bindInterdomain', remote: 0, port: p0 }) > 0);
      assert.equal((await v.c.call<{ status: number }>({ op: 'mapRW', dom: 0, ref, write: [1] })).status, GNTST_okay);
      dports.push(p0);
    }
    // static-check: allow the call's rejection is the vCPU's end, checked through v.exited
    void vs[0]!.c.call({ op: 'waitFor', port: 1000, timeoutMs: 60_000 }).catch(() => undefined);
    assert.deepEqual(hv.vcpusOf(g.domid).sort(), [1, 2]);
    assert.equal(hv.counters().mapsActive, 2);
    const exit = await hv.destroyDomain(g.domid);
    assert.equal(exit.destroyed, true);
    assert.deepEqual(hv.vcpusOf(g.domid), []);
    for (const v of vs) await assert.rejects(v.c.call({ op: 'info' }), /thread gone/);
    assert.equal(dom0.grants.isMapped(ref), false);
    assert.equal(dom0.grants.endAccess(ref), true);
    for (const p of dports) assert.equal(dom0.events.close(p), 0);
    dom0.memory.free([frame!]);
    assertSettled(hv.counters());
  });

  test('6c. a process whose domains had vCPUs exits on its own after shutdown', async () => {
    const script = fileURLToPath(TEARDOWN);
    const r = await new Promise<{ code: number | null; signal: string | null; stdout: string; stderr: string }>((resolve) => {
      execFile(process.execPath, [script], { timeout: 60_000 }, (err, stdout, stderr) => {
        const e = err as (NodeJS.ErrnoException & { code?: number | string; signal?: string }) | null;
        resolve({ code: e === null ? 0 : typeof e.code === 'number' ? e.code : null, signal: e?.signal ?? null, stdout, stderr });
      });
    });
    assert.equal(r.signal, null, `killed (still running after shutdown?): ${r.stderr}`);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^teardown ok/m);
  });

  test('7. at most maxVcpus - 1 vCPU threads (xl maxvcpus=); a freed number is reused', async () => {
    hv = new Hypervisor({ dom0MemoryPages: 4 });
    const L = hv.createLocalDomain({ memoryPages: 4, maxVcpus: MAX });
    const vs: Vcpu[] = [];
    for (let i = 1; i < MAX; i++) {
      const v = await startLocalVcpu(L);
      clients.push(v.c);
      vs.push(v);
    }
    assert.deepEqual(vs.map((v) => v.vcpu), Array.from({ length: MAX - 1 }, (_, i) => i + 1));
    assert.deepEqual(hv.vcpusOf(L.domid).sort(), vs.map((v) => v.vcpu));
    await assert.rejects(startLocalVcpu(L), new RegExp(`no free vCPU \\(maxvcpus ${MAX}\\)`));
    assert.equal(hv.vcpusOf(L.domid).length, MAX - 1);
    assert.equal((await L.stopVcpu(3)).stopped, true);
    assert.equal((await L.stopVcpu(5)).stopped, true);
    const again = await startLocalVcpu(L);
    clients.push(again.c);
    assert.equal(again.vcpu, 3, 'lowest free number');
    assert.equal((await again.c.call<{ vcpu: number }>({ op: 'info' })).vcpu, 3);
    const again2 = await startLocalVcpu(L);
    clients.push(again2.c);
    assert.equal(again2.vcpu, 5);
    await assert.rejects(startLocalVcpu(L), /no free vCPU/);
    await hv.destroyDomain(L.domid);
    await assert.rejects(startLocalVcpu(L), /domain gone|being destroyed/);
  });

  test('7b. worker domain: the limit holds for vCPUs started by vCPU threads too', async () => {
    hv = new Hypervisor({ dom0MemoryPages: 4 });
    const { g, c } = await startGuest(hv, MAX);
    clients.push(c);
    const v1 = await startGuestVcpu(c);
    clients.push(v1.c);
    // vCPU 1 starts the others.
    const nums: number[] = [v1.vcpu];
    for (let i = 2; i < MAX; i++) {
      const r = await startGuestVcpu(v1.c);
      clients.push(r.c);
      nums.push(r.vcpu);
    }
    assert.deepEqual(nums, Array.from({ length: MAX - 1 }, (_, i) => i + 1));
    await assert.rejects(c.call({ op: 'startVcpu' }), /startVcpu: domain \d+ has no free vCPU/);
    await assert.rejects(v1.c.call({ op: 'startVcpu' }), /no free vCPU/);
    assert.equal((await v1.c.call<VcpuExit>({ op: 'stopVcpu', vcpu: 4 })).stopped, true);
    const r = await startGuestVcpu(c);
    clients.push(r.c);
    assert.equal(r.vcpu, 4);
    await hv.destroyDomain(g.domid);
    assert.deepEqual(hv.vcpusOf(g.domid), []);
  });
});
