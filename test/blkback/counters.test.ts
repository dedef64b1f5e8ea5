/**
 * Per-VBD counters shared between a queue thread (the writer) and the control path (the reader):
 * a write in one thread is seen in another through the SharedArrayBuffer, names map one to one,
 * and a VBD's total is the sum of its parts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Worker } from 'node:worker_threads';
import fc from 'fast-check';
import { VBD_COUNTER_NAMES, newVbdCounters, sharedVbdCounters, sumVbdCounters, type VbdCounters } from '../../src/blkback/index.js';

test('every counter has its own slot, and reads back what was written', () => {
  const { counters } = sharedVbdCounters();
  assert.deepEqual(Object.keys(counters).sort(), [...VBD_COUNTER_NAMES].sort());
  VBD_COUNTER_NAMES.forEach((n, i) => { counters[n] = i + 1; });
  VBD_COUNTER_NAMES.forEach((n, i) => assert.equal(counters[n], i + 1, n));
  counters.rd_req++;
  counters.wr_sect += 8;
  assert.equal(counters.rd_req, VBD_COUNTER_NAMES.indexOf('rd_req') + 2);
  assert.equal(counters.wr_sect, VBD_COUNTER_NAMES.indexOf('wr_sect') + 9);
});

test('a second view over the same buffer (another thread\'s) sees the writes', () => {
  const a = sharedVbdCounters();
  const b = sharedVbdCounters(a.buffer);
  a.counters.indirect_req = 7;
  a.counters.peak_inflight_bytes = 2 ** 40;
  assert.equal(b.counters.indirect_req, 7);
  assert.equal(b.counters.peak_inflight_bytes, 2 ** 40);
});

test('a worker thread\'s increments reach the reader', async () => {
  const { counters, buffer } = sharedVbdCounters();
  // The writer runs the same module in another thread, as a queue thread does.
  const src = `
    const { workerData } = await import('node:worker_threads');
    const { sharedVbdCounters } = await import(${JSON.stringify(new URL('../../src/blkback/counters.js', import.meta.url).href)});
    const c = sharedVbdCounters(workerData).counters;
    for (let i = 0; i < 1000; i++) { c.rd_req++; c.rd_sect += 8; }
  `;
  const w = new Worker(new URL(`data:text/javascript,${encodeURIComponent(src)}`), { workerData: buffer });
  await new Promise<void>((resolve, reject) => { w.once('exit', () => resolve()); w.once('error', reject); });
  assert.equal(counters.rd_req, 1000);
  assert.equal(counters.rd_sect, 8000);
});

test('sumVbdCounters adds field by field', () => {
  const counter = fc.record(Object.fromEntries(VBD_COUNTER_NAMES.map((n) => [n, fc.nat(1e9)])) as Record<keyof VbdCounters, fc.Arbitrary<number>>);
  fc.assert(fc.property(fc.array(counter, { maxLength: 5 }), (parts) => {
    const sum = sumVbdCounters(parts);
    for (const n of VBD_COUNTER_NAMES) assert.equal(sum[n], parts.reduce((s, p) => s + p[n], 0), n);
  }));
  assert.deepEqual(sumVbdCounters([]), newVbdCounters());
});
