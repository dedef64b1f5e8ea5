// A domain's pages exist only once it allocates them (memory.ts): what that costs, and that a
// page created late in one thread is found by every thread that maps or copies it.
import { test, describe, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import type { MessagePort } from 'node:worker_threads';
import { GNTST_okay, Hypervisor, type DomainHandle } from '../../src/xen/index.js';
import { GROW_BATCH } from '../../src/xen/memory.js';
import { VcpuClient } from './fixtures/vcpu-rpc.js';

const DOMAIN = new URL('./fixtures/vcpu-domain.js', import.meta.url);

interface MapResult { status: number; handle: number; read: number[] }

describe('domain memory created on demand', () => {
  let hv: Hypervisor | undefined;
  const clients: VcpuClient[] = [];
  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    await hv?.shutdown();
    hv = undefined;
  });

  /** A worker domain (fixtures/vcpu-domain.ts) and a command port to its own thread. */
  async function guest(h: Hypervisor, memoryPages: number, memoryOf?: readonly number[]): Promise<{ g: DomainHandle; c: VcpuClient }> {
    const g = await h.createDomain({ script: DOMAIN, memoryPages, pollMicros: 0, ...(memoryOf === undefined ? {} : { memoryOf }) });
    const [msg] = await once(g.worker, 'message') as [{ port: MessagePort }];
    const c = new VcpuClient(msg.port);
    clients.push(c);
    return { g, c };
  }

  test('a domain with a large memory creates only the pages it allocated, in batches, and none once destroyed', { timeout: 60_000 }, async () => {
    const h = new Hypervisor({ dom0MemoryPages: 64 });
    hv = h;
    assert.equal(h.createdPages(0), 0, 'dom0 has allocated nothing yet');
    const L = h.createLocalDomain({ memoryPages: 100_000 });
    assert.equal(h.createdPages(L.domid), 0);
    assert.equal(L.memory.totalPages, 100_000);
    assert.equal(L.memory.createdPages, 0);
    const a = L.memory.alloc(10);
    assert.equal(L.memory.createdPages, GROW_BATCH, 'one batch for ten pages');
    assert.equal(h.createdPages(L.domid), GROW_BATCH, 'the hypervisor knows the batch');
    L.memory.alloc(GROW_BATCH - 10);
    assert.equal(L.memory.createdPages, GROW_BATCH, 'no growth while the batch has free pages');
    // A request bigger than a batch grows by what it needs.
    const big = L.memory.alloc(3 * GROW_BATCH + 5);
    assert.equal(L.memory.createdPages, 4 * GROW_BATCH + 5);
    assert.equal(new Set(big).size, big.length);
    // A contiguous run that crosses into frames not created yet.
    const run = L.memory.alloc(10, { contiguous: true });
    assert.equal(run[9]! - run[0]!, 9);
    assert.ok(L.memory.createdPages >= run[9]! + 1 && L.memory.createdPages <= 5 * GROW_BATCH + 5);
    // Freed pages are reused before any is created; reused pages are scrubbed.
    L.memory.page(a[0]!).fill(0xee);
    L.memory.free(a);
    const created = L.memory.createdPages;
    const inUse = L.memory.totalPages - L.memory.freePages;
    const again = L.memory.alloc(created - inUse);
    assert.equal(L.memory.createdPages, created, 'every free page created is used before any is created');
    assert.ok(again.includes(a[0]!));
    assert.ok(L.memory.page(a[0]!).every((b) => b === 0), 'a reused page is scrubbed');
    assert.equal(L.memory.freePages, 100_000 - created);
    L.memory.alloc(1);
    assert.equal(L.memory.createdPages, created + GROW_BATCH, 'then one more batch');
    // dom0's memory is bounded as before: created up to its size, never beyond.
    h.dom0.memory.alloc(64);
    assert.equal(h.createdPages(0), 64);
    assert.throws(() => h.dom0.memory.alloc(1), /out of memory/);
    await h.destroyDomain(L.domid);
    assert.equal(h.createdPages(L.domid), undefined, 'the hypervisor holds none of its pages');
  });

  test('a page created late in one worker is granted, mapped and copied by other domains\' threads, bytes both ways', { timeout: 60_000 }, async () => {
    const h = new Hypervisor({ dom0MemoryPages: 16, dom0PollMicros: 0 });
    hv = h;
    // A maps from every domain and exists before B grows: it learns B's pages on its control
    // port; its vCPU 1 (started now too) the same way. C is a guest that maps nobody's.
    const A = await guest(h, 4096);
    const B = await guest(h, 4096);
    const C = await guest(h, 4096, []);
    const v = await A.c.call<{ vcpu: number; port: MessagePort }>({ op: 'startVcpu' });
    const vc = new VcpuClient(v.port);
    clients.push(vc);
    assert.equal(h.createdPages(B.g.domid), 0);
    // B allocates past its first batch: the page it grants is in the second.
    await B.c.call<number[]>({ op: 'alloc', count: GROW_BATCH });
    const frames = await B.c.call<number[]>({ op: 'alloc', count: 3 });
    const f = frames.at(-1)!;
    assert.ok(f >= GROW_BATCH, `frame ${f} is in the second batch`);
    assert.equal(await B.c.call({ op: 'created' }), 2 * GROW_BATCH);
    assert.equal(h.createdPages(B.g.domid), 2 * GROW_BATCH, 'the hypervisor learnt both batches');
    await B.c.call({ op: 'fill', frame: f, byte: 0x5a });

    // A's own thread maps it writable, reads B's bytes and writes its own.
    const refA = await B.c.call<number>({ op: 'grantAccess', dom: A.g.domid, frame: f });
    const m = await A.c.call<MapResult>({ op: 'mapRW', dom: B.g.domid, ref: refA, write: [1, 2, 3, 4] });
    assert.equal(m.status, GNTST_okay);
    assert.deepEqual(m.read, [0x5a, 0x5a, 0x5a, 0x5a]);
    assert.deepEqual(await B.c.call({ op: 'peek', frame: f, count: 8 }), [0x5a, 0x5a, 0x5a, 0x5a, 1, 2, 3, 4], 'A\'s write reached B\'s page');
    // GNTTABOP_copy by A of the same grant into a page of its own.
    const [af] = await A.c.call<number[]>({ op: 'alloc', count: 1 });
    assert.equal(await A.c.call({ op: 'copyIn', dom: B.g.domid, ref: refA, frame: af! }), GNTST_okay);
    assert.deepEqual(await A.c.call({ op: 'peek', frame: af!, count: 8 }), [0x5a, 0x5a, 0x5a, 0x5a, 1, 2, 3, 4]);
    assert.equal(await A.c.call({ op: 'unmap', handle: m.handle }), GNTST_okay);

    // A's vCPU thread (started before B grew) maps it too.
    const mv = await vc.call<MapResult>({ op: 'mapRW', dom: B.g.domid, ref: refA, write: [5, 6, 7, 8] });
    assert.equal(mv.status, GNTST_okay);
    assert.deepEqual(mv.read, [0x5a, 0x5a, 0x5a, 0x5a]);
    assert.equal(await vc.call({ op: 'unmap', handle: mv.handle }), GNTST_okay);
    // Each grant ends before another writes the page (the checked mode's written-after-unmap).
    assert.equal(await B.c.call({ op: 'endAccess', ref: refA }), true);

    // dom0 (the main thread) maps it; a domain created after the growth learns it at start.
    const ref0 = await B.c.call<number>({ op: 'grantAccess', dom: 0, frame: f });
    const m0 = h.dom0.grants.mapGrant(B.g.domid, ref0, false);
    assert.equal(m0.status, GNTST_okay);
    assert.deepEqual([...m0.page!.subarray(0, 8)], [0x5a, 0x5a, 0x5a, 0x5a, 5, 6, 7, 8]);
    assert.equal(m0.page!.buffer.byteLength, 4096, 'the view exposes the granted page only');
    m0.page![0] = 0x77;
    assert.equal(h.dom0.grants.unmapGrant(m0.handle), GNTST_okay);
    assert.equal(await B.c.call({ op: 'endAccess', ref: ref0 }), true);
    assert.deepEqual(await B.c.call({ op: 'peek', frame: f, count: 1 }), [0x77]);
    const D = await guest(h, 64);
    const refD = await B.c.call<number>({ op: 'grantAccess', dom: D.g.domid, frame: f });
    const md = await D.c.call<MapResult>({ op: 'mapRW', dom: B.g.domid, ref: refD, write: [9] });
    assert.equal(md.status, GNTST_okay);
    assert.deepEqual(md.read, [0x77, 0x5a, 0x5a, 0x5a]);
    assert.equal(await D.c.call({ op: 'unmap', handle: md.handle }), GNTST_okay);
    // C maps nobody's memory: it is not sent B's pages.
    const refC = await B.c.call<number>({ op: 'grantAccess', dom: C.g.domid, frame: f });
    const mc = await C.c.call<MapResult>({ op: 'mapRW', dom: B.g.domid, ref: refC, write: [] });
    assert.notEqual(mc.status, GNTST_okay, 'a guest that maps nobody\'s memory does not learn it');
    assert.deepEqual(h.takeViolations().map((x) => x.kind), ['unowned-frame-mapped'], 'the checked mode reports it');

    // B lends frames of its second batch to a vCPU of its own (startVcpu frames): it allocates and writes them.
    const lent = frames.slice(0, 2);
    const bv = await B.c.call<{ vcpu: number; port: MessagePort }>({ op: 'startVcpu', frames: lent });
    const bvc = new VcpuClient(bv.port);
    clients.push(bvc);
    assert.deepEqual((await bvc.call<number[]>({ op: 'alloc', count: 2 })).sort(), [...lent].sort());
    await bvc.call({ op: 'fill', frame: lent[1]!, byte: 0x33 });
    assert.deepEqual(await B.c.call({ op: 'peek', frame: lent[1]!, count: 2 }), [0x33, 0x33], 'the vCPU wrote B\'s page');

    for (const r of [refD, refC]) assert.equal(await B.c.call({ op: 'endAccess', ref: r }), true);
    assert.equal(await B.c.call({ op: 'created' }), 2 * GROW_BATCH, 'granting and mapping created nothing');
    await h.destroyDomain(B.g.domid);
    assert.equal(h.createdPages(B.g.domid), undefined);
  });
});
