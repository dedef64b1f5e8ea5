// The checked hypervisor: each violation it detects is committed here on purpose and must be
// reported, naming the domains, grant and handle; legitimate uses next to each must not be.
import { test, describe, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { MessageChannel } from 'node:worker_threads';
import {
  checkedByDefault, DOMID_SELF, GNTCOPY_source_gref, GNTST_bad_page, GNTST_general_error, GNTST_okay,
  Hypervisor, type XenDomain, type XenViolation,
} from '../../src/xen/index.js';
import { G_FRAME, G_STRIDE, type SharedTables } from '../../src/xen/shared-tables.js';
import { NR_GRANT_ENTRIES } from '../../src/xen/constants.js';
import { VcpuClient } from './fixtures/vcpu-rpc.js';

const VCPU = new URL('./fixtures/vcpu.js', import.meta.url);
const tables = (hv: Hypervisor) => (hv as unknown as { t: SharedTables }).t;

/** The one violation taken, with the fields that identify it. */
function only(hv: Hypervisor): XenViolation {
  const v = hv.takeViolations();
  assert.equal(v.length, 1, `one violation expected, got ${JSON.stringify(v)}`);
  return v[0]!;
}

describe('checked hypervisor', { timeout: 60_000 }, () => {
  let hv: Hypervisor;
  let a: XenDomain; // granter
  let b: XenDomain; // mapper
  const setup = () => {
    hv = new Hypervisor({ dom0MemoryPages: 16, checked: true });
    a = hv.createLocalDomain({ memoryPages: 16 });
    b = hv.createLocalDomain({ memoryPages: 16 });
  };
  afterEach(async () => {
    // Every test leaves nothing untaken: shutdown() fails otherwise.
    await hv.shutdown();
  });

  test('on under node --test (NODE_TEST_CONTEXT), BLKIF_XEN_CHECKED decides, off elsewhere', () => {
    setup();
    assert.equal(process.env['NODE_TEST_CONTEXT'] !== undefined || process.env['BLKIF_XEN_CHECKED'] === '1', true,
      'this file runs under node --test or with BLKIF_XEN_CHECKED=1');
    assert.equal(new Hypervisor({ dom0MemoryPages: 1 }).checked, checkedByDefault());
    assert.equal(checkedByDefault({ NODE_TEST_CONTEXT: 'child-v8' }), true);
    assert.equal(checkedByDefault({ NODE_TEST_CONTEXT: 'child-v8', BLKIF_XEN_CHECKED: '0' }), false);
    assert.equal(checkedByDefault({ BLKIF_XEN_CHECKED: '1' }), true);
    assert.equal(checkedByDefault({}), false);
    assert.equal(hv.checked, true);
    assert.equal(new Hypervisor({ dom0MemoryPages: 1, checked: false }).checked, false);
  });

  test('a write through a GNTMAP_readonly mapping is reported at unmap', () => {
    setup();
    const [f] = a.memory.alloc(1);
    const ref = a.grants.grantAccess(b.domid, f!, true);
    a.memory.page(f!).fill(7);
    // Reading is fine.
    const ok = b.grants.mapGrant(a.domid, ref, true);
    assert.equal(ok.page![100], 7);
    assert.equal(b.grants.unmapGrant(ok.handle), GNTST_okay);
    assert.deepEqual(hv.violations(), []);
    const m = b.grants.mapGrant(a.domid, ref, true);
    assert.equal(m.status, GNTST_okay);
    m.page![100] = 8; // what real Xen faults on: the PTE is read-only
    assert.equal(b.grants.unmapGrant(m.handle), GNTST_okay);
    const v = only(hv);
    assert.deepEqual({ kind: v.kind, domid: v.domid, peer: v.peer, ref: v.ref, handle: v.handle, frame: v.frame },
      { kind: 'readonly-mapping-written', domid: b.domid, peer: a.domid, ref, handle: m.handle, frame: f });
    assert.match(v.message, new RegExp(`d${b.domid} handle ${m.handle}: gref ${ref} of d${a.domid}`));
    assert.equal(a.grants.endAccess(ref), true);
    assert.deepEqual(hv.violations(), [], 'the page did not change after the unmap');
    a.memory.free([f!]);
  });

  test('a write through a mapping after its unmap is reported when the granter ends access', () => {
    setup();
    const [f] = a.memory.alloc(1);
    const ref = a.grants.grantAccess(b.domid, f!, false);
    const m = b.grants.mapGrant(a.domid, ref, false);
    m.page![0] = 1; // while mapped: fine (a writable mapping)
    assert.equal(b.grants.unmapGrant(m.handle), GNTST_okay);
    m.page![1] = 2; // through the stale view
    assert.deepEqual(hv.violations(), [], 'found only where the granter takes its page back');
    assert.equal(a.grants.endAccess(ref), true);
    const v = only(hv);
    assert.deepEqual({ kind: v.kind, domid: v.domid, peer: v.peer, ref: v.ref, handle: v.handle, frame: v.frame },
      { kind: 'written-after-unmap', domid: b.domid, peer: a.domid, ref, handle: m.handle, frame: f });
    a.memory.free([f!]);
  });

  test('a write after unmap through a read-only view; copies out keep the check, a new map ends it', () => {
    setup();
    const [f, own] = a.memory.alloc(2);
    const ref = a.grants.grantAccess(b.domid, f!, true);
    const m = b.grants.mapGrant(a.domid, ref, true);
    assert.equal(b.grants.unmapGrant(m.handle), GNTST_okay);
    m.page![9] = 9;
    // A copy out of the grant cannot write it: the check stays armed.
    const [mine] = b.memory.alloc(1);
    assert.deepEqual(b.grants.copy([{ source: { ref, domid: a.domid, offset: 0 }, dest: { gmfn: mine!, domid: DOMID_SELF, offset: 0 }, len: 16, flags: GNTCOPY_source_gref }]), [GNTST_okay]);
    assert.equal(a.grants.endAccess(ref), true);
    assert.equal(only(hv).kind, 'written-after-unmap');
    // Mapped again after the change: the new mapping owns the page, nothing to report.
    const ref2 = a.grants.grantAccess(b.domid, own!, false);
    const m1 = b.grants.mapGrant(a.domid, ref2, false);
    b.grants.unmapGrant(m1.handle);
    a.memory.page(own!)[0] = 5; // the granter writes its own page between two uses
    const m2 = b.grants.mapGrant(a.domid, ref2, false);
    b.grants.unmapGrant(m2.handle);
    assert.equal(a.grants.endAccess(ref2), true);
    assert.deepEqual(hv.violations(), []);
    a.memory.free([f!, own!]);
    b.memory.free([mine!]);
  });

  test('lasting grants (rings, persistent grants): both sides write, no report', () => {
    setup();
    const [f] = a.memory.alloc(1);
    const ref = a.grants.grantAccess(b.domid, f!, false, { lasting: true });
    const m = b.grants.mapGrant(a.domid, ref, false);
    m.page![0] = 1;
    a.memory.page(f!)[1] = 1;
    assert.equal(b.grants.unmapGrant(m.handle), GNTST_okay);
    a.memory.page(f!)[2] = 1; // e.g. the frontend queues one more request on a closing ring
    // A persistent grant a backend keeps mapped read-only while the frontend reuses the page for
    // the next request (the hostile-backend fuzzer's keep-mapped fault found this case).
    const ro = b.grants.mapGrant(a.domid, ref, true);
    assert.equal(ro.status, GNTST_okay);
    a.memory.page(f!)[3] = 1;
    assert.equal(b.grants.unmapGrant(ro.handle), GNTST_okay);
    assert.equal(a.grants.endAccess(ref), true);
    assert.deepEqual(hv.violations(), []);
    a.memory.free([f!]);
  });

  test('mapping or copying an ended grant: GNTST_general_error (_set_status_v1), and reported', () => {
    setup();
    const [f] = a.memory.alloc(1);
    const [mine] = b.memory.alloc(1);
    const ref = a.grants.grantAccess(b.domid, f!, false);
    assert.equal(a.grants.endAccess(ref), true);
    const m = b.grants.mapGrant(a.domid, ref, false);
    assert.equal(m.status, GNTST_general_error);
    let v = only(hv);
    assert.deepEqual({ kind: v.kind, domid: v.domid, peer: v.peer, ref: v.ref }, { kind: 'ended-grant-mapped', domid: b.domid, peer: a.domid, ref });
    const st = b.grants.copy([{ source: { ref, domid: a.domid, offset: 0 }, dest: { gmfn: mine!, domid: DOMID_SELF, offset: 0 }, len: 8, flags: GNTCOPY_source_gref }]);
    assert.deepEqual(st, [GNTST_general_error]);
    v = only(hv);
    assert.deepEqual({ kind: v.kind, domid: v.domid, peer: v.peer, ref: v.ref }, { kind: 'ended-grant-copied', domid: b.domid, peer: a.domid, ref });
    // A reference never granted is garbage, refused the same way but not a use-after-end.
    assert.equal(b.grants.mapGrant(a.domid, ref + 1, false).status, GNTST_general_error);
    assert.deepEqual(hv.violations(), []);
    a.memory.free([f!]);
    b.memory.free([mine!]);
  });

  test('a grant whose frame the granter does not own: GNTST_bad_page (get_paged_frame), reported; freeing a granted frame too', () => {
    setup();
    const [f] = a.memory.alloc(1);
    const ref = a.grants.grantAccess(b.domid, f!, false);
    assert.throws(() => a.memory.free([f!]), /still granted/);
    let v = only(hv);
    assert.deepEqual({ kind: v.kind, domid: v.domid, peer: v.peer, ref: v.ref, frame: v.frame },
      { kind: 'granted-frame-freed', domid: a.domid, peer: b.domid, ref, frame: f });
    // On Xen a guest writes its grant entries itself, so one may name a frame it does not have.
    const t = tables(hv);
    Atomics.store(t.gnt, (t.slotOf(a.domid) * NR_GRANT_ENTRIES + ref) * G_STRIDE + G_FRAME, 1 << 20);
    assert.equal(b.grants.mapGrant(a.domid, ref, false).status, GNTST_bad_page);
    v = only(hv);
    assert.deepEqual({ kind: v.kind, domid: v.domid, peer: v.peer, ref: v.ref, frame: v.frame },
      { kind: 'unowned-frame-mapped', domid: b.domid, peer: a.domid, ref, frame: 1 << 20 });
    assert.equal(a.grants.endAccess(ref), true);
    a.memory.free([f!]);
  });

  test('a grant, mapping or port still held when its device or domain goes: checkReleased reports each', () => {
    setup();
    const [f] = a.memory.alloc(1);
    const ref = a.grants.grantAccess(b.domid, f!, false);
    const m = b.grants.mapGrant(a.domid, ref, false);
    const pa = a.events.allocUnbound(b.domid);
    const pb = b.events.bindInterdomain(a.domid, pa);
    const c = hv.createLocalDomain({ memoryPages: 4 });
    const pc = c.events.allocUnbound(a.domid); // towards another domain: not this device's
    const onA = hv.checkReleased(a.domid, { peers: [b.domid] }).map((v) => [v.kind, v.domid, v.peer, v.ref, v.port]);
    assert.deepEqual(onA, [['grant-leaked', a.domid, b.domid, ref, -1], ['port-leaked', a.domid, b.domid, -1, pa]]);
    const onB = hv.checkReleased(b.domid).map((v) => [v.kind, v.domid, v.peer, v.ref, v.handle, v.port]);
    assert.deepEqual(onB, [['mapping-leaked', b.domid, a.domid, ref, m.handle, -1], ['port-leaked', b.domid, a.domid, -1, -1, pb]]);
    assert.equal(hv.takeViolations().length, 4);
    // Released properly: nothing to report.
    b.grants.unmapGrant(m.handle);
    assert.equal(a.grants.endAccess(ref), true);
    b.events.close(pb);
    a.events.close(pa);
    c.events.close(pc);
    assert.deepEqual(hv.checkReleased(a.domid), []);
    assert.deepEqual(hv.checkReleased(b.domid), []);
    assert.deepEqual(hv.violations(), []);
    a.memory.free([f!]);
  });

  test('a domain thread (vCPU) records violations the main thread reads', async () => {
    setup();
    const [f] = a.memory.alloc(1);
    const ref = a.grants.grantAccess(b.domid, f!, false);
    assert.equal(a.grants.endAccess(ref), true);
    const { port1, port2 } = new MessageChannel();
    const h = await b.startVcpu({ script: VCPU, workerData: { port: port2 }, transferList: [port2] });
    const c = new VcpuClient(port1);
    try {
      const r = await c.call<{ status: number }>({ op: 'mapRW', dom: a.domid, ref, write: [1] });
      assert.equal(r.status, GNTST_general_error);
    } finally {
      c.close();
      await b.stopVcpu(h.vcpu);
    }
    const v = only(hv);
    assert.deepEqual({ kind: v.kind, domid: v.domid, peer: v.peer, ref: v.ref }, { kind: 'ended-grant-mapped', domid: b.domid, peer: a.domid, ref });
    a.memory.free([f!]);
  });

  test('shutdown() fails on a violation nobody took, after tearing everything down', async () => {
    setup();
    const other = new Hypervisor({ dom0MemoryPages: 4, checked: true });
    const x = other.createLocalDomain({ memoryPages: 4 });
    const y = other.createLocalDomain({ memoryPages: 4 });
    const [f] = x.memory.alloc(1);
    const ref = x.grants.grantAccess(y.domid, f!, true);
    const m = y.grants.mapGrant(x.domid, ref, true);
    m.page![0] = 1;
    y.grants.unmapGrant(m.handle);
    await assert.rejects(other.shutdown(), (e: Error) => e.message.includes('readonly-mapping-written') && e.message.includes(`gref ${ref} of d${x.domid}`));
    assert.deepEqual(other.domids, []);
    // Unchecked: the same write goes unseen.
    const plain = new Hypervisor({ dom0MemoryPages: 4, checked: false });
    const p = plain.createLocalDomain({ memoryPages: 4 });
    const q = plain.createLocalDomain({ memoryPages: 4 });
    const [g] = p.memory.alloc(1);
    const r = p.grants.grantAccess(q.domid, g!, true);
    const n = q.grants.mapGrant(p.domid, r, true);
    n.page![0] = 1;
    q.grants.unmapGrant(n.handle);
    assert.deepEqual(plain.violations(), []);
    await plain.shutdown();
  });
});
