/**
 * A guest's block device seen as an NBD export: every byte a client reads or writes goes through
 * blkfront, grants, the ring and blkback. A disk of another guest is reached over a control
 * channel into that guest (the NBD server lives in the first guest's thread).
 */
import type { Blkfront, DeviceInfo } from '../blkfront/index.js';
import { NbdDeviceError, NBD_EINVAL, type NbdExportDevice } from '../nbd/index.js';
import type { RpcClient } from './rpc.js';

const ZERO_CHUNK = 1024 * 1024;

/** What a disk must offer to be exported: blkfront's API, local or remote. */
export interface ExportableDisk {
  info(): DeviceInfo;
  read(offset: number, length: number): Promise<Uint8Array>;
  /** Into the caller's buffer (a local disk only: a remote one's bytes arrive in a message anyway). */
  readInto?(offset: number, buf: Uint8Array): Promise<void>;
  write(offset: number, data: Uint8Array): Promise<void>;
  flush(): Promise<void>;
  discard(offset: number, length: number, secure: boolean): Promise<void>;
}

export function localDisk(f: Blkfront): ExportableDisk {
  return {
    info: () => f.info,
    read: (o, l) => f.read(o, l),
    readInto: (o, b) => f.readInto(o, b),
    write: (o, d) => f.write(o, d),
    flush: () => f.flush(),
    discard: (o, l, secure) => f.discard(o, l, { secure }),
  };
}

/** A disk attached in another guest, at `frontDir`, reached through `rpc`; `info` as of plugging. */
export function remoteDisk(rpc: RpcClient, frontDir: string, info: DeviceInfo): ExportableDisk {
  return {
    info: () => info,
    read: (o, l) => rpc.call('read', frontDir, o, l),
    write: (o, d) => rpc.call('write', frontDir, o, d),
    flush: () => rpc.call('flush', frontDir),
    discard: (o, l, secure) => rpc.call('discard', frontDir, o, l, secure),
  };
}

/**
 * The NBD view of a disk. Several connections share one blkfront, one ring and one backend, so a
 * flush on any covers writes completed on all: NBD_FLAG_CAN_MULTI_CONN is safe.
 */
export function exportDevice(disk: ExportableDisk): NbdExportDevice {
  let zeroes: Uint8Array | undefined;
  const aligned = (offset: number, length: number) => {
    const bs = disk.info().sectorSize;
    if (offset % bs !== 0 || length % bs !== 0) throw new NbdDeviceError(NBD_EINVAL, `offset ${offset} length ${length} not aligned to ${bs}-byte sectors`);
  };
  return {
    get size() { return disk.info().size; },
    get readOnly() { return disk.info().readOnly; },
    get blockSize() { return disk.info().sectorSize; },
    canFlush: true,
    get canTrim() { return disk.info().discard; },
    multiConn: true,
    read(offset, length) {
      aligned(offset, length);
      return disk.read(offset, length);
    },
    ...(disk.readInto !== undefined ? {
      readInto(offset: number, buf: Uint8Array) {
        aligned(offset, buf.length);
        return disk.readInto!(offset, buf);
      },
    } : {}),
    write(offset, data) {
      aligned(offset, data.length);
      return disk.write(offset, data);
    },
    flush: () => disk.flush(),
    async trim(offset, length) {
      aligned(offset, length);
      // A trim is a hint: a backend that stopped offering discard simply ignores it.
      if (disk.info().discard) await disk.discard(offset, length, false);
    },
    async writeZeroes(offset, length) {
      aligned(offset, length);
      // blkif has no write-zeroes: a secure discard is one where offered (the backend overwrites
      // with zeroes); a plain discard need not read back as zeroes, so otherwise write them.
      if (disk.info().discardSecure) return disk.discard(offset, length, true);
      zeroes ??= new Uint8Array(ZERO_CHUNK);
      const writes: Promise<void>[] = [];
      for (let at = offset; at < offset + length; at += ZERO_CHUNK) writes.push(disk.write(at, zeroes.subarray(0, Math.min(ZERO_CHUNK, offset + length - at))));
      await Promise.all(writes);
    },
  };
}
