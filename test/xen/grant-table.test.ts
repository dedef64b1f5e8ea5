import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  Hypervisor, DOMID_SELF, GNTCOPY_dest_gref, GNTCOPY_source_gref, GNTMAP_host_map, GNTMAP_readonly,
  GNTST_bad_copy_arg, GNTST_bad_domain, GNTST_bad_gntref, GNTST_bad_handle, GNTST_general_error,
  GNTST_okay, GNTST_permission_denied, GNTST_bad_page, NR_GRANT_ENTRIES, XEN_PAGE_SIZE, type XenDomain,
} from '../../src/xen/index.js';

describe('grant tables (v1 rules)', () => {
  let hv: Hypervisor;
  let a: XenDomain; // granter
  let b: XenDomain; // grantee
  let c: XenDomain; // a third domain
  before(() => {
    hv = new Hypervisor({ dom0MemoryPages: 16 });
    a = hv.createLocalDomain({ memoryPages: 16 });
    b = hv.createLocalDomain({ memoryPages: 16 });
    c = hv.createLocalDomain({ memoryPages: 16 });
  });
  after(async () => {
    await hv.shutdown();
    const g = hv.counters();
    assert.equal(g.grantsActive, 0);
    assert.equal(g.mapsActive, 0);
    assert.equal(g.portsOpen, 0);
  });

  test('map gives a view of the same memory, no copy; unmap by handle', () => {
    const [f] = a.memory.alloc(1);
    const ref = a.grants.grantAccess(b.domid, f!, false);
    assert.ok(ref >= 8, 'refs below GNTTAB_NR_RESERVED_ENTRIES are reserved');
    const m = b.grants.mapGrant(a.domid, ref, false);
    assert.equal(m.status, GNTST_okay);
    assert.ok(m.page !== undefined);
    assert.equal(m.page.length, XEN_PAGE_SIZE);
    a.memory.page(f!)[7] = 42;
    assert.equal(m.page[7], 42);
    m.page[8] = 43;
    assert.equal(a.memory.page(f!)[8], 43);
    assert.equal(a.grants.isMapped(ref), true);
    assert.equal(b.grants.unmapGrant(m.handle), GNTST_okay);
    assert.equal(b.grants.unmapGrant(m.handle), GNTST_bad_handle, 'double unmap');
    assert.equal(a.grants.endAccess(ref), true);
    a.memory.free([f!]);
  });

  test('wrong domain maps it: GNTST_general_error (Xen _set_status_v1), no view', () => {
    const [f] = a.memory.alloc(1);
    const ref = a.grants.grantAccess(b.domid, f!, false);
    const m = c.grants.mapGrant(a.domid, ref, false);
    assert.equal(m.status, GNTST_general_error);
    assert.equal(m.page, undefined);
    assert.equal(m.handle, -1);
    assert.equal(a.grants.isMapped(ref), false);
    assert.equal(a.grants.endAccess(ref), true);
    a.memory.free([f!]);
  });

  test('read-only grant: writable map fails, read-only map works', () => {
    const [f] = a.memory.alloc(1);
    const ref = a.grants.grantAccess(b.domid, f!, true);
    const w = b.grants.mapGrant(a.domid, ref, false);
    assert.equal(w.status, GNTST_general_error);
    assert.equal(w.page, undefined);
    const r = b.grants.mapGrant(a.domid, ref, true);
    assert.equal(r.status, GNTST_okay);
    assert.equal(b.grants.unmapGrant(r.handle), GNTST_okay);
    assert.equal(a.grants.endAccess(ref), true);
    a.memory.free([f!]);
  });

  test('revoked (ended) grant cannot be mapped', () => {
    const [f] = a.memory.alloc(1);
    const ref = a.grants.grantAccess(b.domid, f!, false);
    assert.equal(a.grants.endAccess(ref), true);
    const m = b.grants.mapGrant(a.domid, ref, false);
    assert.equal(m.status, GNTST_general_error);
    assert.equal(m.page, undefined);
    // A use of an ended grant: the checked hypervisor reports it (test/xen/checked.test.ts).
    assert.deepEqual(hv.takeViolations().map((v) => v.kind), hv.checked ? ['ended-grant-mapped'] : []);
    a.memory.free([f!]);
  });

  test('out-of-range ref, unknown domain, missing GNTMAP_host_map', () => {
    assert.equal(b.grants.mapGrant(a.domid, NR_GRANT_ENTRIES, false).status, GNTST_bad_gntref);
    assert.equal(b.grants.mapGrant(a.domid, -1, false).status, GNTST_bad_gntref);
    assert.equal(b.grants.mapGrant(999, 8, false).status, GNTST_bad_domain);
    assert.equal(b.grants.mapGrant(DOMID_SELF, 8, false).status, GNTST_bad_domain);
    assert.equal(b.grants.map([{ dom: a.domid, ref: 8, flags: 0 }])[0]!.status, GNTST_bad_gntref);
    assert.equal(b.grants.unmapGrant(12345), GNTST_bad_handle);
  });

  test('ending a mapped grant fails until the peer unmaps; frame cannot be freed meanwhile', () => {
    const [f] = a.memory.alloc(1);
    const ref = a.grants.grantAccess(b.domid, f!, false);
    const r1 = b.grants.mapGrant(a.domid, ref, true);
    const r2 = b.grants.mapGrant(a.domid, ref, false);
    assert.equal(r1.status, GNTST_okay);
    assert.equal(r2.status, GNTST_okay);
    assert.equal(a.grants.endAccess(ref), false);
    assert.throws(() => a.memory.free([f!]), /still granted/);
    assert.deepEqual(hv.takeViolations().map((v) => v.kind), hv.checked ? ['granted-frame-freed'] : []);
    assert.equal(b.grants.unmapGrant(r2.handle), GNTST_okay);
    assert.equal(a.grants.endAccess(ref), false, 'read-only mapping still there');
    assert.equal(b.grants.unmapGrant(r1.handle), GNTST_okay);
    assert.equal(a.grants.endAccess(ref), true);
    assert.equal(a.grants.endAccess(ref), false, 'already ended');
    a.memory.free([f!]);
  });

  test('batched map/unmap with per-op status', () => {
    const frames = a.memory.alloc(4);
    const refs = frames.map((f) => a.grants.grantAccess(b.domid, f, false));
    const ops = [
      ...refs.map((ref) => ({ dom: a.domid, ref, flags: GNTMAP_host_map })),
      { dom: a.domid, ref: NR_GRANT_ENTRIES + 1, flags: GNTMAP_host_map },
      { dom: a.domid, ref: refs[0]!, flags: GNTMAP_host_map | GNTMAP_readonly },
    ];
    const before = b.counters.domain(b.domid)!;
    const res = b.grants.map(ops);
    assert.deepEqual(res.map((r) => r.status), [0, 0, 0, 0, GNTST_bad_gntref, 0]);
    res.forEach((r, i) => { if (r.page !== undefined && i < 4) r.page[0] = i + 1; });
    frames.forEach((f, i) => assert.equal(a.memory.page(f)[0], i + 1));
    const after = b.counters.domain(b.domid)!;
    assert.equal(after.mapOps - before.mapOps, 6);
    assert.equal(after.mapsActive - before.mapsActive, 5);
    const st = b.grants.unmap([...res.filter((r) => r.status === GNTST_okay).map((r) => r.handle), -5]);
    assert.deepEqual(st, [0, 0, 0, 0, 0, GNTST_bad_handle]);
    assert.equal(b.counters.domain(b.domid)!.mapsActive, before.mapsActive);
    for (const r of refs) assert.equal(a.grants.endAccess(r), true);
    a.memory.free(frames);
  });

  test('grant copy both directions, batched, with per-op status', () => {
    const [fa, fro] = a.memory.alloc(2);
    const [fb] = b.memory.alloc(1);
    const ref = a.grants.grantAccess(b.domid, fa!, false);
    const roRef = a.grants.grantAccess(b.domid, fro!, true);
    const local = b.memory.page(fb!);
    local.set([1, 2, 3, 4], 100);
    a.memory.page(fro!).set([9, 8, 7], 0);
    const st = b.grants.copy([
      // local -> grant
      { source: { gmfn: fb!, domid: DOMID_SELF, offset: 100 }, dest: { ref, domid: a.domid, offset: 10 }, len: 4, flags: GNTCOPY_dest_gref },
      // read-only grant -> local
      { source: { ref: roRef, domid: a.domid, offset: 0 }, dest: { gmfn: fb!, domid: DOMID_SELF, offset: 0 }, len: 3, flags: GNTCOPY_source_gref },
      // into a read-only grant: refused as a writable pin (Xen: GNTST_general_error)
      { source: { gmfn: fb!, domid: DOMID_SELF, offset: 0 }, dest: { ref: roRef, domid: a.domid, offset: 0 }, len: 1, flags: GNTCOPY_dest_gref },
      // out of the page
      { source: { gmfn: fb!, domid: DOMID_SELF, offset: 4000 }, dest: { ref, domid: a.domid, offset: 0 }, len: 200, flags: GNTCOPY_dest_gref },
      { source: { gmfn: fb!, domid: DOMID_SELF, offset: 0 }, dest: { ref, domid: a.domid, offset: 4095 }, len: 2, flags: GNTCOPY_dest_gref },
      // bad ref, bad domain, foreign frame without a grant, frame we do not own
      { source: { gmfn: fb!, domid: DOMID_SELF, offset: 0 }, dest: { ref: 1 << 20, domid: a.domid, offset: 0 }, len: 1, flags: GNTCOPY_dest_gref },
      { source: { gmfn: fb!, domid: DOMID_SELF, offset: 0 }, dest: { ref, domid: 777, offset: 0 }, len: 1, flags: GNTCOPY_dest_gref },
      { source: { gmfn: fa!, domid: a.domid, offset: 0 }, dest: { gmfn: fb!, domid: DOMID_SELF, offset: 0 }, len: 1, flags: 0 },
      { source: { gmfn: 15, domid: DOMID_SELF, offset: 0 }, dest: { ref, domid: a.domid, offset: 0 }, len: 1, flags: GNTCOPY_dest_gref },
    ]);
    assert.deepEqual(st, [
      GNTST_okay, GNTST_okay, GNTST_general_error, GNTST_bad_copy_arg, GNTST_bad_copy_arg,
      GNTST_bad_gntref, GNTST_bad_domain, GNTST_permission_denied, GNTST_bad_page,
    ]);
    assert.deepEqual([...a.memory.page(fa!).subarray(10, 14)], [1, 2, 3, 4]);
    assert.deepEqual([...local.subarray(0, 3)], [9, 8, 7]);
    assert.equal(a.memory.page(fro!)[0], 9, 'read-only grant untouched');
    assert.equal(a.grants.isMapped(ref), false, 'copy pins only for the copy');
    // a third domain may not copy from a grant made to b
    assert.deepEqual(c.grants.copy([{ source: { ref, domid: a.domid, offset: 0 }, dest: { gmfn: c.memory.alloc(1)[0]!, domid: DOMID_SELF, offset: 0 }, len: 1, flags: GNTCOPY_source_gref }]), [GNTST_general_error]);
    assert.equal(a.grants.endAccess(ref), true);
    assert.equal(a.grants.endAccess(roRef), true);
  });

  test('destroying the granter: existing mapping stays valid, new maps fail, counters settle', async () => {
    const g = hv.createLocalDomain({ memoryPages: 4 });
    const [f] = g.memory.alloc(1);
    const ref = g.grants.grantAccess(b.domid, f!, false);
    const ref2 = g.grants.grantAccess(b.domid, g.memory.alloc(1)[0]!, false);
    const m = b.grants.mapGrant(g.domid, ref, false);
    assert.equal(m.status, GNTST_okay);
    g.memory.page(f!)[0] = 5;
    const before = hv.counters().grantsActive;
    await hv.destroyDomain(g.domid);
    assert.equal(hv.counters().grantsActive, before - 2, 'its grants are revoked');
    assert.equal(m.page![0], 5, 'the mapping keeps the memory');
    assert.equal(b.grants.mapGrant(g.domid, ref2, false).status, GNTST_bad_domain);
    assert.equal(b.grants.unmapGrant(m.handle), GNTST_okay);
  });

  test('grantAccess rejects frames the domain does not own', () => {
    assert.ok(a.grants.grantAccess(b.domid, 9999, false) < 0);
  });
});
