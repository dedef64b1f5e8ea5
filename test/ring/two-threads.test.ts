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
  // Each sleep was ended by a kick of the peer's (none slept through a missed notification).
  // How few kicks the event indexes leave depends on scheduling: the bench measures it
  // (bench/ring.ts, kicks per request), and test/ring/ring-vectors.test.ts checks the rule
  // itself against ring.h.
  assert.ok(r.back.sleeps <= r.front.notifiesSent, `backend slept ${r.back.sleeps} times, frontend kicked ${r.front.notifiesSent}`);
  assert.ok(r.front.sleeps <= r.back.notifiesSent, `frontend slept ${r.front.sleeps} times, backend kicked ${r.back.notifiesSent}`);
});

test('x86_32 entries over a two-page ring, where entry 37 straddles the page boundary', async () => {
  const r = await runRingExchange({ entries: 200_000, protocol: 'x86_32-abi', order: 1 });
  assert.deepEqual([...r.front.errors, ...r.back.errors], []);
  assert.equal(r.ringSize, 64);
});
