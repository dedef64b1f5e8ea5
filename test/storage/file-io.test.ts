/**
 * FileIo, a descriptor's share of libuv's threadpool: never more than its slots in the pool, the
 * rest started in arrival order; close fails the waiting and waits for the running. The pool's
 * calls are replaced by ones that hold their callbacks, so the test decides when each finishes.
 * And HolePuncher: one fallocate at a time, merging the waiting discards that touch.
 */
import { after, afterEach, beforeEach, mock, test } from 'node:test';
import assert from 'node:assert/strict';
import fs, { closeSync, openSync, readFileSync, statSync, writeFileSync, type Stats } from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';
import { join } from 'node:path';
import { FileIo } from '../../src/storage/file-io.js';
import { HolePuncher } from '../../src/storage/hole-punch.js';
import { isZero, pattern, tempDir } from './helpers.js';

const tmp = tempDir('blkif-file-io-');
after(() => tmp.cleanup());

type Callback = (e: NodeJS.ErrnoException | null, r?: number | Stats) => void;
interface Call { readonly what: string; readonly position: number; readonly cb: Callback }

let calls: Call[] = [];
const spies: { mock: { restore(): void } }[] = [];

beforeEach(() => {
  calls = [];
  // Named imports of a builtin follow its exports object once synced: replace them there.
  spies.push(
    mock.method(fs, 'readv', (_fd: number, _b: unknown, position: number, cb: Callback) => { calls.push({ what: 'readv', position, cb }); }),
    mock.method(fs, 'writev', (_fd: number, _b: unknown, position: number, cb: Callback) => { calls.push({ what: 'writev', position, cb }); }),
    mock.method(fs, 'fdatasync', (_fd: number, cb: Callback) => { calls.push({ what: 'fdatasync', position: -1, cb }); }),
    mock.method(fs, 'fstat', (_fd: number, cb: Callback) => { calls.push({ what: 'fstat', position: -1, cb }); }),
  );
  syncBuiltinESMExports();
});

afterEach(() => {
  for (const s of spies.splice(0)) s.mock.restore();
  syncBuiltinESMExports();
});

/** Lets settled promises' callbacks run. */
const settle = (): Promise<void> => new Promise((r) => setImmediate(r));

test('never more than its slots in the pool; the rest start in arrival order as slots free', async () => {
  const io = new FileIo(99, 3);
  const done: number[] = [];
  const ops = Array.from({ length: 10 }, (_, i) => {
    const p = i % 2 === 0 ? io.readv([new Uint8Array(512)], i * 512) : io.writev([new Uint8Array(512)], i * 512);
    return p.then((n) => { done.push(i); return n; });
  });
  assert.deepEqual(calls.map((c) => c.position), [0, 512, 1024], 'the first three go to the pool');
  assert.deepEqual([io.running, io.waiting], [3, 7]);

  calls[1]!.cb(null, 512); // the second finishes first: the fourth takes its slot
  await settle();
  assert.deepEqual(done, [1]);
  assert.deepEqual(calls.map((c) => c.position), [0, 512, 1024, 1536]);
  assert.deepEqual([io.running, io.waiting], [3, 6]);

  for (let next = 0; next < calls.length; next++) {
    if (next === 1) continue;
    calls[next]!.cb(null, 512);
    assert.ok(io.running <= 3, `${io.running} in the pool`);
  }
  assert.deepEqual(calls.map((c) => c.position / 512), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 'started first come, first served');
  assert.deepEqual(calls.map((c) => c.what), ['readv', 'writev', 'readv', 'writev', 'readv', 'writev', 'readv', 'writev', 'readv', 'writev']);
  assert.deepEqual(await Promise.all(ops), Array(10).fill(512));
  assert.deepEqual([io.running, io.waiting], [0, 0]);
});

test('a failure rejects only its own operation; fdatasync and fstat take slots too', async () => {
  const io = new FileIo(99, 1);
  const flush = io.fdatasync();
  const size = io.size();
  const read = io.readv([new Uint8Array(512)], 0);
  assert.deepEqual(calls.map((c) => c.what), ['fdatasync']);
  const eio = Object.assign(new Error('EIO: i/o error'), { code: 'EIO' });
  calls[0]!.cb(eio);
  await assert.rejects(flush, /EIO/);
  assert.deepEqual(calls.map((c) => c.what), ['fdatasync', 'fstat']);
  calls[1]!.cb(null, { size: 12345 } as Stats);
  assert.equal(await size, 12345);
  calls[2]!.cb(null, 512);
  assert.equal(await read, 512);
});

test('close fails what waits, and resolves only once what is in the pool is done', async () => {
  const io = new FileIo(99, 2);
  const results = Array.from({ length: 5 }, (_, i) => io.readv([new Uint8Array(512)], i * 512).then(
    (n) => `read ${n}`, (e: Error) => `failed: ${e.message}`));
  let closed = false;
  const closing = io.close(new Error('image closed')).then(() => { closed = true; });
  await settle();
  assert.equal(closed, false, 'two reads are still in the pool');
  assert.equal(io.waiting, 0);
  calls[0]!.cb(null, 512);
  await settle();
  assert.equal(closed, false);
  assert.equal(calls.length, 2, 'nothing more was started after close');
  calls[1]!.cb(null, 512);
  await closing;
  assert.deepEqual(await Promise.all(results), ['read 512', 'read 512', 'failed: image closed', 'failed: image closed', 'failed: image closed']);
  await assert.rejects(io.readv([new Uint8Array(512)], 0), /closed/);
  assert.equal(calls.length, 2);
});

test('the wait queue grows past its first ring and keeps its order across the wrap', async () => {
  const io = new FileIo(99, 1);
  const first = Array.from({ length: 10 }, (_, i) => io.readv([new Uint8Array(1)], i));
  for (let i = 0; i < 6; i++) calls[i]!.cb(null, 1); // head moves along the ring
  const more = Array.from({ length: 40 }, (_, i) => io.readv([new Uint8Array(1)], 10 + i)); // 44 waiting: grows twice
  while (calls.length < 50) calls[calls.length - 1]!.cb(null, 1);
  calls[49]!.cb(null, 1);
  assert.deepEqual(calls.map((c) => c.position), Array.from({ length: 50 }, (_, i) => i));
  await Promise.all([...first, ...more]);
});

test('on a real file: many reads and writes through 2 slots land at the right bytes', async () => {
  for (const s of spies.splice(0)) s.mock.restore();
  syncBuiltinESMExports();
  const p = join(tmp.dir, 'real.img');
  writeFileSync(p, new Uint8Array(256 * 1024));
  const fd = openSync(p, 'r+');
  try {
    const io = new FileIo(fd, 2);
    const blocks = Array.from({ length: 64 }, (_, i) => pattern(i + 1, 4096));
    assert.deepEqual(await Promise.all(blocks.map((b, i) => io.writev([b], i * 4096))), Array(64).fill(4096));
    const back = blocks.map(() => new Uint8Array(4096));
    await Promise.all(back.map((b, i) => io.readv([b], i * 4096)));
    back.forEach((b, i) => assert.deepEqual(b, blocks[i]));
    await io.fdatasync();
    assert.equal(await io.size(), 256 * 1024);
    await io.close(new Error('closed'));
  } finally {
    closeSync(fd);
  }
});

test('hole punching: one child at a time, each covering the waiting ranges that touch; gaps stay', async () => {
  for (const s of spies.splice(0)) s.mock.restore();
  syncBuiltinESMExports();
  const K = 64 * 1024;
  const p = join(tmp.dir, 'holes.img');
  const data = pattern(3, 16 * K);
  writeFileSync(p, data);
  const holes = new HolePuncher(p);
  // The first starts at once; the other four wait: [1,2) and [2,3) and [2,4) merge (adjacent or
  // overlapping), [5,6) does not touch them, so it gets a child of its own.
  const punched = await Promise.all([[0, 1], [1, 2], [5, 6], [2, 3], [2, 4]].map(([a, b]) => holes.punch(a! * K, (b! - a!) * K)));
  if (!punched.every((x) => x)) {
    assert.ok(punched.every((x) => !x), 'a failure fails every punch');
    return; // no fallocate, or no holes on this file system: file-storage.test.ts covers the fallback
  }
  assert.equal(holes.children, 3, 'a child for [0,1), one for [1,4) merged, one for [5,6)');
  const after = readFileSync(p);
  assert.ok(isZero(after.subarray(0, 4 * K)) && isZero(after.subarray(5 * K, 6 * K)));
  assert.deepEqual(after.subarray(4 * K, 5 * K), Buffer.from(data.subarray(4 * K, 5 * K)), 'the gap between ranges is untouched');
  assert.deepEqual(after.subarray(6 * K), Buffer.from(data.subarray(6 * K)));
  assert.equal(statSync(p).size, 16 * K);
});

test('hole punching: close answers what waits with false, and resolves after the running child', async () => {
  for (const s of spies.splice(0)) s.mock.restore();
  syncBuiltinESMExports();
  const K = 64 * 1024;
  const p = join(tmp.dir, 'closing.img');
  const data = pattern(5, 8 * K);
  writeFileSync(p, data);
  const holes = new HolePuncher(p);
  const order: string[] = [];
  const running = holes.punch(0, K).then((ok) => { order.push('running'); return ok; });
  const waiting = holes.punch(4 * K, K).then((ok) => { order.push('waiting'); return ok; });
  const closed = holes.close().then(() => { order.push('closed'); });
  assert.equal(await waiting, false, 'a waiting punch is refused at close');
  await Promise.all([running, closed]);
  assert.deepEqual(order, ['waiting', 'running', 'closed']);
  assert.equal(holes.children, 1);
  assert.equal(await holes.punch(0, K), false, 'nothing after close');
  assert.equal(holes.children, 1);
  assert.deepEqual(readFileSync(p).subarray(4 * K, 5 * K), Buffer.from(data.subarray(4 * K, 5 * K)));
});
