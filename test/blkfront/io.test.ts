/**
 * The pure check of an I/O against the disk (io.ts `checkIo`), before anything is queued: a
 * closing or stopped device refuses everything, then range and alignment to `sector-size`, then
 * what the disk allows (read-only, discard offered). Flush has no range.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { checkIo, type IoGate, type IoKind } from '../../src/blkfront/io.js';
import type { DiskInfo } from '../../src/blkfront/index.js';

function disk(over: Partial<DiskInfo> = {}): DiskInfo {
  return {
    sectors: 64, sectorSize: 512, physicalSectorSize: 512, readOnly: false, cdrom: false, removable: false,
    flush: true, barrier: false, discard: true, discardSecure: false, discardGranularity: 0, discardAlignment: 0, ...over,
  };
}
const open = (d: DiskInfo | undefined): IoGate => ({ closing: false, stopped: undefined, disk: d });

test('checkIo: a closing device says ESHUTDOWN before a stopped one says EIO, and both before any range check', () => {
  assert.equal(checkIo('read', -1, 3, { closing: true, stopped: 'bad id', disk: disk() })?.code, 'ESHUTDOWN');
  const stopped = checkIo('read', -1, 3, { closing: false, stopped: 'bad id', disk: disk() });
  assert.equal(stopped?.code, 'EIO');
  assert.match(stopped!.message, /device stopped: bad id/);
  assert.equal(checkIo('flush', 0, 0, open(undefined))?.code, 'ESHUTDOWN');
});

test('checkIo: flush is accepted with no range; read-only refuses writes, discards and not reads', () => {
  assert.equal(checkIo('flush', 12345, 7, open(disk())), undefined);
  const ro = open(disk({ readOnly: true }));
  assert.equal(checkIo('read', 0, 512, ro), undefined);
  assert.equal(checkIo('write', 0, 512, ro)?.code, 'EROFS');
  assert.equal(checkIo('discard', 0, 512, ro)?.code, 'EROFS');
  assert.equal(checkIo('discard', 0, 512, open(disk({ discard: false })))?.code, 'EOPNOTSUPP');
});

test('property: checkIo accepts exactly the aligned, in-range I/O the disk allows', () => {
  fc.assert(fc.property(
    fc.constantFrom<IoKind>('read', 'write', 'discard'),
    fc.integer({ min: -4096, max: 80 * 4096 }),
    fc.integer({ min: -4096, max: 80 * 4096 }),
    fc.constantFrom(512, 4096),
    fc.integer({ min: 0, max: 64 }),
    fc.boolean(),
    fc.boolean(),
    (kind, offset, length, sectorSize, sectors4k, readOnly, discard) => {
      const d = disk({ sectorSize, sectors: sectors4k * 8, readOnly, discard });
      const err = checkIo(kind, offset, length, open(d));
      const aligned = offset >= 0 && length >= 0 && offset % sectorSize === 0 && length % sectorSize === 0;
      const inRange = offset + length <= sectors4k * 4096;
      const expect = !aligned ? 'EINVAL' : !inRange ? 'EINVAL' : kind !== 'read' && readOnly ? 'EROFS' : kind === 'discard' && !discard ? 'EOPNOTSUPP' : undefined;
      assert.equal(err?.code, expect);
    },
  ), { numRuns: 500 });
});
