/**
 * A guest's block device seen as an NBD export: every byte a client reads or writes goes through
 * blkfront, grants, the ring and blkback. The NBD server runs in the thread of the guest that
 * holds the disks, so an export calls blkfront directly.
 */
import type { Blkfront } from '../blkfront/index.js';
import { NbdDeviceError, NBD_EINVAL, type NbdExportDevice } from '../nbd/index.js';

const ZERO_CHUNK = 1024 * 1024;

/**
 * The NBD view of a disk. Several connections share one blkfront, one ring and one backend, so a
 * flush on any covers writes completed on all: NBD_FLAG_CAN_MULTI_CONN is safe.
 */
export function exportDevice(f: Blkfront): NbdExportDevice {
  let zeroes: Uint8Array | undefined;
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
    async writeZeroes(offset, length) {
      aligned(offset, length);
      // blkif has no write-zeroes: a secure discard is one where offered (the backend overwrites
      // with zeroes); a plain discard need not read back as zeroes, so otherwise write them.
      if (f.info.discardSecure) return f.discard(offset, length, { secure: true });
      zeroes ??= new Uint8Array(ZERO_CHUNK);
      const writes: Promise<void>[] = [];
      for (let at = offset; at < offset + length; at += ZERO_CHUNK) writes.push(f.write(at, zeroes.subarray(0, Math.min(ZERO_CHUNK, offset + length - at))));
      await Promise.all(writes);
    },
  };
}
