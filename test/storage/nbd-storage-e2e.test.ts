/**
 * The whole stack on remote storage: a guest's blkfront and a driver domain's blkback (worker
 * threads, its two queues in threads of their own, grants, shared rings, event channels), the
 * VBD's bytes on nbdkit's memory plugin over
 * NBD. Random writes and reads through the guest, checked against a model and then read back
 * straight from the NBD server; unplug; shutdown releases everything.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { NbdStorage } from '../../src/storage/index.js';
import { Toolstack } from '../../src/toolstack/index.js';
import { Rng, assertReleased, firstDifference, verifiedBatch } from '../e2e/helpers.js';
import { tempDir } from './helpers.js';
import { ServerProcess } from './nbd-support.js';
import { requireTools } from '../support/tools.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;

test('guest disk on an NBD export (nbdkit memory): verified I/O through blkfront and blkback, unplug, shutdown', async () => {
  requireTools('nbdkit');
  const tmp = tempDir('blkif-nbd-e2e-');
  const srv = await ServerProcess.nbdkit({ socket: join(tmp.dir, 'nbd.sock') }, ['memory', `${SIZE}`]);
  const ts = await Toolstack.start();
  try {
    const back = await ts.createBackendDomain();
    const guest = await ts.createGuest();
    // Two queues in threads of their own, each with its own connections (the server allows multi-conn).
    const disk = await ts.plug({
      guest, backend: back, storage: { kind: 'nbd', uri: srv.uri(), connections: 2 },
      backendOptions: { queueThreads: true }, frontendOptions: { maxIndirectSegments: 256, queues: 2 },
    });
    assert.equal((await disk.backendStatus()).queueVcpus.length, 2);
    const model = new Uint8Array(SIZE);
    const rng = new Rng(0xb10c);
    assert.equal(disk.info.size, SIZE);
    assert.equal(disk.info.sectorSize, 512);
    for (let b = 0; b < 12; b++) {
      const ranges: [number, number][] = [];
      for (let i = 0; i < 16; i++) {
        const len = rng.int(1, rng.int(0, 3) === 0 ? 2048 : 64) * 512;
        const off = rng.int(0, (SIZE - len) / 512) * 512;
        if (!ranges.some(([o, l]) => off < o + l && o < off + len)) ranges.push([off, len]);
      }
      await verifiedBatch(disk, model, rng, ranges);
      if (b % 4 === 3) await disk.flush();
    }
    await disk.discard(MiB, MiB);
    model.fill(0, MiB, 2 * MiB);
    assert.equal(firstDifference(await disk.read(0, 4 * MiB), model.subarray(0, 4 * MiB)), -1);
    const bs = await disk.backendStatus();
    assert.equal(bs.state, 'Connected');
    assert.equal(bs.counters.errors, 0);
    await disk.unplug();

    // What the guest wrote is on the server.
    const direct = await NbdStorage.connect(srv.uri());
    try {
      const all = new Uint8Array(SIZE);
      await direct.read(0, [all]);
      assert.equal(firstDifference(all, model), -1, 'the export holds what the guest wrote');
    } finally {
      await direct.close();
    }
  } finally {
    await ts.shutdown();
    await srv.kill();
    tmp.cleanup();
  }
  assertReleased(ts.hv);
});
