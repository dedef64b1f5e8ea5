/**
 * A guest's block device seen as an NBD export: every byte a client reads or writes goes through
 * blkfront, grants, the ring and blkback. The NBD server runs in the thread of the guest that
 * holds the disks, so an export calls blkfront directly.
 */
import { zeroByDiscard, zeroRange, type Blkfront } from '../blkfront/index.js';
import { NbdDeviceError, NBD_EINVAL, type NbdExportDevice } from '../nbd/index.js';

/**
 * The NBD view of a disk. Several connections share one blkfront, one ring and one backend, so a
 * flush on any covers writes completed on all: NBD_FLAG_CAN_MULTI_CONN is safe.
 */
export function exportDevice(f: Blkfront): NbdExportDevice {
  const aligned = (offset: number, length: number) => {
    const bs = f.info.sectorSize;
    if (offset % bs !== 0 || length % bs !== 0) throw new NbdDeviceError(NBD_EINVAL, `offset ${offset} length ${length} not aligned to ${bs}-byte sectors`);
  };
  return {
    get size() { return f.info.size; },
    get readOnly() { return f.info.readOnly; },
    get blockSize() { return f.info.sectorSize; },
    canFlush: true,
    get canTrim() { return f.info.discard; },
    multiConn: true,
    read(offset, length) {
      aligned(offset, length);
      return f.read(offset, length);
    },
    readPages(offset: number, length: number) {
      aligned(offset, length);
      return f.readPages(offset, length);
    },
    write(offset, data) {
      aligned(offset, data.length);
      return f.write(offset, data);
    },
    flush: () => f.flush(),
    async trim(offset, length) {
      aligned(offset, length);
      // A trim is a hint: a backend that stopped offering discard simply ignores it.
      if (f.info.discard) await f.discard(offset, length, { secure: false });
    },
    async writeZeroes(offset, length, mayTrim = false) {
      aligned(offset, length);
      return zeroRange(f, offset, length, mayTrim);
    },
    fastZero: (mayTrim) => mayTrim && zeroByDiscard(f),
  };
}
