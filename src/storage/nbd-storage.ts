/**
 * A disk served by a remote NBD server (qemu-nbd, nbdkit, nbd-server, our own NbdServer): blkback
 * serves the VBD, the bytes live on the other end of one or more NBD connections. The protocol
 * (handshake, TLS, connections, reconnection, size queries) is nbd/client.ts; this is the
 * BlockStorage over it: whole sectors, range checks, read-only, and the client's errors as
 * StorageErrors (same errno name, same message).
 *
 * Discard is NBD_CMD_WRITE_ZEROES without NBD_CMD_FLAG_NO_HOLE rather than NBD_CMD_TRIM: the
 * server may deallocate, but must read back zeroes, as BlockStorage.discard promises (a trim
 * need not: qemu's qcow2 driver ignores trims of part of a cluster).
 */
import {
  NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, NbdClient, NbdClientError,
  type NbdClientOptions, type NbdClientStats, type NbdExportInfo,
} from '../nbd/index.js';
import { checkRange, totalLength } from './range.js';
import { StorageError, type BlockStorage, type StorageKind, type StorageSpecBase } from './storage.js';

export interface NbdStorageOptions extends Omit<NbdClientOptions, 'sectorSize'> {
  /** Refuse writes even if the export accepts them. */
  readonly readOnly?: boolean;
  readonly sectorSize?: 512 | 4096;
}

/** Counters, for tests and status lines. */
export type NbdStorageStats = NbdClientStats;

/** The StorageError for a client's failure (same errno name, same message); anything else as it is. */
function storageError(e: unknown): unknown {
  if (!(e instanceof NbdClientError)) return e;
  // The client's errno names are the storage layer's: this fails to compile if they part.
  const code: StorageError['code'] = e.code;
  return new StorageError(code, e.message);
}

/** Runs `f`, turning a client's failure (thrown or rejected) into a StorageError. */
async function mapped<T>(f: () => Promise<T>): Promise<T> {
  try {
    return await f();
  } catch (e) {
    throw storageError(e);
  }
}

export class NbdStorage implements BlockStorage {
  readonly sectorSize: number;
  readonly readOnly: boolean;
  /** Whether discard lets the server free space (it can both trim and write zeroes). */
  readonly canDiscard: boolean;
  /** Several connections see one another's writes and flushes (NBD_FLAG_CAN_MULTI_CONN). */
  readonly multiConn: boolean;

  private constructor(private readonly client: NbdClient, opts: NbdStorageOptions) {
    this.sectorSize = client.sectorSize;
    const f = client.info.transmissionFlags;
    this.readOnly = opts.readOnly === true || (f & NBD_FLAG_READ_ONLY) !== 0;
    this.canDiscard = (f & NBD_FLAG_SEND_TRIM) !== 0 && (f & NBD_FLAG_SEND_WRITE_ZEROES) !== 0;
    this.multiConn = client.multiConn;
  }

  /**
   * Connects to `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH` (or their TLS
   * forms `nbds://` and `nbds+unix://`) and negotiates (NbdClient.connect).
   * Fails with EINVAL for a bad URI, options or TLS files, or an export whose block sizes do not fit the
   * sector size, ENOENT for an export the server does not have, EIO when the server cannot be
   * reached (no retrying here: reconnection is for connections lost later).
   */
  static async connect(uri: string, opts: NbdStorageOptions = {}): Promise<NbdStorage> {
    const ss = opts.sectorSize ?? 512;
    if (ss !== 512 && ss !== 4096) throw new StorageError('EINVAL', `sector size ${String(ss)}: use 512 or 4096`);
    const client = await mapped(() => NbdClient.connect(uri, { ...opts, sectorSize: ss }));
    return new NbdStorage(client, opts);
  }

  /** The server and export, as a canonical URI (what logs and errors name). */
  get where(): string {
    return this.client.where;
  }

  /** What the server said about the export when it was first connected. */
  get info(): NbdExportInfo {
    return this.client.info;
  }

  /** Usable bytes: the export's size rounded down to whole sectors. */
  get size(): number {
    return this.client.size - (this.client.size % this.sectorSize);
  }

  /**
   * The export's preferred block size (NBD_INFO_BLOCK_SIZE): smaller writes cost the server a
   * read-modify-write, which is what a physical sector means to a guest. Bounded to the sector
   * size below and 64 KiB above; the sector size when the server gave none.
   */
  get physicalSectorSize(): number {
    const p = this.info.blockSize?.preferred;
    if (p === undefined || (p & (p - 1)) !== 0 || p <= this.sectorSize) return this.sectorSize;
    return Math.min(p, 65536);
  }

  /** Whether the server accepted structured replies. */
  get structuredReplies(): boolean {
    return this.client.structuredReplies;
  }

  get stats(): NbdStorageStats {
    return this.client.stats;
  }

  read(offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    return mapped(async () => {
      this.client.assertOpen();
      checkRange(offset, totalLength(buffers), this.size, this.sectorSize);
      await this.client.read(offset, buffers);
    });
  }

  write(offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    return mapped(async () => {
      this.writable();
      checkRange(offset, totalLength(buffers), this.size, this.sectorSize);
      await this.client.write(offset, buffers);
    });
  }

  /** NBD_CMD_FLUSH on every connection (nothing when read-only or the server does not take flushes). */
  flush(): Promise<void> {
    return mapped(async () => {
      this.client.assertOpen();
      if (!this.readOnly) await this.client.flush();
    });
  }

  /**
   * Drops a range so that it reads back as zeroes: NBD_CMD_WRITE_ZEROES without NO_HOLE (the
   * server may deallocate, as for a trim, but must leave zeroes, which NBD_CMD_TRIM does not
   * promise: qemu's qcow2 ignores a trim of part of a cluster); writes zeroes where the server
   * cannot write zeroes itself.
   */
  discard(offset: number, length: number): Promise<void> {
    return mapped(async () => {
      this.writable();
      checkRange(offset, length, this.size, this.sectorSize);
      await this.client.writeZeroes(offset, length, false);
    });
  }

  /** Overwrites with zeroes: NBD_CMD_WRITE_ZEROES with NO_HOLE, else writes zeroes. */
  writeZeroes(offset: number, length: number): Promise<void> {
    return mapped(async () => {
      this.writable();
      checkRange(offset, length, this.size, this.sectorSize);
      await this.client.writeZeroes(offset, length, true);
    });
  }

  /**
   * NBD tells of a resize only in a handshake: the client asks the server again at most every
   * `sizeCheckMs`; calls meanwhile, and a failed query, keep the size.
   */
  refreshSize(now = false): Promise<number> {
    return mapped(async () => {
      await this.client.refreshSize(now);
      return this.size;
    });
  }

  /**
   * Lets pending requests finish (up to 5 s), sends NBD_CMD_DISC on every connection and closes
   * them. Requests still pending then fail with EIO, as does every later one. Idempotent.
   */
  close(): Promise<void> {
    return mapped(() => this.client.close());
  }

  private writable(): void {
    this.client.assertOpen();
    if (this.readOnly) throw new StorageError('EROFS', `NBD export ${this.where} is read-only`);
  }
}

/** An export of a remote NBD server: `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH` (TLS: `nbds://`, `nbds+unix://`). */
export interface NbdStorageSpec extends StorageSpecBase {
  readonly kind: 'nbd';
  readonly uri: string;
  readonly connections?: number;
}

export const nbdStorageKind: StorageKind<NbdStorageSpec> = {
  kind: 'nbd',
  open: (s, log) => NbdStorage.connect(s.uri, { readOnly: s.readOnly, sectorSize: s.sectorSize, connections: s.connections, log }),
  describe: (s) => s.uri,
  fromArgument: (arg, o) => (/^nbds?(\+unix)?:\/\//.test(arg) ? { kind: 'nbd', uri: arg, sectorSize: o.sectorSize, readOnly: o.readOnly, connections: o.connections } : undefined),
  // Only when the server says several connections see one another's writes and flushes.
  shareable: (s) => s instanceof NbdStorage && s.multiConn,
};
