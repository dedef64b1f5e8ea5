/**
 * A disk that shrinks under a connected guest, and `physical-sector-size` from the storage:
 * - an image file truncated while I/O past the new end is in flight at the storage, or still
 *   queued in the frontend: all of it fails with EIO (never hangs), later I/O past the end fails
 *   EINVAL at once, and what is inside the new size is intact;
 * - an NBD-backed VBD follows the export's size as the server reports it (NBD has no resize
 *   notice: the storage asks again with NBD_OPT_INFO), growing and shrinking, and its
 *   `physical-sector-size` is the export's preferred block size (NBD_INFO_BLOCK_SIZE).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { truncateSync } from 'node:fs';
import { join } from 'node:path';
import { XS_PHYSICAL_SECTOR_SIZE } from '../../src/abi/index.js';
import type { Blkback, BlkbackOptions } from '../../src/blkback/index.js';
import { BlkfrontError, type Blkfront, type BlkfrontOptions } from '../../src/blkfront/index.js';
import { NbdServer, type NbdExportDevice } from '../../src/nbd/index.js';
import { FileStorage, NbdStorage, type BlockStorage, type StorageSpec } from '../../src/storage/index.js';
import { Rng, fileToolstack, firstDifference, sparseImage, tempDir, withLocalDisk } from './helpers.js';
import { eventually, within } from './raw-frontend.js';

const MiB = 1024 * 1024;
const TIMEOUT = { timeout: 120_000 };
const tmp = tempDir('blkif-shrink-');
const suite = fileToolstack(() => tmp.cleanup());

/** A storage passing everything through, holding reads and writes at or past `holdFrom` while `hold` is set. */
class Gate implements BlockStorage {
  hold = false;
  holdFrom = Infinity;
  readonly held: (() => void)[] = [];
  constructor(private readonly s: BlockStorage) {}
  get size(): number { return this.s.size; }
  get sectorSize(): number { return this.s.sectorSize; }
  get physicalSectorSize(): number | undefined { return this.s.physicalSectorSize; }
  get readOnly(): boolean { return this.s.readOnly; }
  get canDiscard(): boolean { return this.s.canDiscard; }
  private async gate(offset: number): Promise<void> {
    if (this.hold && offset >= this.holdFrom) await new Promise<void>((r) => this.held.push(r));
  }
  async read(o: number, b: readonly Uint8Array[]): Promise<void> { await this.gate(o); return this.s.read(o, b); }
  async write(o: number, b: readonly Uint8Array[]): Promise<void> { await this.gate(o); return this.s.write(o, b); }
  flush(): Promise<void> { return this.s.flush(); }
  discard(o: number, l: number): Promise<void> { return this.s.discard(o, l); }
  writeZeroes(o: number, l: number): Promise<void> { return this.s.writeZeroes(o, l); }
  refreshSize(now?: boolean): Promise<number> { return this.s.refreshSize(now); }
  close(): Promise<void> { return this.s.close(); }
  release(): void {
    this.hold = false;
    for (const r of this.held.splice(0)) r();
  }
}

/** Blkback (over `storage`) and Blkfront in two local domains; `body` gets the frontend. */
function withDisk(storage: BlockStorage, o: { front?: Partial<BlkfrontOptions>; back?: Partial<BlkbackOptions>; source?: StorageSpec },
  body: (f: Blkfront, backDir: string, be: Blkback) => Promise<void>): Promise<void> {
  return withLocalDisk(suite.ts, {
    storage, ...(o.source === undefined ? {} : { storageSpec: o.source }), guestPages: 2048, backendVcpus: 4,
    back: { housekeepingMs: 20, ...o.back }, front: { bufferPages: 1024, connectTimeoutMs: 10_000, ...o.front },
  }, async ({ f, paths, be }) => {
    try {
      await body(f, paths.backDir, be);
    } finally {
      if (storage instanceof Gate) storage.release();
    }
  });
}

const code = (e: unknown) => (e instanceof BlkfrontError ? e.code : `not a BlkfrontError: ${String(e)}`);

test('an image file shrunk with I/O past the new end in flight and queued: that I/O fails EIO, later I/O EINVAL, the rest intact', TIMEOUT, async () => {
  const path = join(tmp.dir, 'shrink.img');
  const size = 8 * MiB;
  const kept = 4 * MiB;
  sparseImage(path, size);
  const file = await FileStorage.open(path);
  const gate = new Gate(file);
  // No indirect: a 2 MiB write is 47 requests, more than the ring holds, so part of it waits in the frontend.
  await withDisk(gate, { front: { maxIndirectSegments: 0 } }, async (f, backDir, be) => {
    assert.equal(f.info.size, size);
    assert.equal(f.info.physicalSectorSize, 512, 'a file reports its logical sector size');
    assert.equal(await suite.ts.xs.read(`${backDir}/${XS_PHYSICAL_SECTOR_SIZE}`), '512');
    const rng = new Rng(8);
    const model = rng.bytes(size);
    for (let at = 0; at < size; at += MiB) await f.write(at, model.subarray(at, at + MiB));

    gate.holdFrom = kept;
    gate.hold = true;
    const past: Promise<unknown>[] = [
      f.write(kept, rng.bytes(2 * MiB)),
      f.read(6 * MiB, 64 * 1024),
      f.write(7 * MiB, rng.bytes(4096)),
    ];
    const outcomes = past.map((p) => p.then(() => 'ok', code));
    await eventually(() => gate.held.length > 0 && f.inFlight === f.info.ringSize, 'the ring full of I/O held at the storage');
    // Inside the new size, queued behind them (the ring is full): it must still complete.
    const inside = rng.bytes(64 * 1024);
    const insideDone = f.write(MiB, inside);
    model.set(inside, MiB);

    truncateSync(path, kept);
    await eventually(() => f.info.size === kept, 'the frontend learns the new size');
    gate.release();
    assert.deepEqual(await within(Promise.all(outcomes), 'I/O past the new end settles'), ['EIO', 'EIO', 'EIO']);
    await within(insideDone, 'the write inside the new size');
    assert.ok(be.counters.errors > 0);

    // Later I/O past the end (or across it) is refused before it reaches the ring.
    const requests = f.counters.requests;
    await assert.rejects(f.write(kept, new Uint8Array(4096)), (e) => code(e) === 'EINVAL');
    await assert.rejects(f.read(kept - 4096, 8192), (e) => code(e) === 'EINVAL');
    assert.equal(f.counters.requests, requests);
    assert.equal(firstDifference(await f.read(0, kept), model.subarray(0, kept)), -1, 'what is left is as written');
    assert.equal(f.inFlight, 0);
  });
});

/** An NBD export whose size can change, as a server sees its file truncated or extended. */
class ResizableDevice implements NbdExportDevice {
  bytes: Uint8Array;
  readonly readOnly = false;
  readonly blockSize = 512;
  readonly canFlush = true;
  readonly canTrim = false;
  readonly multiConn = true;
  constructor(size: number) { this.bytes = new Uint8Array(size); }
  get size(): number { return this.bytes.length; }
  resize(size: number): void {
    const b = new Uint8Array(size);
    b.set(this.bytes.subarray(0, Math.min(size, this.bytes.length)));
    this.bytes = b;
  }
  async read(offset: number, length: number): Promise<Uint8Array> { return this.bytes.slice(offset, offset + length); }
  async write(offset: number, data: Uint8Array): Promise<void> { this.bytes.set(data, offset); }
  async flush(): Promise<void> {}
  async trim(): Promise<void> {}
  async writeZeroes(offset: number, length: number): Promise<void> { this.bytes.fill(0, offset, offset + length); }
}

// With queue threads, each thread's own connection asks for the size when told it changed.
for (const threads of [false, true]) test(`an NBD-backed VBD follows the export as it grows and shrinks; physical-sector-size is its preferred block size${threads ? ' (2 queues in threads of their own)' : ''}`, TIMEOUT, async () => {
  const dev = new ResizableDevice(8 * MiB);
  const server = new NbdServer({ exports: [{ name: 'disk', device: dev }] });
  const logs: string[] = [];
  let nbd: NbdStorage | undefined;
  try {
    const sock = join(tmp.dir, 'nbd.sock');
    await server.listen({ path: sock });
    nbd = await NbdStorage.connect(`nbd+unix:///disk?socket=${encodeURIComponent(sock)}`, { sizeCheckMs: 30, log: (m) => logs.push(m) });
    assert.equal(nbd.info.blockSize?.preferred, 4096);
    assert.equal(nbd.physicalSectorSize, 4096);
    const uri = nbd.where;
    const source: StorageSpec = { kind: 'nbd', uri };
    await withDisk(nbd, threads ? { front: { queues: 2 }, back: { queueThreads: true }, source } : {}, async (f, backDir, be) => {
      assert.equal(be.queueVcpus.length, threads ? 2 : 0);
      assert.equal(await suite.ts.xs.read(`${backDir}/${XS_PHYSICAL_SECTOR_SIZE}`), '4096');
      assert.equal(f.info.physicalSectorSize, 4096);
      const rng = new Rng(9);
      const a = rng.bytes(MiB);
      await f.write(7 * MiB, a);

      dev.resize(12 * MiB);
      await eventually(() => f.info.size === 12 * MiB, 'the frontend sees the export grow');
      const b = rng.bytes(MiB);
      await f.write(11 * MiB, b);
      assert.equal(firstDifference(dev.bytes.subarray(11 * MiB, 12 * MiB), b), -1, 'the new end is written on the server');
      // Again, soon after: every handle on the export (a queue thread's too) asks anew.
      dev.resize(14 * MiB);
      await eventually(() => f.info.size === 14 * MiB, 'the frontend sees the export grow again');
      await Promise.all([f.write(12 * MiB, b), f.write(13 * MiB, b)]);
      assert.equal(firstDifference(dev.bytes.subarray(13 * MiB, 14 * MiB), b), -1);

      dev.resize(6 * MiB);
      await eventually(() => f.info.size === 6 * MiB, 'the frontend sees the export shrink');
      await assert.rejects(f.write(7 * MiB, a), (e) => code(e) === 'EINVAL');
      const c = rng.bytes(MiB);
      await f.write(5 * MiB, c);
      assert.equal(firstDifference(await f.read(5 * MiB, MiB), c), -1);
      assert.ok(logs.some((l) => l.includes('now 12582912 bytes')) && logs.some((l) => l.includes('now 6291456 bytes')), logs.join('\n'));
    });
  } finally {
    await nbd?.close();
    await server.close();
  }
});

test('NbdStorage.refreshSize: at most every sizeCheckMs; a server that cannot be asked keeps the size', TIMEOUT, async () => {
  const dev = new ResizableDevice(MiB);
  const server = new NbdServer({ exports: [{ name: '', device: dev }] });
  const logs: string[] = [];
  const sock = join(tmp.dir, 'nbd2.sock');
  await server.listen({ path: sock });
  const nbd = await NbdStorage.connect(`nbd+unix:///?socket=${encodeURIComponent(sock)}`, { sizeCheckMs: 60_000, log: (m) => logs.push(m) });
  try {
    dev.resize(2 * MiB);
    assert.equal(await nbd.refreshSize(), 2 * MiB, 'the first check asks the server');
    dev.resize(3 * MiB);
    assert.equal(await nbd.refreshSize(), 2 * MiB, 'within sizeCheckMs: not asked again');
    assert.equal(await nbd.refreshSize(true), 3 * MiB, 'unless the caller knows it changed');
    // The server stops taking connections: the size stays, one line says why.
    await server.close();
    assert.equal(await nbd.refreshSize(true), 3 * MiB);
    assert.equal(await nbd.refreshSize(true), 3 * MiB);
    assert.equal(logs.filter((l) => l.includes('cannot ask the server')).length, 1, logs.join('\n'));
  } finally {
    await nbd.close();
    await server.close();
  }
});
