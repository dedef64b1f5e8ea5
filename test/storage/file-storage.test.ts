/** FileStorage on real files: opening, creating, odd sizes, vectors, holes, resize, I/O modes. */
import { after, mock, test } from 'node:test';
import assert from 'node:assert/strict';
import fs, {
  closeSync,
  mkdirSync,
  openSync,
  readFileSync,
  readv,
  readvSync,
  renameSync,
  statSync,
  truncateSync,
  writeFileSync,
  writev,
  writevSync,
} from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';
import { join } from 'node:path';
import { FileStorage } from '../../src/storage/index.js';
import { concat, isZero, pattern, readBytes, rejectsWith, sharedViews, split, tempDir } from './helpers.js';
import { requireTools } from '../support/tools.js';

const tmp = tempDir('blkif-storage-file-');
after(() => tmp.cleanup());

const MiB = 1024 * 1024;
const MODES = ['sync', 'async'] as const;
let serial = 0;
const fresh = (name: string): string => join(tmp.dir, `${serial++}-${name}`);

/** Runs `fn` with fallocate unreachable (an empty PATH), as on a system without util-linux. */
async function withoutFallocate<T>(fn: () => Promise<T>): Promise<T> {
  const saved = process.env.PATH;
  process.env.PATH = '';
  try {
    return await fn();
  } finally {
    process.env.PATH = saved;
  }
}

test('open: a missing file is ENOENT naming the path; a directory or a bad sector size is EINVAL', async () => {
  const missing = join(tmp.dir, 'no-such.img');
  await rejectsWith(FileStorage.open(missing), 'ENOENT', /no-such\.img/);
  await rejectsWith(FileStorage.open(missing, { readOnly: true }), 'ENOENT', /no-such\.img/);
  const d = fresh('dir');
  mkdirSync(d);
  await rejectsWith(FileStorage.open(d, { readOnly: true }), 'EINVAL', /not a regular file/);
  const p = fresh('disk.img');
  await FileStorage.create(p, 4096);
  await rejectsWith(FileStorage.open(p, { sectorSize: 1024 as 512 }), 'EINVAL', /sector size/);
});

test('create: a sparse image of the exact size; refuses to overwrite without force, and to shrink', async () => {
  const p = fresh('new.img');
  await FileStorage.create(p, 64 * MiB);
  assert.equal(statSync(p).size, 64 * MiB);
  assert.ok(statSync(p).blocks * 512 < MiB, `sparse: ${statSync(p).blocks} blocks allocated`);

  const s = await FileStorage.open(p);
  await s.write(0, [pattern(1, 4096)]);
  await s.close();
  await rejectsWith(FileStorage.create(p, 128 * MiB), 'EEXIST', /refusing to overwrite/);
  assert.equal(statSync(p).size, 64 * MiB, 'a refused create leaves the file alone');
  await rejectsWith(FileStorage.create(p, MiB, { force: true }), 'EINVAL', /shrink/);
  assert.equal(statSync(p).size, 64 * MiB);

  await FileStorage.create(p, 128 * MiB, { force: true });
  assert.equal(statSync(p).size, 128 * MiB, 'force grows it');
  assert.deepEqual(readFileSync(p).subarray(0, 4096), Buffer.from(pattern(1, 4096)), 'keeping what was written');
  await FileStorage.create(p, 128 * MiB, { force: true }); // same size: nothing to do

  for (const bad of [0, -512, 1.5, Number.NaN]) await rejectsWith(FileStorage.create(fresh('bad.img'), bad), 'EINVAL');
  await rejectsWith(FileStorage.create(join(tmp.dir, 'no-dir', 'x.img'), 4096), 'ENOENT');
});

test('odd-sized image: only whole sectors are exposed; the tail is never read or written', async () => {
  for (const io of MODES) {
    const p = fresh('odd.img');
    const original = pattern(5, 1000);
    writeFileSync(p, original);
    const s = await FileStorage.open(p, { io });
    try {
      assert.equal(s.size, 512);
      assert.deepEqual(await readBytes(s, 0, 512), original.subarray(0, 512));
      await rejectsWith(s.read(512, [new Uint8Array(512)]), 'EINVAL');
      await rejectsWith(s.write(512, [new Uint8Array(512)]), 'EINVAL');
      await rejectsWith(s.read(0, [new Uint8Array(1024)]), 'EINVAL');
      await rejectsWith(s.discard(512, 512), 'EINVAL');
      await s.write(0, [new Uint8Array(512).fill(0x5a)]);
      await s.writeZeroes(0, 512);
      await s.discard(0, 512);
      await s.flush();
      assert.equal(await s.refreshSize(), 512);
    } finally {
      await s.close();
    }
    const after = readFileSync(p);
    assert.equal(after.length, 1000, `${io}: the file keeps its size`);
    assert.ok(isZero(after.subarray(0, 512)), `${io}: the exposed sector was zeroed`);
    assert.deepEqual(after.subarray(512), Buffer.from(original.subarray(512)), `${io}: the 488 tail bytes are untouched`);

    const big = await FileStorage.open(p, { io, sectorSize: 4096 });
    try {
      assert.equal(big.size, 0, 'with 4096-byte sectors a 1000-byte file has no whole sector');
      await rejectsWith(big.read(0, [new Uint8Array(4096)]), 'EINVAL');
    } finally {
      await big.close();
    }
  }
});

test('Node readv/writev (sync and callback) accept views over a SharedArrayBuffer', async () => {
  const p = fresh('sab.img');
  writeFileSync(p, new Uint8Array(16384));
  const fd = openSync(p, 'r+');
  try {
    const sab = new SharedArrayBuffer(3 * 4096);
    const views = [new Uint8Array(sab, 100, 4000), new Uint8Array(sab, 4100, 5000), new Uint8Array(sab, 9100, 100)];
    views.forEach((v, i) => v.set(pattern(i + 1, v.length)));
    assert.equal(writevSync(fd, views, 512), 9100);
    const back = [new Uint8Array(new SharedArrayBuffer(9100), 0, 9100)];
    assert.equal(readvSync(fd, back, 512), 9100);
    assert.deepEqual(back[0], concat(views));

    const shared = new Uint8Array(new SharedArrayBuffer(4096)).fill(0x77);
    const wrote = await new Promise<number>((res, rej) => writev(fd, [shared], 12288, (e, n) => (e ? rej(e) : res(n))));
    assert.equal(wrote, 4096);
    const into = new Uint8Array(new SharedArrayBuffer(8192), 4096);
    const read = await new Promise<number>((res, rej) => readv(fd, [into], 12288, (e, n) => (e ? rej(e) : res(n))));
    assert.equal(read, 4096);
    assert.ok(into.every((x) => x === 0x77));
  } finally {
    closeSync(fd);
  }
});

test('vectored read/write over SharedArrayBuffer views, both I/O modes, land at the right bytes', async () => {
  for (const io of MODES) {
    const p = fresh('vec.img');
    await FileStorage.create(p, MiB);
    const s = await FileStorage.open(p, { io });
    try {
      const data = pattern(11, 12 * 512);
      await s.write(3 * 512, sharedViews(data, [1, 512, 513, 4000]));
      const file = readFileSync(p);
      assert.deepEqual(file.subarray(3 * 512, 15 * 512), Buffer.from(data));
      assert.ok(isZero(file.subarray(0, 3 * 512)) && isZero(file.subarray(15 * 512)), 'nothing outside the range');
      const into = sharedViews(new Uint8Array(data.length), [7, 1024, 6000]);
      await s.read(3 * 512, into);
      assert.deepEqual(concat(into), data);
    } finally {
      await s.close();
    }
  }
});

test('more vector pieces than IOV_MAX: partial transfers continue until every piece is done', async () => {
  for (const io of MODES) {
    const p = fresh('many.img');
    await FileStorage.create(p, 2 * MiB);
    const s = await FileStorage.open(p, { io });
    try {
      const data = pattern(13, MiB);
      const cuts = Array.from({ length: 2047 }, (_, i) => (i + 1) * 512); // 2048 pieces
      await s.write(MiB, split(data.slice(), cuts));
      assert.deepEqual(readFileSync(p).subarray(MiB), Buffer.from(data));
      const into = split(new Uint8Array(MiB), cuts);
      assert.equal(into.length, 2048);
      await s.read(MiB, into);
      assert.deepEqual(concat(into), data);
    } finally {
      await s.close();
    }
  }
});

test('discard punches a hole (fewer blocks allocated), reads zeroes, keeps the file size', async () => {
  requireTools('fallocate');
  for (const io of MODES) {
    const p = fresh('punch.img');
    await FileStorage.create(p, 4 * MiB);
    const s = await FileStorage.open(p, { io });
    try {
      const data = pattern(17, 4 * MiB);
      await s.write(0, [data]);
      await s.flush();
      const before = statSync(p).blocks;
      await s.discard(MiB, 2 * MiB);
      const expect = data.slice().fill(0, MiB, 3 * MiB);
      assert.deepEqual(await readBytes(s, 0, 4 * MiB), expect);
      assert.equal(statSync(p).size, 4 * MiB);
      // With fallocate there, only a file system without holes could stop the punch: that is
      // this machine's to fix (the tests' temporary directory on one that has them), not a pass.
      assert.equal(s.canDiscard, true, `${io}: fallocate --punch-hole failed on ${p}'s file system`);
      const blocks = statSync(p).blocks;
      assert.ok(blocks <= before - (2 * MiB) / 512, `${io}: ${before} blocks before, ${blocks} after punching 2 MiB`);
    } finally {
      await s.close();
    }
  }
});

test('discard falls back to writing zeroes without fallocate, and remembers a failed punch', async () => {
  const p = fresh('fallback.img');
  const data = pattern(19, 4 * MiB);
  writeFileSync(p, data);

  const s = await withoutFallocate(() => FileStorage.open(p));
  try {
    assert.equal(s.canDiscard, false, 'the probe at open found no fallocate');
    await s.discard(512, 3 * MiB); // more than one zero chunk
    const expect = data.slice().fill(0, 512, 512 + 3 * MiB);
    assert.deepEqual(readFileSync(p), Buffer.from(expect));
  } finally {
    await s.close();
  }

  requireTools('fallocate');
  const t = await FileStorage.open(p);
  try {
    assert.equal(t.canDiscard, true, `fallocate --punch-hole failed on ${p}'s file system`);
    // Punching worked at open but fails now: zeroes are written, and the failure is remembered.
    await withoutFallocate(() => t.discard(0, 512));
    assert.equal(t.canDiscard, false);
    assert.ok(isZero(readFileSync(p).subarray(0, 512)));
  } finally {
    await t.close();
  }
});

test('discard punches the file that is open, even after its path was renamed and reused', async () => {
  const p = fresh('moved.img');
  writeFileSync(p, pattern(23, MiB));
  const s = await FileStorage.open(p);
  try {
    renameSync(p, `${p}.old`);
    const newcomer = pattern(29, MiB);
    writeFileSync(p, newcomer);
    await s.discard(0, 64 * 1024);
    assert.ok(isZero(readFileSync(`${p}.old`).subarray(0, 64 * 1024)), 'the open file got the hole');
    assert.deepEqual(readFileSync(p), Buffer.from(newcomer), 'the new file at the old path is untouched');
  } finally {
    await s.close();
  }
});

test('writeZeroes overwrites in chunks: ranges larger than, and not a multiple of, 1 MiB', async () => {
  for (const io of MODES) {
    const p = fresh('zeroes.img');
    const data = pattern(31, 4 * MiB);
    writeFileSync(p, data);
    const s = await FileStorage.open(p, { io });
    try {
      await s.writeZeroes(512, 2 * MiB + 1536);
      const expect = data.slice().fill(0, 512, 512 + 2 * MiB + 1536);
      assert.deepEqual(readFileSync(p), Buffer.from(expect));
      await s.writeZeroes(0, 4 * MiB);
      assert.ok(isZero(readFileSync(p)));
    } finally {
      await s.close();
    }
  }
});

test('refreshSize follows growth (rounded down); a read past a shrunken end fails EIO with zeroed buffers', async () => {
  for (const io of MODES) {
    const p = fresh('resize.img');
    await FileStorage.create(p, 8192);
    const s = await FileStorage.open(p, { io });
    try {
      assert.equal(s.size, 8192);
      truncateSync(p, 3 * 8192 + 100);
      assert.equal(s.size, 8192, 'the size changes only when asked to look');
      await rejectsWith(s.write(8192, [new Uint8Array(512)]), 'EINVAL');
      assert.equal(await s.refreshSize(), 3 * 8192);
      assert.equal(s.size, 3 * 8192);
      await s.write(2 * 8192, [new Uint8Array(8192).fill(3)]);
      assert.equal(statSync(p).size, 3 * 8192 + 100, 'writing the new last sector does not touch the tail');

      truncateSync(p, 8192 + 512); // shrunk under us, not yet refreshed
      const half = new Uint8Array(1024).fill(0xee);
      const rest = new Uint8Array(1024).fill(0xee);
      await rejectsWith(s.read(8192, [half, rest]), 'EIO', /end of file/);
      assert.ok(isZero(half.subarray(512)) && isZero(rest), 'what could not be read is zeroed, not stale');
      assert.equal(await s.refreshSize(), 8192 + 512);
      await rejectsWith(s.read(8192, [new Uint8Array(1024)]), 'EINVAL');
    } finally {
      await s.close();
    }
  }
});

test('flush is fdatasync: the sync call in sync mode, the callback one in async mode', async () => {
  const p = fresh('flush.img');
  await FileStorage.create(p, MiB);
  // Named imports of a builtin follow its exports object once synced: spy there.
  const syncSpy = mock.method(fs, 'fdatasyncSync');
  const asyncSpy = mock.method(fs, 'fdatasync');
  syncBuiltinESMExports();
  try {
    for (const io of MODES) {
      const s = await FileStorage.open(p, { io });
      try {
        await s.write(0, [pattern(37, 4096)]);
        await s.flush();
      } finally {
        await s.close();
      }
    }
    assert.equal(syncSpy.mock.callCount(), 1);
    assert.equal(asyncSpy.mock.callCount(), 1);
    const ro = await FileStorage.open(p, { readOnly: true });
    try {
      await ro.flush(); // nothing of a read-only open to make durable
      assert.equal(syncSpy.mock.callCount() + asyncSpy.mock.callCount(), 2);
      assert.equal(ro.canDiscard, false, 'a read-only image never frees anything');
      assert.deepEqual(await readBytes(ro, 0, 4096), pattern(37, 4096));
    } finally {
      await ro.close();
    }
  } finally {
    syncSpy.mock.restore();
    asyncSpy.mock.restore();
    syncBuiltinESMExports();
  }
});

test('setOwnThread: a handle its thread serves alone reads and writes with blocking calls; told otherwise, through the pool again', async () => {
  const p = fresh('own-thread.img');
  await FileStorage.create(p, MiB);
  const spies = { readvSync: mock.method(fs, 'readvSync'), writevSync: mock.method(fs, 'writevSync'), readv: mock.method(fs, 'readv'), writev: mock.method(fs, 'writev') };
  syncBuiltinESMExports();
  const calls = () => Object.fromEntries(Object.entries(spies).map(([k, v]) => [k, v.mock.callCount()]));
  const s = await FileStorage.open(p);
  try {
    // One write and one read of a 4 KiB block: which calls they made, and that the bytes land.
    const probe = async (fill: number) => {
      for (const spy of Object.values(spies)) spy.mock.resetCalls();
      await s.write(8192, [pattern(fill, 4096)]);
      const got = new Uint8Array(4096);
      await s.read(8192, [got]);
      assert.deepEqual(got, pattern(fill, 4096));
      assert.deepEqual(new Uint8Array(readFileSync(p).subarray(8192, 8192 + 4096)), pattern(fill, 4096));
      return calls();
    };
    const pool = { readvSync: 0, writevSync: 0, readv: 1, writev: 1 };
    const blocking = { readvSync: 1, writevSync: 1, readv: 0, writev: 0 };
    assert.deepEqual(await probe(11), pool);
    s.setOwnThread(true);
    assert.deepEqual(await probe(12), blocking);
    s.setOwnThread(false);
    assert.deepEqual(await probe(13), pool);
    // io: 'sync' stays blocking whatever the hint says.
    const t = await FileStorage.open(p, { io: 'sync' });
    try {
      t.setOwnThread(false);
      for (const spy of Object.values(spies)) spy.mock.resetCalls();
      assert.deepEqual(await readBytes(t, 8192, 4096), pattern(13, 4096));
      assert.equal(spies.readvSync.mock.callCount(), 1);
      assert.equal(spies.readv.mock.callCount(), 0);
    } finally {
      await t.close();
    }
  } finally {
    await s.close();
    for (const spy of Object.values(spies)) spy.mock.restore();
    syncBuiltinESMExports();
  }
});
