/**
 * The harness's user-facing side, for real but briefly: `blkif serve` as a child with two images,
 * fio with a job per VBD, its threads read from /proc by role, its counters from --metrics; and
 * the /proc parsing itself on a made-up stat line.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { Cleanup, createImage, tempDir } from '../../bench/harness/cleanup.js';
import { parseStatTicks, roleOf, sampleProcess, usageBetween, type ProcSample } from '../../bench/harness/procstat.js';
import { fioJobs, idleOf, observe, startServe } from '../../bench/harness/serve.js';
import { MiB } from '../../bench/harness/types.js';
import { needTools } from '../support/tools.js';

test('utime and stime are read after the name, whatever the name holds', () => {
  // Fields: pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
  assert.equal(parseStatTicks('42 (a) b (c) S 1 2 3 4 5 6 7 8 9 10 123 45 0 0 20 0 1 0'), 168);
  const t = (tid: number, comm: string) => ({ tid, comm, cpuSeconds: 0, sleeps: 0 });
  const driver = (c: string) => c.startsWith('driver');
  assert.equal(roleOf(t(7, 'node'), 7, driver), 'main thread');
  assert.equal(roleOf(t(8, 'node'), 7, driver), 'V8 and libuv helpers');
  assert.equal(roleOf(t(9, 'driver-domain'), 7, driver), 'driver domain');
  assert.equal(roleOf(t(10, 'driver-domai/2'), 7, driver), 'queue threads');
  assert.equal(roleOf(t(11, 'guest0'), 7, driver), 'guests (blkfront, NBD)');
  const a: ProcSample = { pid: 7, at: 0, threads: [{ ...t(9, 'driver-domain'), cpuSeconds: 1, sleeps: 10 }] };
  const b: ProcSample = { pid: 7, at: 1000, threads: [{ ...t(9, 'driver-domain'), cpuSeconds: 1.5, sleeps: 14 }, { ...t(11, 'guest0'), cpuSeconds: 0.25, sleeps: 3 }] };
  const u = usageBetween(a, b, driver);
  assert.deepEqual(u.get('driver domain'), { cpuSeconds: 0.5, sleeps: 4, threads: 1 });
  assert.deepEqual(u.get('guests (blkfront, NBD)'), { cpuSeconds: 0.25, sleeps: 3, threads: 1 });
  // This process: its first thread is the main thread, and it has spent some CPU by now.
  const me = sampleProcess(process.pid);
  assert.ok(me.threads.some((x) => x.tid === process.pid && x.cpuSeconds > 0));
});

describe('blkif serve as a user runs it', { timeout: 180_000 }, () => {
  needTools('fio');
  const c = new Cleanup();
  after(() => c.run());

  test('two images: ready, idle, a fio job per VBD, CPU by thread role, counters per I/O', async () => {
    const dir = tempDir(c, 'blkif-bench-serve-');
    const images = [0, 1].map((i) => join(dir, `img${i}`));
    for (const p of images) createImage(p, 8 * MiB);
    const s = await startServe(c, images, [], { metrics: true });
    assert.ok(s.readySeconds > 0);
    assert.match(s.uri(1), /^nbd:\/\/127\.0\.0\.1:\d+\/vbd1$/);
    const idle = await idleOf(s, 0.5);
    assert.ok(Number.isFinite(idle.cpuPercent), `idle CPU ${idle.cpuPercent}`);
    assert.ok(idle.rssBytes !== undefined && idle.rssBytes > 10 * MiB, `VmRSS ${idle.rssBytes}`);
    const o = await observe(s, () => fioJobs([s.uri(0), s.uri(1)], { pattern: 'randread', blockSize: 4096, depth: 4 }, 1));
    assert.equal(o.result.length, 2);
    for (const p of o.result) assert.ok(p.ops > 0 && p.iops > 0, JSON.stringify(p));
    // Domain threads are named after their domain: the driver domain and the guests did the work.
    assert.ok(o.cpu.get('driver domain')!.threads > 0, 'the driver domain thread is found by its name');
    assert.ok(o.cpu.get('guests (blkfront, NBD)')!.threads > 0, 'guest threads are found by their names');
    const reads = o.counters.get('blkif_vbd_rd_req_total') ?? 0;
    const ops = o.result[0]!.ops + o.result[1]!.ops;
    assert.ok(reads >= ops * 0.9 && reads <= ops * 1.1 + 64, `backend reads ${reads} for ${ops} fio reads`);
    await s.child.stop();
  });
});
