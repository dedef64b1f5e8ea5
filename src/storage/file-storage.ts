/**
 * A raw image file. One positioned vectored call per request (preadv/pwritev straight from the
 * mapped grant pages: no copy). 'sync' I/O is the default: the backend has its own thread and a
 * page-cache hit is far cheaper synchronously than through libuv's pool; 'async' suits slow disks.
 */
import { execFile } from 'node:child_process';
import { closeSync, constants, fdatasync, fdatasyncSync, fstatSync, ftruncateSync, openSync, readv, readvSync, writev, writevSync } from 'node:fs';
import { promisify } from 'node:util';
import { checkRange, totalLength } from './range.js';
import { StorageError, type BlockStorage } from './storage.js';

const execFileP = promisify(execFile);
const ZERO_CHUNK = 1024 * 1024;

export interface FileStorageOptions {
  readonly readOnly?: boolean;
  readonly sectorSize?: 512 | 4096;
  readonly io?: 'sync' | 'async';
}

function errnoCode(e: unknown): StorageError['code'] {
  const c = (e as NodeJS.ErrnoException).code;
  return c === 'ENOENT' || c === 'EROFS' || c === 'ENOSPC' || c === 'EEXIST' || c === 'EINVAL' ? c : 'EIO';
}

export class FileStorage implements BlockStorage {
  size: number;
  readonly sectorSize: number;
  readonly readOnly: boolean;
  canDiscard = true;
  private fd: number | undefined;
  private readonly async: boolean;
  private zeroes: Uint8Array | undefined;

  private constructor(readonly path: string, fd: number, opts: FileStorageOptions) {
    this.fd = fd;
    this.sectorSize = opts.sectorSize ?? 512;
    this.readOnly = opts.readOnly === true;
    this.async = opts.io === 'async';
    this.size = this.wholeSectors(fstatSync(fd).size);
  }

  /** Opens an existing image; its size is rounded down to whole sectors. */
  static async open(path: string, opts: FileStorageOptions = {}): Promise<FileStorage> {
    const ss = opts.sectorSize ?? 512;
    if (ss !== 512 && ss !== 4096) throw new StorageError('EINVAL', `sector size ${String(ss)}: use 512 or 4096`);
    let fd: number;
    try {
      fd = openSync(path, opts.readOnly === true ? constants.O_RDONLY : constants.O_RDWR);
    } catch (e) {
      throw new StorageError(errnoCode(e), `cannot open image ${path}: ${(e as Error).message}`);
    }
    if (!fstatSync(fd).isFile()) {
      closeSync(fd);
      throw new StorageError('EINVAL', `${path} is not a regular file`);
    }
    return new FileStorage(path, fd, opts);
  }

  /** Creates a sparse image of `size` bytes; refuses to overwrite (unless `force`) or to shrink. */
  static async create(path: string, size: number, opts: { force?: boolean } = {}): Promise<void> {
    if (!Number.isSafeInteger(size) || size <= 0) throw new StorageError('EINVAL', `image size ${size}: must be a positive integer`);
    let fd: number;
    try {
      fd = openSync(path, constants.O_RDWR | constants.O_CREAT | (opts.force === true ? 0 : constants.O_EXCL), 0o644);
    } catch (e) {
      throw new StorageError(errnoCode(e), errnoCode(e) === 'EEXIST' ? `${path} exists (use --force to resize it)` : `cannot create ${path}: ${(e as Error).message}`);
    }
    try {
      const old = fstatSync(fd).size;
      if (size < old) throw new StorageError('EINVAL', `${path} holds ${old} bytes: refusing to shrink it to ${size}`);
      ftruncateSync(fd, size);
    } finally {
      closeSync(fd);
    }
  }

  private wholeSectors(bytes: number): number {
    return bytes - (bytes % this.sectorSize);
  }

  private get handle(): number {
    if (this.fd === undefined) throw new StorageError('EIO', `${this.path} is closed`);
    return this.fd;
  }

  async read(offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    checkRange(offset, totalLength(buffers), this.size, this.sectorSize);
    await this.transfer(false, offset, buffers);
  }

  async write(offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    this.writable();
    checkRange(offset, totalLength(buffers), this.size, this.sectorSize);
    await this.transfer(true, offset, buffers);
  }

  /** Vectored transfer, continuing after short reads/writes until every buffer is done. */
  private async transfer(write: boolean, offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    let bufs = buffers.filter((b) => b.length > 0);
    let pos = offset;
    while (bufs.length > 0) {
      let n: number;
      try {
        n = await this.vector(write, bufs, pos);
      } catch (e) {
        throw new StorageError(errnoCode(e), `${write ? 'writing' : 'reading'} ${this.path} at ${pos}: ${(e as Error).message}`);
      }
      if (n <= 0) {
        if (write) throw new StorageError('EIO', `writing ${this.path} at ${pos}: no progress`);
        // Past the file's end (it shrank under us): what is not there reads as zeroes.
        for (const b of bufs) b.fill(0);
        return;
      }
      pos += n;
      const rest: Uint8Array[] = [];
      for (const b of bufs) {
        if (n >= b.length) { n -= b.length; continue; }
        rest.push(n > 0 ? b.subarray(n) : b);
        n = 0;
      }
      bufs = rest;
    }
  }

  private vector(write: boolean, bufs: Uint8Array[], pos: number): Promise<number> | number {
    const fd = this.handle;
    if (!this.async) return write ? writevSync(fd, bufs, pos) : readvSync(fd, bufs, pos);
    return new Promise((resolve, reject) => {
      const cb = (e: NodeJS.ErrnoException | null, n: number) => (e ? reject(e) : resolve(n));
      if (write) writev(fd, bufs, pos, cb);
      else readv(fd, bufs, pos, cb);
    });
  }

  async flush(): Promise<void> {
    if (this.readOnly) return;
    const fd = this.handle;
    try {
      if (this.async) await new Promise<void>((res, rej) => fdatasync(fd, (e) => (e ? rej(e) : res())));
      else fdatasyncSync(fd);
    } catch (e) {
      throw new StorageError(errnoCode(e), `flushing ${this.path}: ${(e as Error).message}`);
    }
  }

  /** Punches a hole (util-linux fallocate: Node has no fallocate); zeroes by writing where that fails. */
  async discard(offset: number, length: number): Promise<void> {
    this.writable();
    checkRange(offset, length, this.size, this.sectorSize);
    if (length === 0) return;
    if (this.canDiscard) {
      try {
        await execFileP('fallocate', ['--punch-hole', '--keep-size', '--offset', String(offset), '--length', String(length), this.path]);
        return;
      } catch {
        this.canDiscard = false; // no fallocate, or a filesystem without holes: write zeroes from now on
      }
    }
    await this.writeZeroes(offset, length);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.writable();
    checkRange(offset, length, this.size, this.sectorSize);
    this.zeroes ??= new Uint8Array(ZERO_CHUNK);
    for (let at = offset; at < offset + length; at += ZERO_CHUNK) {
      const n = Math.min(ZERO_CHUNK, offset + length - at);
      await this.transfer(true, at, [this.zeroes.subarray(0, n)]);
    }
  }

  async refreshSize(): Promise<number> {
    this.size = this.wholeSectors(fstatSync(this.handle).size);
    return this.size;
  }

  async close(): Promise<void> {
    if (this.fd === undefined) return;
    const fd = this.fd;
    this.fd = undefined;
    closeSync(fd);
  }

  private writable(): void {
    if (this.readOnly) throw new StorageError('EROFS', `${this.path} is read-only`);
  }
}
