/**
 * The benchmark harness's own logic, without running benchmarks: the protocol matrix (future
 * options skipped, not failed), pool sizing within the grant table, baselines and targets from
 * given results, the built-in SVG charts, and a report written from a synthetic document.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { builtInSvg, labelFormat, renderChart, shortNumber } from '../../bench/harness/charts.js';
import { Cleanup, createImage, tempDir } from '../../bench/harness/cleanup.js';
import { GRANT_POOL_CAP, poolPagesFor, reachableInflight } from '../../bench/harness/guest.js';
import { configLabel, DEFAULT_CONFIG_LABEL, matrixConfigs, PROTOCOL_MATRIX } from '../../bench/harness/matrix.js';
import { computeTargets, fmtInt, fmtMiBps, linkBaselines, missedReading, renderText, threadsReading, writeReport } from '../../bench/harness/report.js';
import { GuestBench } from '../../bench/harness/guest.js';
import { measureThreads, THREADS_BUFFER_PAGES, THREADS_LAYOUTS, THREADS_WORKLOADS, ThreadsRuns } from '../../bench/harness/threads.js';
import { MiB, perfOf, type BenchDocument, type BenchResults, type Row, type Target, type TimeRow } from '../../bench/harness/types.js';

let dir: string;
before(() => (dir = mkdtempSync(join(tmpdir(), 'blkif-bench-test-'))));
after(() => rmSync(dir, { recursive: true, force: true }));

test('the matrix runs indirect x ring order x persistent grants x queues, and skips options blkback/blkfront lack', () => {
  const cs = matrixConfigs();
  const runnable = cs.filter((c) => c.missing === undefined);
  assert.equal(runnable.length, 32);
  for (const c of runnable) assert.equal(c.backendOptions.maxIndirectSegments, c.frontendOptions.maxIndirectSegments);
  assert.ok(runnable.some((c) => c.label === DEFAULT_CONFIG_LABEL));
  assert.ok(runnable.some((c) => c.frontendOptions.persistent === false && c.frontendOptions.queues === 2));
  // An axis naming an option that does not exist is skipped with a note, not run.
  const future = matrixConfigs([{ name: 'future', values: [{ tag: 'x', backend: { notAnOption: 1 } }] }]);
  assert.match(future[0]!.missing ?? '', /blkback option notAnOption/);
  // The plane the quick run keeps.
  assert.deepEqual(matrixConfigs(PROTOCOL_MATRIX.slice(0, 2)).map((c) => c.label).sort(), [0, 32, 256, 4096].flatMap((n) => [0, 4].map((o) => configLabel(n, o))).sort());
});

test('frontend pools fill the ring but stay within the grant table', () => {
  assert.equal(poolPagesFor(11, 32, 4 * MiB, 32), 32 * 11 + 64);
  assert.equal(poolPagesFor(256, 32, 4 * MiB, 32), 32 * 257 + 64);
  assert.equal(poolPagesFor(4096, 32, 16 * MiB, 32), GRANT_POOL_CAP);
  assert.equal(reachableInflight(11, 32, 4 * MiB, 32, 416), 11 * 32 * 4096);
  assert.equal(reachableInflight(4096, 32, 16 * MiB, 32, GRANT_POOL_CAP), 7 * 16 * MiB, 'seven 16 MiB requests fit the grant table');
  assert.equal(reachableInflight(4096, 32, 4 * MiB, 32, GRANT_POOL_CAP), 31 * 4 * MiB);
});

test('cleanup steps run newest first, once, and survive failures', async () => {
  const c = new Cleanup();
  const order: string[] = [];
  c.add('a', () => order.push('a'));
  const runB = c.add('b', () => order.push('b'));
  c.add('boom', () => { throw new Error('boom'); });
  c.add('c', () => order.push('c'));
  await runB();
  const errors: string[] = [];
  await c.run((m) => errors.push(m));
  await c.run();
  assert.deepEqual(order, ['b', 'c', 'a']);
  assert.equal(errors.length, 1);
});

function synthetic(): BenchDocument {
  const row = (id: string, mibps: number, extra: Partial<Row> = {}): Row => ({ id, label: id, perf: perfOf(mibps, mibps * MiB, 1, 10, 20), ...extra });
  const w1m = { pattern: 'read' as const, blockSize: MiB, depth: 1 };
  const w1m8 = { pattern: 'read' as const, blockSize: MiB, depth: 8 };
  const r4k = { pattern: 'randread' as const, blockSize: 4096, depth: 32 };
  const cost = { requests: 100, requestsPerIo: 1, feSentPerReq: 0.01, beReceivedPerReq: 0.01, beSentPerReq: 0.02, feReceivedPerReq: 0.02, notificationsPerReq: 0.03, grantMapsPerReq: 1, segmentsPerReq: 1, indirectShare: 0, requestsPerMiB: 256 };
  const nbd = (server: string, id: string, label: string, mibps: number) => row(`nbd/${server}/fio-${id}`, mibps, { config: server, label });
  const results: BenchResults = {
    api: [
      row('api/file/read-1m-qd1', 900, { storage: 'file', workload: w1m }),
      row('api/file/read-1m-qd8', 700, { storage: 'file', workload: w1m8 }),
      row('api/file/randread-4k-qd32', 60, { storage: 'file', workload: r4k, cost }),
    ],
    matrix: [
      row('m1', 400, { storage: 'file', config: configLabel(0, 0), workload: w1m8 }),
      row('m2', 1000, { storage: 'file', config: configLabel(256, 0), workload: w1m8 }),
    ],
    baselines: [row('base/file/read-1m-qd1', 1000, { workload: w1m }), row('base/file/read-1m-qd8', 1000, { workload: w1m8 }), row('base/file/randread-4k-qd32', 100, { workload: r4k })],
    inflight: [{ config: configLabel(0, 0), indirect: 0, ringPageOrder: 0, segments: 11, slots: 32, limitBytes: 11 * 32 * 4096, limitAtBlockBytes: 11 * 32 * 4096, reachableBytes: 11 * 32 * 4096, blockSize: 4 * MiB, depth: 32, bufferPages: 416, grantCapped: false, measured: { async: { peakBytes: 11 * 32 * 4096, mibps: 500, ops: 64 } } }],
    nbd: [
      nbd('blkif serve', 'randread-4k-qd32', 'fio 4 KiB random read QD32', 30), nbd('qemu-nbd', 'randread-4k-qd32', 'fio 4 KiB random read QD32', 20),
      nbd('nbdkit file', 'randread-4k-qd32', 'fio 4 KiB random read QD32', 40),
      nbd('blkif serve', 'read-1m-qd32', 'fio 1 MiB seq read QD32', 1194.27), nbd('qemu-nbd', 'read-1m-qd32', 'fio 1 MiB seq read QD32', 900),
      nbd('nbdkit file', 'read-1m-qd32', 'fio 1 MiB seq read QD32', 29.4),
      // QD1: latency (p50, p99 µs) is what counts; perfOf(ops, bytes, seconds, p50, p99).
      ...([['blkif serve', 60, 300], ['qemu-nbd', 30, 100], ['nbdkit file', 20, 150]] as const).map(([server, p50, p99]) => ({
        id: `nbd/${server}/fio-randread-4k-qd1`, label: 'fio 4 KiB random read QD1', config: server,
        workload: { pattern: 'randread' as const, blockSize: 4096, depth: 1 }, perf: perfOf(1000, 1000 * 4096, 1, p50, p99),
      })),
    ],
    scaling: [],
    serveScaling: [
      { vbds: 1, iops: 1000, mibps: 4, perVbd: [1000], worstDeviation: 0, p50us: 1, p99us: 2, ratio: 1 },
      { vbds: 16, iops: 1600, mibps: 6.4, perVbd: [...Array<number>(15).fill(105), 25], worstDeviation: 0.75, p50us: 1, p99us: 2, ratio: 1.6 },
    ],
    startup: [
      { images: 1, readySeconds: 1.5, idleSeconds: 3, idleCpuPercent: 0.4, rssBytes: 200 * MiB },
      { images: 16, readySeconds: 9, idleSeconds: 3, idleCpuPercent: 1.2, rssBytes: 500 * MiB },
    ],
    isolation: { delayMs: 200, workload: { pattern: 'randread', blockSize: 4096, depth: 8 }, slowWorkload: { pattern: 'randread', blockSize: 4096, depth: 8 },
      alone: perfOf(5000, 5000 * 4096, 1, 100, 900), beside: perfOf(4000, 4000 * 4096, 1, 120, 1500), slow: perfOf(40, 40 * 4096, 1, 200_000, 210_000) },
    inflightNbd: [
      { indirect: 0, ringPageOrder: 0, segments: 11, slots: 32, bytesInFlight: 11 * 32 * 4096, perf: perfOf(100, 100 * MiB, 1, 300_000, 600_000), peakBytes: 11 * 32 * 4096, cpuPercent: 80 },
      { indirect: 256, ringPageOrder: 0, segments: 256, slots: 32, bytesInFlight: 32 * MiB, perf: perfOf(600, 600 * MiB, 1, 50_000, 90_000), peakBytes: 31 * MiB, cpuPercent: 150 },
    ],
    inflightNbdStorage: { threads: 256, perf: perfOf(2000, 2000 * MiB, 1, 11_000, 15_000) },
    time: [
      { where: 'blkfront API', workload: r4k, perf: perfOf(1000, 1000 * 4096, 1, 10, 20), per: 'ring request', count: 1000,
        cpuUs: { 'guests (blkfront, NBD)': 10, 'driver domain': 30, 'queue threads': 0, 'main thread': 1, 'V8 and libuv helpers': 2 },
        sleeps: { 'guests (blkfront, NBD)': 0.1, 'driver domain': 0.05 }, feToBe: 0.02, beToFe: 0.06, xenSleeps: { guest: 0.05, backend: 0.02 },
        grantMaps: 0.02, grantCopies: 0, copyBytes: 0, scavengesPerK: { guest: 0, backend: 0.7 } },
    ],
    threads: [
      { layout: '1 VBD x 2 queues', workload: r4k, inThread: { iops: 10000, mibps: 39, p50us: 100, p99us: 300 }, threaded: { iops: 8000, mibps: 31.2, p50us: 150, p99us: 400 }, ratio: 0.8 },
      { layout: '4 VBDs x 1 queue', workload: w1m8, inThread: { iops: 500, mibps: 500, p50us: 1000, p99us: 3000 }, threaded: { iops: 600, mibps: 600, p50us: 900, p99us: 2000 }, ratio: 1.2 },
    ],
    skipped: [],
    micro: [],
  };
  linkBaselines(results);
  return {
    tool: 'blkif bench', startedAt: '2026-01-01T00:00:00.000Z', seconds: 1, quick: true, command: 'blkif bench --quick',
    machine: { cpuModel: 'cpu', cpus: 2, totalMemoryBytes: 1 << 30, node: 'v20', os: 'Linux', kernel: '6', arch: 'x64', loadAverageAtStart: [0, 0, 0], tools: {} },
    parameters: { imageDir: '/dev/shm', imageOnTmpfs: true, threadsMs: 150, threadsBufferPages: 2120, inflightDelayMs: 10, serveImageBytes: 32 * MiB }, results, targets: computeTargets(results), report: undefined,
  };
}

test('figures get their baselines as ratios, and the targets follow from them', () => {
  const doc = synthetic();
  const r = doc.results;
  assert.equal(r.api[0]!.baseline?.ratio, 0.9);
  assert.equal(r.matrix[1]!.baseline?.ratio, 2.5);
  assert.equal(r.matrix[0]!.baseline, undefined, 'classic is the baseline itself');
  assert.equal(r.nbd[0]!.baseline?.ratio, 1.5);
  const t = new Map(doc.targets.map((x) => [x.name, x]));
  assert.equal(doc.targets.length, 13, 'issue 17 names twelve targets, issue 23 adds QD1 latency');
  const check = (name: string, met: boolean | undefined, value?: number) => {
    const x = t.get(name);
    assert.ok(x !== undefined, `no target ${name}`);
    assert.equal(x.met, met, name);
    if (value !== undefined) assert.ok(Math.abs(x.value! - value) < 1e-9, `${name}: ${x.value} != ${value}`);
  };
  check('blkfront API: 1 MiB sequential read QD8 vs direct pread', true, 0.7);
  check('notifications per request at QD32, frontend -> backend', true, 0.01);
  check('notifications per request at QD32, backend -> frontend', true, 0.02);
  check('NBD: blkif serve vs nbdkit file, 4 KiB random read QD32', false, 0.75);
  check('NBD: blkif serve vs nbdkit file, 1 MiB sequential read QD32', true);
  check('NBD: blkif serve vs qemu-nbd, 4 KiB random read QD32', true, 1.5);
  check('NBD: blkif serve vs qemu-nbd, 1 MiB sequential read QD32', true);
  check('NBD: blkif serve vs qemu-nbd, 4 KiB random write QD32', undefined);
  check('scaling: 16 VBDs aggregate vs one VBD', true, 1.6);
  check('scaling fairness: every VBD within 25% of the mean', false, 0.75);
  check('resident memory per VBD beyond the first', true, 20);
  check('bytes in flight: indirect 256 vs classic', true, 6);
  check('NBD: blkif serve vs nbdkit file, 4 KiB random read QD1, p50 latency', false, 3);
  // Targets read in their own units.
  const md = renderText(doc);
  assert.match(md, /scaling fairness: every VBD within 25% of the mean\s+<= 25%\s+75%\s+not met/);
  assert.match(md, /resident memory per VBD beyond the first\s+<= 32 MiB\s+20\.0 MiB\s+met/);
});

test('the built-in chart is a well-formed SVG with a bar per value', () => {
  const svg = builtInSvg({ title: 't <&>', unit: 'MiB/s', groups: ['a', 'b'], series: ['x', 'y'], values: [[1, 2], [3, undefined]] });
  assert.match(svg, /^<svg [^>]*xmlns="http:\/\/www.w3.org\/2000\/svg"/);
  assert.match(svg, /t &lt;&amp;&gt;/);
  assert.equal((svg.match(/<rect x=[^>]*><title>/g) ?? []).length, 3);
  assert.match(svg, /<\/svg>\n$/);
});

test('chart labels read like the tables: 1,194 MiB/s, not 1.19k', async () => {
  assert.deepEqual([1194.27, 51300, 100, 99.5, 0.523, 3].map(shortNumber), ['1,194', '51,300', '100', '99.5', '0.52', '3']);
  assert.equal(labelFormat([0.5, 1194.27]), ',.0f');
  assert.equal(labelFormat([0.5, 1.25]), '.2~f');
  const chart = { title: 't', unit: 'MiB/s', groups: ['a'], series: ['x', 'y', 'z'], values: [[1194.27, 51300, 29.4]], format: fmtMiBps };
  assert.match(builtInSvg(chart), />1,194<\/text>/);
  const { svg, renderer } = await renderChart(chart);
  assert.equal(renderer, 'vega-lite');
  assert.match(svg, />1,194</);
  assert.match(svg, />51,300</);
  assert.match(svg, />29\.4</, 'small values keep the tables\' precision beside big ones');
  assert.doesNotMatch(svg, /1\.19k|51\.3k|>29</);
  // Axis labels too: thousands with commas, no SI suffix.
  const { svg: big } = await renderChart({ title: 't', unit: 'IOPS', groups: ['a', 'b'], series: ['x'], values: [[45945], [53323]], format: fmtInt });
  assert.match(big, />45,945</);
  assert.match(big, />50,000</);
  assert.doesNotMatch(big, /\d(\.\d+)?k</);
});

test('a report is written with its charts, and the latest copy links them', async () => {
  const doc = synthetic();
  const path = await writeReport(doc, join(dir, 'results'), join(dir, 'latest'));
  const md = readFileSync(path, 'utf8');
  assert.match(md, /## Targets/);
  assert.match(md, /!\[Scaling by VBD count\]\(\.\/scaling\.svg\)/);
  assert.ok(existsSync(join(path, '..', 'scaling.svg')));
  // What a user sees, and where the time goes.
  assert.match(md, /## Where the time goes/);
  assert.match(md, /\| blkfront API \| 4 KiB random read QD32 \| 1,000 IOPS \| ring request \| 10\.0 \| 30\.0 \| 0\.0 \| 1\.0 \| 2\.0 \| 43\.0 \|/);
  assert.match(md, /43\.0 µs of CPU per ring request, 70% of it in the driver domain/);
  assert.match(md, /\| fio 1 MiB seq read QD32 \| blkif serve \|.*\| 1\.33x \| 40\.6x \|/);
  assert.match(md, /\| 16 \| 9\.0 \| 1\.2 \| 3 \| 500 MiB \| 20\.0 \|/);
  assert.match(md, /\| 16 \| 1,600 \| 6\.40 \| 1\.60x \| 0\.25x \| 1\.05x \| 75% \|/);
  assert.match(md, /\| vbd1 \(image file\) beside busy vbd0 \| 4,000 \|.*\| 0\.80x \|/);
  assert.match(md, /\| indirect 256, ring order 0 \| 256 x 32 \| 32 MiB \| 32 MiB \| 600 \| 6\.00x \| 31 MiB \| 1,600 \| 150 \|/);
  // A document without inflightNbdThreads ran nbdkit's default 16 threads.
  assert.match(md, /would hold classic \(11-segment requests\) to 68\.8 MiB\/s, so indirect 256 meets 5x classic at 500 MiB\/s or more/);
  assert.match(md, /\| the storage alone \(fio straight at nbdkit\) \| – \| – \| 32 MiB \| 2,000 \| 20\.0x \| – \| 1,600 \| – \| 11,000 \| 15,000 \|/);
  assert.match(md, /the storage alone, the same fio job straight at it, gave 2,000 MiB\/s/);
  // QD1: each server's latency, blkif serve's as ratios of nbdkit's and qemu-nbd's (lower is better).
  assert.match(md, /\| fio 4 KiB random read QD1 \| blkif serve \| 60\.0 \| 300 \| 3\.00x \| 2\.00x \| 2\.00x \| 3\.00x \|/);
  assert.match(md, /\| fio 4 KiB random read QD1 \| nbdkit file \| 20\.0 \| 150 \| 1\.00x \(baseline\) \| 1\.00x \(baseline\) \| 0\.67x \| 1\.50x \|/);
  assert.match(md, /kept about 6 MiB in service on average/);
  for (const f of ['nbd-servers.svg', 'bytes-in-flight.svg']) assert.ok(existsSync(join(path, '..', f)), f);
  assert.ok(existsSync(join(path, '..', 'results.json')));
  const latest = readFileSync(join(dir, 'latest', 'REPORT.md'), 'utf8');
  assert.match(latest, /\(report\/scaling\.svg\)/);
  assert.ok(existsSync(join(dir, 'latest', 'report', 'nbd-servers.svg')));
  assert.match(renderText(doc), /targets/);
  // Queues in threads: a section with its table, its chart and a sentence of reading.
  assert.match(md, /## \d+\. Queues in threads/);
  assert.match(md, /\| 4 VBDs x 1 queue \| 1 MiB seq read QD8 \| 500 MiB\/s \|.*\| 1\.20x \|/);
  assert.match(md, /!\[Queues in threads\]\(\.\/queues-in-threads\.svg\)/);
  assert.ok(existsSync(join(path, '..', 'queues-in-threads.svg')));
  assert.match(md, /2-CPU machine a thread per queue buys 1\.20x on 4 VBDs x 1 queue.*more threads than cores contend/);
  const text = renderText(doc);
  assert.match(text, /queues in threads/);
  assert.match(text, /1 VBD x 2 queues\s+4 KiB random read QD32\s+10,000 IOPS/);
  const saved = JSON.parse(readFileSync(join(path, '..', 'results.json'), 'utf8')) as BenchDocument;
  assert.equal(saved.results.threads.length, 2);
});

test('documents written before the queues-in-threads section still render', async () => {
  const doc = synthetic();
  delete (doc.results as Partial<BenchResults>).threads;
  assert.doesNotMatch(renderText(doc), /queues in threads/);
  assert.equal(threadsReading(doc), '');
  const md = readFileSync(await writeReport(doc, join(dir, 'old'), undefined), 'utf8');
  assert.doesNotMatch(md, /Queues in threads/);
});

test('queues in threads: both layouts run in both modes, and the backend uses queue vCPUs only when asked', async () => {
  const c = new Cleanup();
  try {
    const image = join(tempDir(c, 'blkif-bench-threads-'), 'img');
    createImage(image, 16 * MiB);
    const g = await GuestBench.start(c);
    const guests = await Promise.all([0, 1, 2, 3].map((i) => g.guest(`threads-${i}`, THREADS_BUFFER_PAGES + 1024)));
    const runs = new ThreadsRuns();
    for (const l of THREADS_LAYOUTS) {
      for (const threaded of [false, true]) {
        runs.record(l.layout, threaded, await measureThreads(g, l.vbds === 1 ? guests.slice(0, 1) : guests, { kind: 'file', path: image, sectorSize: 512 }, 16 * MiB, l, threaded, 60));
      }
    }
    const rows = runs.rows();
    assert.equal(rows.length, THREADS_LAYOUTS.length * THREADS_WORKLOADS.length);
    for (const r of rows) {
      assert.ok(r.inThread.iops > 0 && r.threaded.iops > 0, `${r.layout}: ${JSON.stringify(r)}`);
      assert.ok(Number.isFinite(r.ratio) && r.ratio > 0);
    }
  } finally {
    await c.run();
  }
});

test('a speed target not met is read against the profile row of its own path and workload', () => {
  const target = (name: string, met: boolean): Target => ({ name, goal: '>= 1.0x', value: 0.3, threshold: 1, kind: '>=', met, detail: '' });
  const row = (where: string, pattern: 'randread' | 'read', blockSize: number, guest: number): TimeRow => ({
    where, workload: { pattern, blockSize, depth: 32 }, perf: perfOf(1000, 1000 * blockSize, 1, 1, 2), per: 'I/O', count: 1000,
    cpuUs: { guest, backend: 10 }, sleeps: { guest: 1, backend: 1 }, grantMaps: 200,
  });
  const rows = [row('blkif serve', 'randread', 4096, 40), row('blkif serve', 'read', MiB, 500), row('blkfront API', 'randread', 4096, 7)];
  const lines = missedReading([
    target('NBD: blkif serve vs nbdkit file, 4 KiB random read QD32', false),
    target('NBD: blkif serve vs nbdkit file, 1 MiB sequential read QD32', false),
    target('scaling: 16 VBDs aggregate vs one VBD', true),
  ], rows);
  assert.equal(lines.length, 2, 'one line per target not met, none for one met');
  assert.match(lines[0]!, /4 KiB random read QD32.*: 50\.0 µs of CPU per I\/O/, 'the 4 KiB target reads the serve 4 KiB row (40 + 10 µs)');
  assert.match(lines[0]!, /two threads/);
  assert.match(lines[1]!, /: 510 µs of CPU per I\/O.*200 grant maps/, 'the 1 MiB target reads the serve 1 MiB row');
  assert.match(lines[1]!, /persistent-grant cache/);
});
