/**
 * everyPeriod: the drivers' housekeeping of every device on one timer per period and thread
 * (an idle domain wakes once a period whatever its number of VBDs).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { everyPeriod, periodicJobs } from '../../src/xenbus/index.js';
import { eventually } from '../support/common.js';

test('jobs of one period run together, from one timer; each registration ends on its own', async () => {
  const seen: [string, number][] = [];
  const stops = ['a', 'b', 'c'].map((name) => everyPeriod(20, (now) => { seen.push([name, now]); }));
  const same = everyPeriod(20, (now) => { seen.push(['a', now]); });
  assert.equal(periodicJobs(), 4);
  await eventually(() => seen.length >= 8, 'two periods', 10_000);
  // Every run of a period gets the same `now`: they ran in one timer callback, in order.
  const first = seen.slice(0, 4);
  assert.deepEqual(first.map(([n]) => n), ['a', 'b', 'c', 'a']);
  assert.equal(new Set(first.map(([, t]) => t)).size, 1, 'one tick for all four');
  stops[1]!();
  stops[1]!();
  assert.equal(periodicJobs(), 3, 'a second stop does nothing');
  seen.length = 0;
  await eventually(() => seen.length >= 3, 'a period without b', 10_000);
  assert.ok(!seen.some(([n]) => n === 'b'), 'b stopped');
  for (const s of [stops[0]!, stops[2]!, same]) s();
  assert.equal(periodicJobs(), 0, 'the timer goes with its last job');
});
