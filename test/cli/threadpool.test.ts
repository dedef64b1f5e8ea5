/**
 * libuv's threadpool under `blkif serve`: the size the blkif executable asks for from serve's
 * arguments, each image file's share of it, and that the size asked for is the size libuv runs
 * with (threads counted in /proc/PID/task, against a serve told UV_THREADPOOL_SIZE=3).
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { sparseImage, tempDir } from '../e2e/helpers.js';
import { serve } from './serve-support.js';
import {
  LIBUV_DEFAULT_THREADS,
  LIBUV_MAX_THREADS,
  SLOTS_PER_HANDLE,
  SPARE_THREADS,
  effectiveThreadpool,
  serveThreadpool,
  serveThreadpoolShare,
} from '../../src/cli/threadpool.cjs';

const tmp = tempDir('blkif-threadpool-');
after(() => tmp.cleanup());

test('the pool libuv runs with, read as libuv reads UV_THREADPOOL_SIZE', () => {
  assert.equal(effectiveThreadpool(undefined), LIBUV_DEFAULT_THREADS);
  assert.equal(effectiveThreadpool('12'), 12);
  assert.equal(effectiveThreadpool('0'), 1);
  assert.equal(effectiveThreadpool('junk'), 1);
  assert.equal(effectiveThreadpool('5000'), LIBUV_MAX_THREADS);
});

test('the executable sizes the pool for every word that may be an image, --vbds and queue threads', () => {
  const per = (handles: number) => SPARE_THREADS + SLOTS_PER_HANDLE * handles;
  assert.equal(serveThreadpool([]), per(1), 'no image: the default one');
  assert.equal(serveThreadpool(['a.img', 'b.img']), per(2));
  assert.equal(serveThreadpool(['a.img', 'b.img', '--port', '0']), per(3), 'an option value counts as an image: never too few');
  assert.equal(serveThreadpool(['--vbds', '6', '--force']), per(6));
  assert.equal(serveThreadpool(['--vbds=8']), per(8));
  assert.equal(serveThreadpool(['a.img', '--queue-threads', '--queues', '4']), per(2 * 5), 'a handle per queue thread, and the backend\'s own');
  assert.equal(serveThreadpool(['--', '-odd-name.img', 'b.img']), per(2));
  assert.equal(serveThreadpool(Array.from({ length: 500 }, (_, i) => `i${i}.img`)), LIBUV_MAX_THREADS);
});

test('serve divides the pool it got: a full share each when it fits, else smaller, never none', () => {
  assert.deepEqual(serveThreadpoolShare(SPARE_THREADS + SLOTS_PER_HANDLE * 3, 3), { slots: SLOTS_PER_HANDLE, tight: false });
  assert.deepEqual(serveThreadpoolShare(1024, 2), { slots: SLOTS_PER_HANDLE, tight: false }, 'never more than a full share');
  assert.deepEqual(serveThreadpoolShare(LIBUV_DEFAULT_THREADS, 2), { slots: 1, tight: false }, 'libuv\'s default: one each, two to spare');
  assert.deepEqual(serveThreadpoolShare(LIBUV_DEFAULT_THREADS, 4), { slots: 1, tight: true }, 'four stalled images would take all four');
  assert.deepEqual(serveThreadpoolShare(16, 0), { slots: SLOTS_PER_HANDLE, tight: false }, 'no image file (remote exports only)');
});

test('blkif serve runs with the pool the executable asked for: counted in /proc/PID/task', { timeout: 120_000 }, async () => {
  const images = ['a.img', 'b.img', 'c.img'].map((n) => join(tmp.dir, n));
  for (const i of images) sparseImage(i, 1024 * 1024);
  const args = [...images, '--port', '0'];
  const threads = async (env: NodeJS.ProcessEnv): Promise<{ count: number; stderr: string }> => {
    const s = await serve(args, env);
    try {
      return { count: readdirSync(`/proc/${s.proc.pid!}/task`).length, stderr: s.stderr() };
    } finally {
      assert.equal(await s.stop(), 0);
    }
  };
  // Everything else (domains, V8's platform threads) is the same in both: the difference is the pool.
  const sized = await threads({});
  const small = await threads({ UV_THREADPOOL_SIZE: '3' });
  assert.equal(sized.count - small.count, serveThreadpool(args) - 3,
    `${sized.count} threads with the executable's pool, ${small.count} with UV_THREADPOOL_SIZE=3`);
  assert.doesNotMatch(sized.stderr, /too few/);
  // The user's size is kept; three image files stalled would hold all three threads: serve says so.
  assert.match(small.stderr, /threadpool has 3 threads: too few for 3 image file handles/);
});
