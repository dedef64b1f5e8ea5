/**
 * `blkif serve`'s topology (DiskExport): every image is a disk of one guest (xvda, xvdb, ...,
 * xvdq onwards in the extended `virtual-device` form), all served by one driver domain, and the
 * NBD server in that guest exports each disk as vbdN: what a client writes to vbdN is on that
 * guest's disk N. Eighteen disks (two past xvdp) with small page pools keep it quick. The disks'
 * page pools share the guest's one grant table: six disks writing 1 MiB at depth 32 at once
 * (default pools would want 6 x 8192 grants of 32768) all succeed.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { NbdClient } from '../../src/nbd/index.js';
import { WORKLOAD_APPLICATION, guestWorkload } from '../../bench/harness/workload.js';
import { DiskExport, sharedFrontendOptions } from '../../src/product/index.js';
import { GNTTAB_NR_RESERVED_ENTRIES, NR_GRANT_ENTRIES } from '../../src/xen/index.js';
import { frontendPath, xvdVirtualDevice } from '../../src/xenbus/index.js';
import { assertReleased } from './helpers.js';

const N = 18;
const MiB = 1024 * 1024;
let exp: DiskExport | undefined;

before(async () => {
  exp = await DiskExport.start({
    images: Array.from({ length: N }, () => ({ kind: 'memory' as const, size: MiB })),
    frontendOptions: { bufferPages: 64 },
    listen: { host: '127.0.0.1', port: 0 },
  });
});

after(async () => {
  if (exp === undefined) return;
  await exp.stop();
  assertReleased(exp.ts.hv);
});

test('every image is a disk of the one guest, served by the one driver domain', async () => {
  const e = exp!;
  const others = e.ts.hv.domids.filter((d) => d !== 0).sort((a, b) => a - b);
  assert.deepEqual(others, [e.backend.domid, e.guest.domid].sort((a, b) => a - b), 'dom0, the driver domain and one guest');
  const devids = (await e.ts.xs.directory(`/local/domain/${e.guest.domid}/device/vbd`)).map(Number).sort((a, b) => a - b);
  const want = Array.from({ length: N }, (_, i) => xvdVirtualDevice(i));
  assert.deepEqual(devids, [...want].sort((a, b) => a - b), 'xvda .. xvdr in the guest');
  for (const [i, d] of e.disks.entries()) {
    assert.equal(d.guest, e.guest);
    assert.equal(d.backend, e.backend);
    assert.equal(d.paths.frontDir, frontendPath(e.guest.domid, want[i]!));
  }
});

test('what a client writes to vbdN is on the guest\'s disk N, for every N', async () => {
  const e = exp!;
  const base = e.uri.replace(/\/$/, '');
  const clients = await Promise.all(e.disks.map((_, i) => NbdClient.connect(`${base}/vbd${i}`)));
  try {
    await Promise.all(clients.map((c, i) => c.write(4096 * i, [new Uint8Array(4096).fill(i + 1)])));
    for (const c of clients) await c.flush();
  } finally {
    await Promise.all(clients.map((c) => c.close()));
  }
  for (const [i, d] of e.disks.entries()) {
    // Through the guest's blkfront, not the NBD server: the export is that disk.
    const got = await d.read(0, 4096 * N);
    for (let j = 0; j < N; j++) {
      const want = j === i ? i + 1 : 0;
      assert.ok(got.subarray(4096 * j, 4096 * (j + 1)).every((b) => b === want), `disk ${i} block ${j}: ${want}`);
    }
  }
});

test('the disks\' page pools share the guest\'s grant table: six disks at 1 MiB depth 32 at once all succeed', async () => {
  for (const n of [1, 2, 4, 6, 16, 64]) {
    const o = { bufferPages: 8192, queues: 1, ringPageOrder: 0, ...sharedFrontendOptions({}, n) };
    assert.ok(n * (o.bufferPages + 2) <= NR_GRANT_ENTRIES - GNTTAB_NR_RESERVED_ENTRIES, `${n} disks: ${o.bufferPages} pages each`);
  }
  assert.equal(sharedFrontendOptions({}, 1).bufferPages, 8192, 'one disk keeps the default');
  const six = await DiskExport.start({
    images: Array.from({ length: 6 }, () => ({ kind: 'memory' as const, size: 16 * MiB })),
    listen: { host: '127.0.0.1', port: 0 },
    guestApplications: [WORKLOAD_APPLICATION],
  });
  try {
    const results = await Promise.allSettled(six.disks.map((d) => guestWorkload(d, { pattern: 'write', blockSize: MiB, depth: 32, ops: 96 })));
    const failed = results.flatMap((r, i) => (r.status === 'rejected' ? [`vbd${i}: ${String(r.reason)}`] : []));
    assert.deepEqual(failed, []);
    for (const r of results) assert.equal((r as PromiseFulfilledResult<{ ops: number }>).value.ops, 96);
  } finally {
    await six.stop();
  }
});
