/**
 * The whole PV path through real worker-thread domains on real files: a guest's blkfront and a
 * driver domain's blkback, connected only by xenstore, grants, a shared ring and an event
 * channel, do random reads and writes of one sector to 4 MiB at queue depths 1..64, checked byte
 * for byte against a model; with indirect off, 32, 256 and 4096 segments, 512- and 4096-byte
 * sectors. Afterwards the image file equals the model and every grant, mapping and channel the
 * VBD used is gone.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Toolstack, backendMemory, type DomainProxy, type GuestDisk } from '../../src/toolstack/index.js';
import type { XenCounters } from '../../src/xen/index.js';
import { Rng, firstDifference, sparseImage, tempDir, verifiedBatch } from './helpers.js';

const IMAGE = 48 * 1024 * 1024;
const MAX_IO = 4 * 1024 * 1024;

let ts: Toolstack;
let back: DomainProxy;
let guest: DomainProxy;
const tmp = tempDir('blkif-e2e-');

before(async () => {
  ts = await Toolstack.start();
  back = await ts.createBackendDomain('driver-domain', backendMemory({ grantCopy: true }, 1));
  guest = await ts.createGuest();
});

after(async () => {
  await ts.shutdown();
  const c = ts.hv.counters();
  assert.deepEqual([c.grantsActive, c.mapsActive, c.channelsBound, c.portsOpen], [0, 0, 0, 0], 'everything released once the domains are gone');
  tmp.cleanup();
});

function resources(): number[] {
  const pick = (c: XenCounters | undefined) => [c!.grantsActive, c!.mapsActive, c!.portsOpen, c!.channelsBound];
  return [...pick(ts.hv.domainCounters(guest.domid)), ...pick(ts.hv.domainCounters(back.domid))];
}

/** Random I/O in batches of disjoint ranges (the batch size is the queue depth), checked against `model`. */
async function randomIo(disk: GuestDisk, model: Uint8Array, rng: Rng, batches: number, sector: number): Promise<void> {
  const size = model.length;
  for (let b = 0; b < batches; b++) {
    const depth = [1, 2, 8, 32, 64][rng.int(0, 4)]!;
    // Sizes from one sector to 4 MiB, mostly small (as real workloads are).
    const ranges: [number, number][] = [];
    for (let i = 0; i < depth; i++) {
      const big = rng.int(0, 9) === 0;
      const len = (big ? rng.int(1, MAX_IO / sector) : rng.int(1, Math.min(64, MAX_IO / sector))) * sector;
      const off = rng.int(0, (size - len) / sector) * sector;
      if (ranges.some(([o, l]) => off < o + l && o < off + len)) continue;
      ranges.push([off, len]);
    }
    await verifiedBatch(disk, model, rng, ranges);
    if (b % 8 === 7) await disk.flush();
  }
}

describe('blkfront <-> blkback over real domains and files', () => {
  const configs: { indirect: number; sector: 512 | 4096; protocol?: string; order?: number; persistent?: boolean; copy?: boolean; queues?: number; threads?: boolean }[] = [
    { indirect: 0, sector: 512 },
    { indirect: 32, sector: 512 },
    { indirect: 256, sector: 512 },
    { indirect: 4096, sector: 512 },
    { indirect: 0, sector: 4096 },
    { indirect: 256, sector: 4096 },
    { indirect: 4096, sector: 4096 },
    // A 32-bit guest's ring layout (108-byte entries), same behaviour.
    { indirect: 0, sector: 512, protocol: 'x86_32-abi' },
    { indirect: 256, sector: 512, protocol: 'x86_32-abi' },
    // Multi-page rings: entries straddle page boundaries from order 1 up.
    { indirect: 32, sector: 512, order: 1 },
    { indirect: 0, sector: 512, order: 2, protocol: 'x86_32-abi' },
    { indirect: 4096, sector: 512, order: 3 },
    { indirect: 256, sector: 4096, order: 4 },
    // Grant handling: persistent grants (the default) off, and grant copy instead of mapping.
    { indirect: 256, sector: 512, persistent: false },
    { indirect: 0, sector: 4096, persistent: false, order: 1 },
    { indirect: 256, sector: 512, copy: true },
    { indirect: 4096, sector: 4096, copy: true, queues: 2 },
    // Two queues, each its own ring and channel.
    { indirect: 256, sector: 512, queues: 2 },
    { indirect: 32, sector: 512, queues: 2, order: 2, persistent: false },
    // Queues in threads of their own (vCPUs of the driver domain), each with its own storage handle.
    { indirect: 256, sector: 512, queues: 2, threads: true },
    { indirect: 32, sector: 4096, queues: 4, order: 2, persistent: false, threads: true },
    { indirect: 256, sector: 512, queues: 2, copy: true, threads: true },
    { indirect: 0, sector: 512, protocol: 'x86_32-abi', threads: true },
  ];
  for (const cfg of configs) {
    const grants = cfg.copy === true ? 'grant copy' : cfg.persistent === false ? 'map per request' : 'persistent grants';
    test(`indirect ${cfg.indirect || 'off'}, ${cfg.sector}-byte sectors${cfg.protocol ? `, ${cfg.protocol}` : ''}, ring order ${cfg.order ?? 0}, ${cfg.queues ?? 1} queue(s)${cfg.threads === true ? ' in threads' : ''}, ${grants}`, async () => {
      const base = resources();
      const path = join(tmp.dir, `img-${configs.indexOf(cfg)}`);
      sparseImage(path, IMAGE);
      const disk = await ts.plug({
        guest, backend: back,
        storage: { kind: 'file', path, sectorSize: cfg.sector },
        backendOptions: { maxIndirectSegments: cfg.indirect, grantCopy: cfg.copy === true, queueThreads: cfg.threads === true },
        frontendOptions: {
          maxIndirectSegments: 4096, ringPageOrder: cfg.order ?? 0, persistent: cfg.persistent ?? true, queues: cfg.queues ?? 1,
          ...(cfg.protocol ? { protocol: cfg.protocol } : {}),
        },
      });
      const model = new Uint8Array(IMAGE);
      const rng = new Rng(0x5eed + cfg.indirect + cfg.sector);
      try {
        assert.equal(disk.info.size, IMAGE);
        assert.equal(disk.info.sectorSize, cfg.sector);
        assert.equal(disk.info.indirect, cfg.indirect > 0);
        assert.equal(disk.info.maxSegments, cfg.indirect > 0 ? cfg.indirect : 11);
        assert.equal(disk.info.protocol, cfg.protocol ?? 'x86_64-abi');
        assert.equal(disk.info.ringPageOrder, cfg.order ?? 0);
        assert.equal(disk.info.ringSize, 32 << (cfg.order ?? 0), '__CONST_RING_SIZE(blkif, 4096 << order)');
        assert.equal(disk.info.queues, cfg.queues ?? 1);
        assert.equal(disk.info.persistent, cfg.copy !== true && cfg.persistent !== false);
        await randomIo(disk, model, rng, 40, cfg.sector);
        // One large request of each kind across the whole maximum.
        const big = rng.bytes(MAX_IO);
        await disk.write(IMAGE - MAX_IO, big);
        model.set(big, IMAGE - MAX_IO);
        assert.equal(firstDifference(await disk.read(IMAGE - MAX_IO, MAX_IO), big), -1);
        await disk.flush();

        const fs = await disk.status();
        const bs = await disk.backendStatus();
        assert.equal(bs.state, 'Connected');
        if (cfg.threads === true) {
          assert.equal(new Set(bs.queueVcpus).size, cfg.queues ?? 1, 'one driver-domain vCPU per queue');
          assert.ok(bs.queueVcpus.every((v) => v > 0), 'none of them the domain\'s own thread');
        } else assert.deepEqual(bs.queueVcpus, []);
        assert.equal(bs.counters.errors, 0);
        assert.equal(fs.counters.errors, 0);
        assert.equal(bs.counters.rd_req + bs.counters.wr_req + bs.counters.f_req, fs.counters.requests);
        if (cfg.indirect > 0) assert.ok(bs.counters.indirect_req > 0, 'large I/O used indirect requests');
        else assert.equal(bs.counters.indirect_req, 0);
        assert.ok(bs.counters.peak_inflight_bytes > 0);
        const rings = (1 << disk.info.ringPageOrder) * disk.info.queues;
        assert.equal(bs.counters.grant_map_ops - bs.counters.grant_unmap_ops, rings + bs.counters.persistent_grants,
          'every data and indirect map undone but the rings and the persistent-grant cache');
        if (disk.info.persistent) {
          assert.ok(bs.counters.persistent_grants > 0, 'persistent grants were cached');
          assert.ok(bs.counters.persistent_grants_peak <= 1056 * disk.info.queues, 'the cache never exceeds its bound');
        } else assert.equal(bs.counters.persistent_grants_peak, 0);
        if (cfg.copy === true) {
          assert.ok(bs.counters.grant_copy_ops > 0);
          assert.equal(bs.counters.grant_map_ops, rings, 'grant copy maps nothing but the rings');
        }
        // Notification suppression: far fewer kicks than requests when the queue is deep.
        assert.ok(fs.counters.notify_sent < fs.counters.requests, `${fs.counters.notify_sent} kicks for ${fs.counters.requests} requests`);
      } finally {
        await disk.unplug();
      }
      assert.deepEqual(resources(), base, 'grants, mappings and channels back to where they were');
      const image = readFileSync(path);
      assert.equal(firstDifference(image, model), -1, 'the image file holds exactly what was written');
    });
  }

  test('a deep queue is answered in batches: both ends notify under once per 16 requests at QD32', async () => {
    const path = join(tmp.dir, 'img-batches');
    sparseImage(path, IMAGE);
    const disk = await ts.plug({ guest, backend: back, storage: { kind: 'file', path, sectorSize: 512 }, backendOptions: {}, frontendOptions: {} });
    try {
      const [f0, b0] = await Promise.all([disk.status(), disk.backendStatus()]);
      const r = await disk.workload({ pattern: 'randread', blockSize: 4096, depth: 32, ops: 6000 });
      const [f1, b1] = await Promise.all([disk.status(), disk.backendStatus()]);
      assert.equal(r.ops, 6000);
      const requests = b1.counters.rd_req - b0.counters.rd_req;
      assert.equal(requests, 6000);
      // blkfront arms rsp_event all but 12 answers ahead: a batch of 20 at QD32 (ring.h's + 1
      // gives a notification per push of blkback, every 8 answers or fewer).
      const backToFront = b1.counters.notify_sent - b0.counters.notify_sent;
      const frontToBack = f1.counters.notify_sent - f0.counters.notify_sent;
      assert.ok(backToFront < requests / 16, `${backToFront} notifications to the frontend for ${requests} requests`);
      assert.ok(frontToBack < requests / 16, `${frontToBack} notifications to the backend for ${requests} requests`);
    } finally {
      await disk.unplug();
    }
  });

  test('an image whose size is not a multiple of the sector size exposes whole sectors only', async () => {
    const path = join(tmp.dir, 'odd');
    sparseImage(path, 10 * 4096 + 1000);
    const disk = await ts.plug({ guest, backend: back, storage: { kind: 'file', path, sectorSize: 4096 } });
    try {
      assert.equal(disk.info.size, 10 * 4096);
      await disk.write(9 * 4096, new Uint8Array(4096).fill(0xab));
      await assert.rejects(disk.write(10 * 4096, new Uint8Array(4096)), /beyond the disk/);
    } finally {
      await disk.unplug();
    }
    const image = readFileSync(path);
    assert.equal(image.length, 10 * 4096 + 1000);
    assert.ok(image.subarray(10 * 4096).every((b) => b === 0), 'the partial sector at the end is never written');
    assert.ok(image.subarray(9 * 4096, 10 * 4096).every((b) => b === 0xab));
  });

  test('a read-only VBD reads, refuses writes and discards, and is never written', async () => {
    const path = join(tmp.dir, 'ro');
    sparseImage(path, 1024 * 1024);
    const disk = await ts.plug({ guest, backend: back, storage: { kind: 'file', path }, readOnly: true });
    try {
      assert.equal(disk.info.readOnly, true);
      assert.equal(disk.info.discard, false);
      assert.equal((await disk.read(0, 8192)).length, 8192);
      await assert.rejects(disk.write(0, new Uint8Array(512)), /read-only/);
      await assert.rejects(disk.discard(0, 4096), /read-only/);
      const bs = await disk.backendStatus();
      assert.equal(bs.readOnly, true);
    } finally {
      await disk.unplug();
    }
  });

  test('flush, discard and secure discard reach the file', async () => {
    const path = join(tmp.dir, 'discard');
    sparseImage(path, 4 * 1024 * 1024);
    const disk = await ts.plug({ guest, backend: back, storage: { kind: 'file', path } });
    try {
      const data = new Uint8Array(1024 * 1024).fill(0x5a);
      await disk.write(0, data);
      await disk.write(2 * 1024 * 1024, data);
      await disk.flush();
      await disk.discard(0, 1024 * 1024);
      await disk.discard(2 * 1024 * 1024, 512 * 1024, true);
      assert.ok((await disk.read(0, 1024 * 1024)).every((b) => b === 0));
      const rest = await disk.read(2 * 1024 * 1024, 1024 * 1024);
      assert.ok(rest.subarray(0, 512 * 1024).every((b) => b === 0));
      assert.ok(rest.subarray(512 * 1024).every((b) => b === 0x5a));
      const bs = await disk.backendStatus();
      assert.equal(bs.counters.ds_req, 2);
      assert.ok(bs.counters.f_req >= 1);
    } finally {
      await disk.unplug();
    }
  });
});
