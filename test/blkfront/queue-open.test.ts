/**
 * A queue that cannot be set up leaves nothing behind: its ring pages, granted to the backend
 * before the event channel is allocated, are ended and freed when that allocation fails (a
 * backend domain dying as the frontend connects; the soak's checked hypervisor once found such a
 * ring grant left behind).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { X86_64_ABI } from '../../src/abi/index.js';
import { Queue } from '../../src/blkfront/queue.js';
import { Hypervisor, type XenAccess } from '../../src/xen/index.js';

test('Queue.open ends its ring grants and frees the ring pages when the event channel cannot be had', { timeout: 30_000 }, async () => {
  const hv = new Hypervisor({ dom0MemoryPages: 16, checked: true });
  try {
    const G = hv.createLocalDomain({ memoryPages: 64 });
    const B = hv.createLocalDomain({ memoryPages: 16 });
    const free = G.memory.freePages;
    // The guest's own hypercalls, but the event channel refused (-ESRCH) as for a domain gone.
    const failing: XenAccess = {
      domid: G.domid, vcpu: G.vcpu, grants: G.grants, memory: G.memory,
      events: new Proxy(G.events, { get: (t, k) => (k === 'allocUnbound' ? () => -3 : Reflect.get(t, k)) }),
    };
    assert.throws(() => Queue.open(failing, B.domid, X86_64_ABI, 2, 0, () => undefined), /event channel/);
    assert.equal(G.memory.freePages, free, 'the four ring pages are free again');
    assert.equal(hv.domainCounters(G.domid)!.grantsActive, 0, 'no ring page is still granted');
    // And with the channel to be had, the same call makes a queue whose close ends everything.
    const q = Queue.open(G, B.domid, X86_64_ABI, 2, 0, () => undefined);
    assert.equal(hv.domainCounters(G.domid)!.grantsActive, 4);
    assert.equal(q.close(G, () => undefined, () => assert.fail('no page is stuck')), 0);
    assert.equal(hv.domainCounters(G.domid)!.grantsActive, 0);
    assert.equal(G.memory.freePages, free);
  } finally {
    await hv.shutdown();
  }
});
