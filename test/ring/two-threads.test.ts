/**
 * A producer and a consumer worker on one shared ring exchange a million entries with
 * Atomics.wait/notify kicks gated by the event indexes: nothing lost, duplicated or reordered.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runRingExchange } from '../../src/cli/ring-exchange.js';

test('a million requests and responses between two threads (x86_64, one page)', async () => {
  const r = await runRingExchange({ entries: 1_000_000, protocol: 'x86_64-abi', order: 0 });
  assert.deepEqual([...r.front.errors, ...r.back.errors], []);
  assert.equal(r.ringSize, 32);
  // Notification suppression works: far fewer kicks than entries (ring.h event indexes).
  assert.ok(r.front.notifiesSent < r.entries / 4, `frontend kicks: ${r.front.notifiesSent}`);
  assert.ok(r.back.notifiesSent < r.entries / 4, `backend kicks: ${r.back.notifiesSent}`);
});

test('x86_32 entries over a two-page ring, where entry 37 straddles the page boundary', async () => {
  const r = await runRingExchange({ entries: 200_000, protocol: 'x86_32-abi', order: 1 });
  assert.deepEqual([...r.front.errors, ...r.back.errors], []);
  assert.equal(r.ringSize, 64);
});
