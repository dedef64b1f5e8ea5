/**
 * Every driver against a byte-array model: random writes, reads, discards and zeroings at random
 * sector-aligned places, split into random vectors (plain or SharedArrayBuffer views).
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { concat, drivers, pattern, sharedViews, split, tempDir } from './helpers.js';

const MiB = 1024 * 1024;
// Past two memory chunks and not a whole number of them: chunk edges and a partial last chunk.
const SIZE = 2 * MiB + 12 * 1024;

type Op =
  | { kind: 'write'; sector: number; count: number; seed: number; cuts: number[]; shared: boolean }
  | { kind: 'read'; sector: number; count: number; cuts: number[]; shared: boolean }
  | { kind: 'discard' | 'writeZeroes'; sector: number; count: number }
  | { kind: 'flush' | 'refreshSize' };

function ops(sectorSize: 512 | 4096): fc.Arbitrary<Op[]> {
  const sectors = SIZE / sectorSize;
  const perChunk = MiB / sectorSize;
  // Half the time near a 1 MiB edge, where a request spans two chunks.
  const sector = fc.oneof(
    fc.integer({ min: 0, max: sectors - 1 }),
    fc.integer({ min: 1, max: 2 }).chain((k) => fc.integer({ min: k * perChunk - 8, max: k * perChunk + 4 })),
  );
  const small = fc.integer({ min: 0, max: 48 });
  const wide = fc.oneof(small, fc.integer({ min: 0, max: sectors }));
  const cuts = fc.array(fc.integer({ min: 0, max: 48 * sectorSize }), { maxLength: 4 });
  const at = <T extends { sector: number; count: number }>(o: T): T => {
    const first = Math.min(o.sector, sectors - 1);
    return { ...o, sector: first, count: Math.min(o.count, sectors - first) };
  };
  return fc.array(
    fc.oneof(
      { weight: 4, arbitrary: fc.record({ kind: fc.constant('write' as const), sector, count: small, seed: fc.integer(), cuts, shared: fc.boolean() }).map(at) },
      { weight: 3, arbitrary: fc.record({ kind: fc.constant('read' as const), sector, count: wide, cuts, shared: fc.boolean() }).map(at) },
      { weight: 1, arbitrary: fc.record({ kind: fc.constantFrom('discard' as const, 'writeZeroes' as const), sector, count: wide }).map(at) },
      { weight: 1, arbitrary: fc.record({ kind: fc.constantFrom('flush' as const, 'refreshSize' as const) }) },
    ),
    { minLength: 1, maxLength: 16 },
  );
}

const tmp = tempDir('blkif-storage-model-');
after(() => tmp.cleanup());

for (const driver of drivers(tmp.dir)) {
  for (const sectorSize of [512, 4096] as const) {
    test(`${driver.name}, ${sectorSize}-byte sectors: matches a byte-array model`, async () => {
      await fc.assert(
        fc.asyncProperty(ops(sectorSize), async (script) => {
          const s = await driver.make(SIZE, sectorSize);
          const model = new Uint8Array(SIZE);
          try {
            assert.equal(s.size, SIZE);
            assert.equal(s.sectorSize, sectorSize);
            for (const op of script) {
              switch (op.kind) {
                case 'write': {
                  const data = pattern(op.seed, op.count * sectorSize);
                  const bufs = op.shared ? sharedViews(data, op.cuts) : split(data.slice(), op.cuts);
                  await s.write(op.sector * sectorSize, bufs);
                  model.set(data, op.sector * sectorSize);
                  break;
                }
                case 'read': {
                  const n = op.count * sectorSize;
                  const bufs = op.shared ? sharedViews(new Uint8Array(n).fill(0xee), op.cuts) : split(new Uint8Array(n).fill(0xee), op.cuts);
                  await s.read(op.sector * sectorSize, bufs);
                  const off = op.sector * sectorSize;
                  assert.deepEqual(concat(bufs), model.subarray(off, off + n), `read of ${op.count} sectors at ${op.sector}`);
                  break;
                }
                case 'discard':
                case 'writeZeroes':
                  await s[op.kind](op.sector * sectorSize, op.count * sectorSize);
                  model.fill(0, op.sector * sectorSize, (op.sector + op.count) * sectorSize);
                  break;
                case 'flush':
                  await s.flush();
                  break;
                case 'refreshSize':
                  assert.equal(await s.refreshSize(), SIZE);
                  break;
              }
            }
            // Finally the whole disk, in one vector of odd-sized pieces.
            const all = split(new Uint8Array(SIZE), [1, 4097, MiB - 3, MiB + 5000]);
            await s.read(0, all);
            assert.deepEqual(concat(all), model);
          } finally {
            await s.close();
          }
        }),
        { numRuns: 15 },
      );
    });
  }
}
