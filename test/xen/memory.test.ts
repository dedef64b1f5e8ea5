import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Hypervisor, XEN_PAGE_SIZE } from '../../src/xen/index.js';

test('domain page allocator: single, contiguous, zeroed, bounded, freed', async () => {
  const hv = new Hypervisor({ dom0MemoryPages: 8 });
  try {
    const m = hv.dom0.memory;
    assert.equal(m.totalPages, 8);
    const [a] = m.alloc(1);
    const p = m.page(a!);
    assert.equal(p.length, XEN_PAGE_SIZE);
    assert.equal(p.buffer.byteLength, XEN_PAGE_SIZE, 'a page is its own buffer: a view exposes nothing else');
    p.fill(7);
    const run = m.alloc(4, { contiguous: true });
    assert.deepEqual(run, [run[0]!, run[0]! + 1, run[0]! + 2, run[0]! + 3]);
    const [b] = m.alloc(1);
    m.free([run[1]!]); // leaves a hole
    assert.equal(m.freePages, 3);
    assert.throws(() => m.alloc(4), /out of memory/);
    assert.throws(() => m.alloc(3, { contiguous: true }), /contiguous/, 'the free pages are not contiguous');
    assert.deepEqual(m.alloc(2, { contiguous: true }), [b! + 1, b! + 2]);
    m.free([a!]);
    assert.throws(() => m.page(a!), /not allocated/);
    assert.throws(() => m.free([a!]), /not allocated/);
    const again = m.alloc(2);
    assert.ok(again.includes(a!));
    assert.ok(m.page(a!).every((x) => x === 0), 'reallocated pages are scrubbed');
    assert.equal(m.freePages, 0);
  } finally {
    await hv.shutdown();
  }
});
