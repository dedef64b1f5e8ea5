/** The BlockStorage rules every driver keeps: range and alignment, read-only, zeroing, closing. */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import type { BlockStorage } from '../../src/storage/index.js';
import { checkRange } from '../../src/storage/range.js';
import { drivers, isZero, pattern, readBytes, rejectsWith, tempDir } from './helpers.js';

const tmp = tempDir('blkif-storage-contract-');
after(() => tmp.cleanup());

const SIZE = 64 * 1024;

/** Every request kind at (offset, length), each expected to fail EINVAL. */
async function allRefuse(s: BlockStorage, offset: number, length: number): Promise<void> {
  const what = `offset ${offset} length ${length}`;
  // read and write take their length from the buffers: only lengths a buffer can have.
  if (Number.isSafeInteger(length) && length >= 0 && length < 1 << 20) {
    await rejectsWith(s.read(offset, [new Uint8Array(length)]), 'EINVAL').catch((e: Error) => assert.fail(`read ${what}: ${e.message}`));
    await rejectsWith(s.write(offset, [new Uint8Array(length)]), 'EINVAL').catch((e: Error) => assert.fail(`write ${what}: ${e.message}`));
  }
  await rejectsWith(s.discard(offset, length), 'EINVAL').catch((e: Error) => assert.fail(`discard ${what}: ${e.message}`));
  await rejectsWith(s.writeZeroes(offset, length), 'EINVAL').catch((e: Error) => assert.fail(`writeZeroes ${what}: ${e.message}`));
}

test('checkRange: whole sectors inside the disk, nothing else', () => {
  assert.doesNotThrow(() => checkRange(0, 0, 0, 512), 'nothing at the start of an empty disk');
  assert.doesNotThrow(() => checkRange(1024, 0, 1024, 512), 'nothing at the very end');
  assert.doesNotThrow(() => checkRange(512, 512, 1024, 512));
  for (const [o, l] of [[-512, 512], [0, -512], [0.5, 512], [0, 512.5], [NaN, 0], [0, Infinity], [2 ** 53, 0], [256, 512], [0, 100], [512, 1024], [1536, 0]]) {
    assert.throws(() => checkRange(o!, l!, 1024, 512), { name: 'StorageError', code: 'EINVAL' }, `offset ${o} length ${l}`);
  }
  assert.throws(() => checkRange(512, 4096, 8192, 4096), { code: 'EINVAL' }, 'aligned to 512 is not aligned to 4096');
});

for (const driver of drivers(tmp.dir)) {
  test(`${driver.name}: out-of-range, negative, fractional or unaligned requests fail EINVAL and change nothing`, async () => {
    for (const ss of [512, 4096] as const) {
      const s = await driver.make(SIZE, ss);
      try {
        const data = pattern(ss, SIZE);
        await s.write(0, [data]);
        const cases: [number, number][] = [
          [SIZE, ss], // just past the end
          [SIZE - ss, 2 * ss], // straddling the end
          [SIZE + ss, 0], // nothing, but past the end
          [-ss, ss],
          [0, -ss],
          [ss / 2, ss], // unaligned offset
          [0, ss + 1], // unaligned length
          [1.5, ss],
          [NaN, ss],
          [0, Number.POSITIVE_INFINITY],
          [Number.MAX_SAFE_INTEGER - (Number.MAX_SAFE_INTEGER % ss), ss],
        ];
        if (ss === 4096) cases.push([512, 4096], [0, 512]);
        for (const [o, l] of cases) await allRefuse(s, o, l);
        // The buffers' total is the length: pieces need not be sectors, but the sum must be.
        await rejectsWith(s.write(0, [new Uint8Array(ss - 1), new Uint8Array(2)]), 'EINVAL');
        await rejectsWith(s.read(SIZE - ss, [new Uint8Array(ss), new Uint8Array(ss)]), 'EINVAL');
        assert.deepEqual(await readBytes(s, 0, SIZE), data, 'refused requests left the disk as it was');
      } finally {
        await s.close();
      }
    }
  });

  test(`${driver.name}: zero-length requests and odd-sized vector pieces`, async () => {
    const s = await driver.make(SIZE, 512);
    try {
      await s.read(SIZE, []);
      await s.write(0, [new Uint8Array(0)]);
      await s.discard(SIZE, 0);
      await s.writeZeroes(0, 0);
      const data = pattern(7, 1024);
      await s.write(512, [data.subarray(0, 1), new Uint8Array(0), data.subarray(1, 700), data.subarray(700)]);
      const parts = [new Uint8Array(3), new Uint8Array(0), new Uint8Array(1021)];
      await s.read(512, parts);
      assert.deepEqual(Uint8Array.from([...parts[0]!, ...parts[2]!]), data);
    } finally {
      await s.close();
    }
  });

  test(`${driver.name}: read-only refuses write, discard and writeZeroes with EROFS`, async () => {
    const s = await driver.make(SIZE, 512, { readOnly: true });
    try {
      assert.equal(s.readOnly, true);
      await rejectsWith(s.write(0, [new Uint8Array(512).fill(1)]), 'EROFS');
      await rejectsWith(s.discard(0, 512), 'EROFS');
      await rejectsWith(s.writeZeroes(0, 512), 'EROFS');
      await rejectsWith(s.write(SIZE, [new Uint8Array(512)]), 'EROFS', /read-only/);
      assert.ok(isZero(await readBytes(s, 0, SIZE)), 'reads still work, and nothing was written');
      await s.flush();
      assert.equal(await s.refreshSize(), SIZE);
    } finally {
      await s.close();
    }
  });

  test(`${driver.name}: discard and writeZeroes read back as zeroes, neighbours intact`, async () => {
    for (const ss of [512, 4096] as const) {
      const s = await driver.make(3 * 1024 * 1024, ss);
      try {
        const data = pattern(99, 3 * 1024 * 1024);
        await s.write(0, [data]);
        const expect = data.slice();
        // One sector, a run across the 1 MiB edge, and a big range not a multiple of 1 MiB.
        for (const [op, o, l] of [
          ['discard', ss, ss],
          ['writeZeroes', 4 * ss, ss],
          ['discard', 1024 * 1024 - 3 * ss, 8 * ss],
          ['writeZeroes', 1024 * 1024 + 64 * ss, 1024 * 1024 + 5 * ss],
          ['discard', 2 * 1024 * 1024 + 100 * ss, 20 * ss],
        ] as const) {
          await s[op](o, l);
          expect.fill(0, o, o + l);
          assert.deepEqual(await readBytes(s, 0, expect.length), expect, `after ${op} of ${l} bytes at ${o} (${ss}-byte sectors)`);
        }
      } finally {
        await s.close();
      }
    }
  });

  test(`${driver.name}: close is idempotent; afterwards every access fails EIO`, async () => {
    const s = await driver.make(SIZE, 512);
    await s.close();
    await s.close();
    await rejectsWith(s.read(0, [new Uint8Array(512)]), 'EIO');
    await rejectsWith(s.write(0, [new Uint8Array(512)]), 'EIO');
    await rejectsWith(s.discard(0, 512), 'EIO');
    await rejectsWith(s.writeZeroes(0, 512), 'EIO');
    await rejectsWith(s.flush(), 'EIO');
    await rejectsWith(s.refreshSize(), 'EIO');
  });
}
