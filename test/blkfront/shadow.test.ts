/**
 * The shadow table against a model: ids handed out are never pending twice, a response id is
 * believed only while its request is pending, and every id comes back (Linux blkfront's
 * `get_id_from_freelist` / `add_id_to_freelist` and its checks in `blkif_interrupt`).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ShadowTable } from '../../src/blkfront/index.js';

test('property: take/lookup/release behave as a set of pending ids', () => {
  fc.assert(fc.property(
    fc.integer({ min: 1, max: 64 }),
    fc.array(fc.oneof(fc.constant({ t: 'take' as const }), fc.record({ t: fc.constant('respond' as const), id: fc.bigInt({ min: -2n, max: 70n }) })), { maxLength: 300 }),
    (size, steps) => {
      const table = new ShadowTable<number>(size);
      const pending = new Set<number>();
      for (const s of steps) {
        if (s.t === 'take') {
          if (table.available === 0) {
            assert.equal(pending.size, size);
            continue;
          }
          const e = table.take();
          assert.ok(!pending.has(e.index), `id ${e.index} handed out while pending`);
          assert.ok(e.index >= 0 && e.index < size);
          pending.add(e.index);
        } else {
          const e = table.lookup(s.id);
          const expect = s.id >= 0n && s.id < BigInt(size) && pending.has(Number(s.id));
          assert.equal(e !== undefined, expect, `lookup(${s.id})`);
          if (e !== undefined) {
            table.release(e);
            pending.delete(e.index);
          }
        }
        assert.equal(table.inFlight, pending.size);
        assert.equal(table.available, size - pending.size);
      }
    },
  ), { numRuns: 300 });
});

test('releasing an entry twice is a bug caught at once', () => {
  const t = new ShadowTable<number>(4);
  const e = t.take();
  t.release(e);
  assert.throws(() => t.release(e), /released twice/);
});
