/**
 * zeroRange: zeroing through the PV protocol decided only from what the VBD advertises
 * (feature-discard) and what it reads back, against stand-in disks: one whose discards read
 * back as zeroes (a hole, nothing written), one whose discards leave the data (written with
 * zeroes, and no longer fast), one without discard (written), one refusing a discard at run time.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlkfrontError, zeroByDiscard, zeroRange, type ZeroableDisk } from '../../src/blkfront/index.js';

const SIZE = 3 * 1024 * 1024 + 8192;

function disk(o: { discard: boolean; discardZeroes?: boolean; refuse?: boolean }) {
  const bytes = new Uint8Array(SIZE).fill(0x5a);
  const log: string[] = [];
  const d = {
    info: { discard: o.discard, readOnly: false },
    async discard(offset: number, length: number) {
      log.push(`discard ${offset} ${length}`);
      if (o.refuse === true) throw new BlkfrontError('EOPNOTSUPP', 'the backend does not support discard');
      // A backend whose discard drops only whole MiB (as a coarse discard granularity would).
      if (o.discardZeroes === true) bytes.fill(0, offset, offset + length);
      else bytes.fill(0, offset, offset + Math.floor(length / (1 << 20)) * (1 << 20));
    },
    async readPages(offset: number, length: number) {
      return { pages: [bytes.slice(offset, offset + length)], release() {} };
    },
    async write(offset: number, data: Uint8Array) {
      log.push(`write ${offset} ${data.length}`);
      bytes.set(data, offset);
    },
  };
  return { d: d as unknown as ZeroableDisk, bytes, log };
}

const allZero = (b: Uint8Array) => b.every((x) => x === 0);

test('discards that read back as zeroes: a hole, nothing written', async () => {
  const { d, bytes, log } = disk({ discard: true, discardZeroes: true });
  assert.equal(zeroByDiscard(d), true);
  assert.equal(await zeroRange(d, 4096, SIZE - 4096, true), true);
  assert.ok(allZero(bytes.subarray(4096)));
  assert.equal(bytes[4095], 0x5a);
  assert.deepEqual(log, [`discard 4096 ${SIZE - 4096}`]);
  assert.equal(zeroByDiscard(d), true, 'still fast');
});

test('discards that leave data: what reads back non-zero is written, and zeroing is no longer fast', async () => {
  const { d, bytes, log } = disk({ discard: true });
  assert.equal(await zeroRange(d, 0, SIZE, true), false);
  assert.ok(allZero(bytes));
  assert.ok(log.some((l) => l.startsWith('write ')), 'the tail the discard left was written');
  assert.equal(zeroByDiscard(d), false);
  log.length = 0;
  bytes.fill(1);
  await zeroRange(d, 0, 8192, true);
  assert.deepEqual(log, ['write 0 8192'], 'later zeroes write at once');
  assert.ok(allZero(bytes.subarray(0, 8192)));
});

test('no discard offered, NO_HOLE, or a discard refused at run time: zeroes are written', async () => {
  for (const [what, o, mayTrim] of [['no discard', { discard: false }, true], ['NO_HOLE', { discard: true, discardZeroes: true }, false], ['refused', { discard: true, refuse: true }, true]] as const) {
    const { d, bytes, log } = disk(o);
    assert.equal(await zeroRange(d, 0, SIZE, mayTrim), false, what);
    assert.ok(allZero(bytes), what);
    assert.ok(log.filter((l) => l.startsWith('write ')).length >= 4, `${what}: ${log.join(', ')}`);
  }
});
