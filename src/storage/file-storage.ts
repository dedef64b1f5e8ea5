/**
 * A raw image file. One positioned vectored call per request (preadv/pwritev straight from the
 * mapped grant pages: no copy), made through libuv's threadpool, at most `poolSlots` at once
 * (file-io.ts): the driver domain's one thread serves every VBD, so it must never wait for a disk;
 * a stalled image then holds only its own share of the pool. Holes are punched by fallocate
 * children, one at a time per image (hole-punch.ts).
 *
 * `io: 'sync'` makes reads, writes and flushes blocking calls instead; so does `setOwnThread(true)`,
 * which the driver domain says when its thread (or a queue thread) serves this handle alone: a
 * round trip through the pool costs a pool thread's wake-up and a completion's (about half the
 * CPU of a 4 KiB request, docs/decisions.md "a thread that serves one VBD reads synchronously"),
 * and a stall there holds up only this handle's VBD. Opening, the size, discards and closing stay
 * asynchronous either way.
 */
import {
  close, closeSync, constants, existsSync, fstat, fdatasyncSync, fstatSync, ftruncateSync, open, openSync,
  readvSync, unlinkSync, writevSync,
} from 'node:fs';
import { resolve } from 'node:path';
import { promisify } from 'node:util';
import { FileIo } from './file-io.js';
import { HolePuncher } from './hole-punch.js';
import { checkRange, totalLength } from './range.js';
import { StorageError, type BlockStorage, type StorageKind, type StorageSpecBase } from './storage.js';

/** Largest single zero-filling write, and the size of the one zero buffer reused for all of them. */
const ZERO_CHUNK = 1024 * 1024;
/** The probe punches this much, past the file's end (so it can never touch the image's bytes). */
const PROBE_LENGTH = 64 * 1024;
/**
 * Operations one handle has in libuv's threadpool at once, unless told otherwise: libuv's default
 * pool size, so one handle alone loses no parallelism Node would have given it.
 */
export const DEFAULT_POOL_SLOTS = 4;

export interface FileStorageOptions {
  readonly readOnly?: boolean;
  readonly sectorSize?: 512 | 4096;
  /** 'async' (the default): through libuv's threadpool. 'sync': blocking reads, writes, flushes. */
  readonly io?: 'sync' | 'async';
  /** Operations in libuv's threadpool at once (default DEFAULT_POOL_SLOTS). */
  readonly poolSlots?: number;
}

export interface FileCreateOptions {
  /** Resize an existing file (growing only) instead of refusing it. */
  readonly force?: boolean;
}

function errnoCode(e: unknown): StorageError['code'] {
  const c = typeof e === 'object' && e !== null ? (e as NodeJS.ErrnoException).code : undefined;
  return c === 'ENOENT' || c === 'EROFS' || c === 'ENOSPC' || c === 'EEXIST' || c === 'EINVAL' ? c : 'EIO';
}

function why(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

const openFd = promisify(open);
const closeFd = promisify(close);
const fstatFd = promisify(fstat);

export class FileStorage implements BlockStorage {
  readonly sectorSize: number;
  /**
   * The logical sector size. Our I/O goes through the page cache, as a Linux loop device's does
   * without direct I/O (which then reports a physical block size of its logical one); st_blksize is
   * the file system's preferred I/O size, not a sector, and the disk beneath is not ours to see.
   */
  get physicalSectorSize(): number {
    return this.sectorSize;
  }
  readonly readOnly: boolean;
  private currentSize: number;
  private fd: number | undefined;
  /** Reads, writes and flushes as blocking calls: `io: 'sync'`, or a thread of our own (setOwnThread). */
  private sync: boolean;
  private readonly syncOption: boolean;
  private readonly io: FileIo;
  private readonly holes: HolePuncher;
  private punches = false;
  private zeroes: Uint8Array | undefined;

  private constructor(readonly path: string, fd: number, bytes: number, sectorSize: 512 | 4096, opts: FileStorageOptions) {
    this.fd = fd;
    this.sectorSize = sectorSize;
    this.readOnly = opts.readOnly === true;
    this.syncOption = opts.io === 'sync';
    this.sync = this.syncOption;
    this.io = new FileIo(fd, opts.poolSlots ?? DEFAULT_POOL_SLOTS);
    this.currentSize = this.wholeSectors(bytes);
    // fallocate is pointed at our own descriptor through /proc where there is one, so a hole is
    // punched in the file we have open even if its path was since renamed or replaced. (The
    // check looks at /proc's directory, not through the link: a stat of the file itself could
    // stall with its disk.)
    const proc = `/proc/${process.pid}/fd`;
    this.holes = new HolePuncher(existsSync(proc) ? `${proc}/${fd}` : path);
  }

  /** Opens an existing image; its size is rounded down to whole sectors. */
  static async open(path: string, opts: FileStorageOptions = {}): Promise<FileStorage> {
    const ss = opts.sectorSize ?? 512;
    if (ss !== 512 && ss !== 4096) throw new StorageError('EINVAL', `sector size ${String(ss)}: use 512 or 4096`);
    let fd: number;
    try {
      // Asynchronous, as everything below: a stalled disk can stall an open too (a FUSE open).
      fd = await openFd(path, opts.readOnly === true ? constants.O_RDONLY : constants.O_RDWR);
    } catch (e) {
      throw new StorageError(errnoCode(e), `cannot open image ${path}: ${why(e)}`);
    }
    try {
      const st = await fstatFd(fd);
      if (!st.isFile()) throw new StorageError('EINVAL', `${path} is not a regular file`);
      const s = new FileStorage(path, fd, st.size, ss, opts);
      // A read-only image refuses discard, so it never frees anything: no need to probe.
      if (!s.readOnly) s.punches = await s.probePunch(st.size);
      return s;
    } catch (e) {
      await closeFd(fd).catch(() => undefined);
      throw e instanceof StorageError ? e : new StorageError(errnoCode(e), `cannot open image ${path}: ${why(e)}`);
    }
  }

  /** Creates a sparse image of `size` bytes; refuses to overwrite (unless `force`) or to shrink. */
  static async create(path: string, size: number, opts: FileCreateOptions = {}): Promise<void> {
    if (!Number.isSafeInteger(size) || size <= 0) throw new StorageError('EINVAL', `image size ${size}: must be a positive integer`);
    const force = opts.force === true;
    let fd: number;
    try {
      fd = openSync(path, constants.O_RDWR | constants.O_CREAT | (force ? 0 : constants.O_EXCL), 0o644);
    } catch (e) {
      const code = errnoCode(e);
      throw new StorageError(code, code === 'EEXIST' ? `${path} exists: refusing to overwrite it without force` : `cannot create ${path}: ${why(e)}`);
    }
    let failed = true;
    try {
      const old = fstatSync(fd).size;
      if (size < old) throw new StorageError('EINVAL', `${path} holds ${old} bytes: refusing to shrink it to ${size}`);
      try {
        ftruncateSync(fd, size); // extends with a hole: nothing is allocated until written
      } catch (e) {
        throw new StorageError(errnoCode(e), `cannot size ${path} to ${size} bytes: ${why(e)}`);
      }
      failed = false;
    } finally {
      closeSync(fd);
      // Without force the file is ours (O_EXCL): do not leave a half-made image behind.
      if (failed && !force) {
        try {
          unlinkSync(path);
        } catch {
          // already gone: the error that brought us here is the one to report
        }
      }
    }
  }

  setOwnThread(own: boolean): void {
    this.sync = own || this.syncOption;
  }

  /** Usable bytes: the file's size rounded down to whole sectors (never more). */
  get size(): number {
    return this.currentSize;
  }

  /** Whether discard punches holes (probed at open; false once a punch has failed). */
  get canDiscard(): boolean {
    return this.punches;
  }

  async read(offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    checkRange(offset, totalLength(buffers), this.currentSize, this.sectorSize);
    await this.transfer(false, offset, buffers);
  }

  async write(offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    this.writable();
    checkRange(offset, totalLength(buffers), this.currentSize, this.sectorSize);
    await this.transfer(true, offset, buffers);
  }

  async flush(): Promise<void> {
    if (this.readOnly) return; // nothing of ours to make durable
    const fd = this.fdOrThrow();
    try {
      if (this.sync) fdatasyncSync(fd);
      else await this.io.fdatasync();
    } catch (e) {
      throw new StorageError(errnoCode(e), `flushing ${this.path}: ${why(e)}`);
    }
  }

  /** Punches a hole; where that does not work, zeroes the range by writing instead. */
  async discard(offset: number, length: number): Promise<void> {
    this.writable();
    checkRange(offset, length, this.currentSize, this.sectorSize);
    if (length === 0) return;
    this.fdOrThrow(); // fail as closed before spawning anything
    if (this.punches) {
      if (await this.holes.punch(offset, length)) return;
      this.punches = false; // remember: do not spawn a doomed fallocate for every later discard
    }
    await this.writeZeroes(offset, length);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.writable();
    checkRange(offset, length, this.currentSize, this.sectorSize);
    this.zeroes ??= new Uint8Array(ZERO_CHUNK);
    for (let at = offset; at < offset + length; at += ZERO_CHUNK) {
      const n = Math.min(ZERO_CHUNK, offset + length - at);
      await this.transfer(true, at, [this.zeroes.subarray(0, n)]);
    }
  }

  async refreshSize(): Promise<number> {
    let bytes: number;
    try {
      this.fdOrThrow();
      bytes = await this.io.size(); // a FUSE file's fstat can stall with its disk
    } catch (e) {
      throw e instanceof StorageError ? e : new StorageError(errnoCode(e), `stat ${this.path}: ${why(e)}`);
    }
    this.currentSize = this.wholeSectors(bytes);
    return this.currentSize;
  }

  async close(): Promise<void> {
    if (this.fd === undefined) return;
    const fd = this.fd;
    this.fd = undefined; // before closing: a failed close must not be retried on a reused fd number
    // Whatever still waits for the pool or for fallocate fails; what is in the pool, and a running
    // fallocate (pointed at /proc/PID/fd/N), finish before the number can be reused.
    await Promise.all([this.io.close(new StorageError('EIO', `${this.path} is closed`)), this.holes.close()]);
    try {
      await closeFd(fd); // a FUSE close waits for its flush
    } catch (e) {
      throw new StorageError(errnoCode(e), `closing ${this.path}: ${why(e)}`);
    }
  }

  /**
   * Vectored transfer, continuing after short reads/writes until every buffer is done. A read that
   * hits the end of the file (it shrank under us) fails like the loop driver's: EIO, with the
   * unread rest zeroed so no stale bytes reach the guest.
   */
  private async transfer(write: boolean, offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    let bufs = buffers.filter((b) => b.length > 0);
    let pos = offset;
    while (bufs.length > 0) {
      let n: number;
      try {
        n = await this.vector(write, bufs, pos);
      } catch (e) {
        throw e instanceof StorageError ? e : new StorageError(errnoCode(e), `${write ? 'writing' : 'reading'} ${this.path} at ${pos}: ${why(e)}`);
      }
      if (n <= 0) {
        if (!write) for (const b of bufs) b.fill(0);
        throw new StorageError('EIO', `${write ? 'writing' : 'reading'} ${this.path} at ${pos}: ${write ? 'no progress' : 'end of file'}`);
      }
      pos += n;
      const rest: Uint8Array[] = [];
      for (const b of bufs) {
        if (n >= b.length) {
          n -= b.length;
          continue;
        }
        rest.push(n > 0 ? b.subarray(n) : b);
        n = 0;
      }
      bufs = rest;
    }
  }

  private vector(write: boolean, bufs: Uint8Array[], pos: number): Promise<number> | number {
    const fd = this.fdOrThrow();
    if (this.sync) return write ? writevSync(fd, bufs, pos) : readvSync(fd, bufs, pos);
    return write ? this.io.writev(bufs, pos) : this.io.readv(bufs, pos);
  }

  /** Punches past the end of the file: tells whether holes work here without touching a byte. */
  private probePunch(end: number): Promise<boolean> {
    const at = Math.ceil(end / PROBE_LENGTH) * PROBE_LENGTH + PROBE_LENGTH;
    return this.holes.punch(at, PROBE_LENGTH);
  }

  private wholeSectors(bytes: number): number {
    return bytes - (bytes % this.sectorSize);
  }

  private fdOrThrow(): number {
    if (this.fd === undefined) throw new StorageError('EIO', `${this.path} is closed`);
    return this.fd;
  }

  private writable(): void {
    if (this.readOnly) throw new StorageError('EROFS', `${this.path} is read-only`);
  }
}

/** A raw image file, by path. */
export interface FileStorageSpec extends StorageSpecBase {
  readonly kind: 'file';
  readonly path: string;
  readonly io?: 'sync' | 'async';
  /** Operations this handle has in libuv's threadpool at once (default DEFAULT_POOL_SLOTS). */
  readonly poolSlots?: number;
}

export const fileStorageKind: StorageKind<FileStorageSpec> = {
  kind: 'file',
  open: (s) => FileStorage.open(s.path, { readOnly: s.readOnly, sectorSize: s.sectorSize, io: s.io, poolSlots: s.poolSlots }),
  describe: (s) => s.path,
  // Any path (made absolute), but not something with a URI scheme: that is another kind's.
  fromArgument: (arg, o) => (/^[a-z][a-z0-9+.-]*:\/\//i.test(arg) ? undefined : { kind: 'file', path: resolve(arg), sectorSize: o.sectorSize, readOnly: o.readOnly }),
  // Another open of the same file shares its page cache, and fdatasync covers the file.
  shareable: () => true,
};
