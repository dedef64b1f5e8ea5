/** MemoryStorage: sparse 1 MiB chunks, discard freeing them, online resize. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStorage, StorageError } from '../../src/storage/index.js';
import { isZero, pattern, readBytes, rejectsWith, sharedViews, concat } from './helpers.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

test('a large memory disk costs nothing until written, then one chunk per MiB touched', async () => {
  const s = new MemoryStorage(GiB);
  try {
    assert.equal(s.size, GiB);
    assert.equal(s.allocated, 0);
    assert.ok(isZero(await readBytes(s, GiB - MiB, MiB)), 'unwritten bytes read as zeroes');
    assert.equal(s.allocated, 0, 'reading allocates nothing');
    await s.write(GiB - 512, [new Uint8Array(512).fill(9)]);
    assert.equal(s.allocated, MiB);
    await s.write(MiB - 512, [new Uint8Array(1024).fill(8)]); // across a chunk edge: two chunks
    assert.equal(s.allocated, 3 * MiB);
    assert.deepEqual(await readBytes(s, MiB - 1024, 2048), Uint8Array.from([...new Uint8Array(512), ...new Uint8Array(1024).fill(8), ...new Uint8Array(512)]));
  } finally {
    await s.close();
  }
});

test('constructor: size rounded down to whole sectors; bad sizes and sector sizes are EINVAL', async () => {
  assert.equal(new MemoryStorage(1000).size, 512);
  assert.equal(new MemoryStorage(1000, { sectorSize: 4096 }).size, 0);
  assert.equal(new MemoryStorage(10000, { sectorSize: 4096 }).size, 8192);
  for (const bad of [-1, 1.5, Number.NaN, Number.POSITIVE_INFINITY]) {
    assert.throws(() => new MemoryStorage(bad), (e: unknown) => e instanceof StorageError && e.code === 'EINVAL');
  }
  assert.throws(() => new MemoryStorage(4096, { sectorSize: 1024 as 512 }), { code: 'EINVAL' });
  const s = new MemoryStorage(1000);
  await rejectsWith(s.read(512, [new Uint8Array(512)]), 'EINVAL');
  assert.equal(s.canDiscard, true);
  await s.flush();
  assert.equal(await s.refreshSize(), 512);
});

test('discard frees the chunks it wholly covers and zeroes the parts of the others', async () => {
  const s = new MemoryStorage(4 * MiB);
  try {
    const data = pattern(41, 4 * MiB);
    await s.write(0, sharedViews(data, [MiB, 2 * MiB + 7, 3 * MiB]));
    assert.equal(s.allocated, 4 * MiB);
    await s.discard(MiB / 2, 2 * MiB); // half of chunk 0, all of chunk 1, half of chunk 2
    assert.equal(s.allocated, 3 * MiB, 'only chunk 1 was wholly covered');
    const expect = data.slice().fill(0, MiB / 2, MiB / 2 + 2 * MiB);
    assert.deepEqual(await readBytes(s, 0, 4 * MiB), expect);
    await s.writeZeroes(0, 4 * MiB);
    assert.equal(s.allocated, 0, 'zeroing everything frees everything');
    const views = sharedViews(new Uint8Array(4 * MiB).fill(1), [5, MiB + 3]);
    await s.read(0, views);
    assert.ok(isZero(concat(views)));
  } finally {
    await s.close();
  }
});

test('discard frees a last chunk that the disk only partly fills', async () => {
  const s = new MemoryStorage(MiB + 8192);
  try {
    await s.write(0, [pattern(43, MiB + 8192)]);
    assert.equal(s.allocated, 2 * MiB);
    await s.discard(MiB, 8192);
    assert.equal(s.allocated, MiB, 'the whole in-disk part of the last chunk was dropped');
    await s.discard(MiB - 512, 512);
    assert.equal(s.allocated, MiB, 'a partial discard zeroes in place');
    assert.ok(isZero(await readBytes(s, MiB - 512, 8704)));
    assert.deepEqual(await readBytes(s, 0, 512), pattern(43, 512));
  } finally {
    await s.close();
  }
});

test('resize: grows with zeroes, shrinks dropping data for good, rounds down, checks its argument', async () => {
  const s = new MemoryStorage(2 * MiB);
  try {
    await s.write(0, [pattern(47, 2 * MiB)]);
    s.resize(MiB + 4096 + 100);
    assert.equal(s.size, MiB + 4096);
    assert.equal(await s.refreshSize(), MiB + 4096);
    await rejectsWith(s.read(MiB + 4096, [new Uint8Array(512)]), 'EINVAL');
    s.resize(3 * MiB);
    assert.equal(s.size, 3 * MiB);
    assert.deepEqual(await readBytes(s, 0, MiB + 4096), pattern(47, 2 * MiB).subarray(0, MiB + 4096), 'what was kept is intact');
    assert.ok(isZero(await readBytes(s, MiB + 4096, 2 * MiB - 4096)), 'bytes cut off do not come back when it grows again');
    await s.write(3 * MiB - 512, [new Uint8Array(512).fill(1)]);
    s.resize(0);
    assert.equal(s.allocated, 0);
    assert.throws(() => s.resize(-512), { code: 'EINVAL' });
    assert.throws(() => s.resize(0.5), { code: 'EINVAL' });
  } finally {
    await s.close();
  }
});

test('sector size 4096: the disk is addressed in 4 KiB sectors', async () => {
  const s = new MemoryStorage(MiB, { sectorSize: 4096 });
  try {
    assert.equal(s.sectorSize, 4096);
    await rejectsWith(s.write(512, [new Uint8Array(4096)]), 'EINVAL');
    await rejectsWith(s.write(0, [new Uint8Array(512)]), 'EINVAL');
    await s.write(4096, [new Uint8Array(4096).fill(2)]);
    assert.deepEqual(await readBytes(s, 4096, 4096), new Uint8Array(4096).fill(2));
  } finally {
    await s.close();
  }
});
