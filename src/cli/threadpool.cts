/**
 * libuv's threadpool for `blkif serve`: how big it is made, and each image's share of it.
 *
 * Image files are read and written through the pool (storage/file-io.ts), at most a share of
 * slots per storage handle at once, so that an image whose disk stalls holds its share and no
 * more. That works only if the pool has a share for every handle and threads to spare: libuv's
 * default of 4, for every disk of the process together, would be taken by one stalled image. The
 * pool is process-wide (every worker thread, so every driver domain, queues to it), libuv sizes
 * it once from UV_THREADPOOL_SIZE when it first starts, and Node starts it while it loads an ES
 * module entry point, before that module's first line: so the executable (blkif.cts) is CommonJS
 * and sizes it from its arguments, and `serve` divides what it got (serveThreadpoolShare).
 *
 * CommonJS, so that blkif.cts can require it before any ES module loads; serve.ts imports it too.
 */

/** libuv's pool size when UV_THREADPOOL_SIZE is unset, and its most (threadpool.c MAX_THREADPOOL_SIZE). */
export const LIBUV_DEFAULT_THREADS = 4;
export const LIBUV_MAX_THREADS = 1024;
/**
 * Threads left over for everything but the image files: getaddrinfo for remote exports' host
 * names, the odd fs call outside the data path, and the share of a stalled image's neighbours.
 */
export const SPARE_THREADS = 4;
/** A handle's share when the pool has room (storage's DEFAULT_POOL_SLOTS: libuv's default pool). */
export const SLOTS_PER_HANDLE = 4;
/** The most queues a disk has, each with a handle of its own under --queue-threads (serve's --queues). */
const MAX_QUEUES = 4;

/** The pool libuv runs with, from the UV_THREADPOOL_SIZE it read (as libuv: atoi, at least 1, at most 1024). */
export function effectiveThreadpool(value: string | undefined): number {
  if (value === undefined) return LIBUV_DEFAULT_THREADS;
  const n = Number.parseInt(value, 10);
  return Math.min(LIBUV_MAX_THREADS, Math.max(1, Number.isNaN(n) ? 0 : n));
}

/**
 * The pool for `blkif serve ARGS`, from its arguments alone (before anything parses them): every
 * word that is not an option may be an image (option values count too: more threads than needed,
 * never fewer), or --vbds N default images; each opens a handle, and one more per queue with
 * --queue-threads. Idle pool threads cost a stack of address space and little memory.
 */
export function serveThreadpool(args: readonly string[]): number {
  let words = 0;
  let vbds = 0;
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--') {
      words += args.length - i - 1;
      break;
    }
    const m = /^--vbds(?:=(.*))?$/.exec(a);
    if (m !== null) vbds = Math.max(vbds, Number(m[1] ?? args[i + 1]) || 0);
    if (!a.startsWith('-')) words++;
  }
  const handles = imageHandles(Math.max(1, words, vbds), args.includes('--queue-threads'), MAX_QUEUES);
  return Math.min(LIBUV_MAX_THREADS, SPARE_THREADS + SLOTS_PER_HANDLE * handles);
}

/** Handles `images` image files open: one each, and one more per queue with queue threads. */
export function imageHandles(images: number, queueThreads: boolean, queues: number): number {
  return images * (queueThreads ? queues + 1 : 1);
}

export interface ThreadpoolShare {
  /** Slots each handle gets: SLOTS_PER_HANDLE, or fewer (at least 1) in a smaller pool. */
  readonly slots: number;
  /** Whether stalled images could take every thread (the pool was sized by someone else, too small). */
  readonly tight: boolean;
}

/** Divides a pool of `threads` between `handles` image handles, keeping SPARE_THREADS back. */
export function serveThreadpoolShare(threads: number, handles: number): ThreadpoolShare {
  if (handles === 0) return { slots: SLOTS_PER_HANDLE, tight: false };
  const slots = Math.max(1, Math.min(SLOTS_PER_HANDLE, Math.floor((threads - SPARE_THREADS) / handles)));
  return { slots, tight: slots * handles >= threads };
}
