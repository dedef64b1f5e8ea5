/**
 * NBD_CMD_WRITE_ZEROES as proto.md allows it: NBD_FLAG_SEND_FAST_ZERO offered on writable
 * exports; a fast zero the device cannot do faster than writing is NBD_ENOTSUP at once, the
 * device untouched; NBD_CMD_FLAG_NO_HOLE reaches the device as "may not deallocate".
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_WRITE_ZEROES, NBD_ENOTSUP, NBD_FLAG_SEND_FAST_ZERO,
  NBD_INFO_EXPORT, NbdServer,
} from '../../src/nbd/index.js';
import { MemoryDevice, RawClient, TrimmingDevice } from './support.js';

const plain = new MemoryDevice(1 << 20);
const trimming = new TrimmingDevice(1 << 20);
const ro = new MemoryDevice(1 << 20, { readOnly: true });
const server = new NbdServer({ exports: [{ name: 'plain', device: plain }, { name: 'trimming', device: trimming }, { name: 'ro', device: ro }] });
let port = 0;
before(async () => {
  const a = await server.listen({ host: '127.0.0.1', port: 0 });
  port = (a as { port: number }).port;
});
after(() => server.close());

async function open(name: string): Promise<{ c: RawClient; flags: number }> {
  const c = await RawClient.connect({ port });
  const infos = await c.go(name);
  const e = infos.find((i) => i.info === NBD_INFO_EXPORT);
  assert.ok(e !== undefined && 'transmissionFlags' in e);
  return { c, flags: e.transmissionFlags };
}

async function zero(c: RawClient, offset: number, length: number, flags: number): Promise<number> {
  const h = c.request(NBD_CMD_WRITE_ZEROES, offset, length, { flags });
  const r = await c.recv();
  assert.ok(r?.kind === 'simpleReply' && r.handle === h);
  return r.error;
}

test('FAST_ZERO is offered on writable exports only', async () => {
  for (const [name, offered] of [['plain', true], ['trimming', true], ['ro', false]] as const) {
    const { c, flags } = await open(name);
    assert.equal((flags & NBD_FLAG_SEND_FAST_ZERO) !== 0, offered, name);
    c.destroy();
  }
});

test('a fast zero the device cannot do quickly is NBD_ENOTSUP at once, changing nothing', async () => {
  const { c } = await open('plain');
  plain.bytes.fill(7, 0, 8192);
  const calls = plain.calls.length;
  assert.equal(await zero(c, 0, 8192, NBD_CMD_FLAG_FAST_ZERO), NBD_ENOTSUP);
  assert.equal(plain.calls.length, calls, 'the device was not called');
  assert.ok(plain.bytes.subarray(0, 8192).every((b) => b === 7), 'nothing changed');
  // Without the flag the same request is done (never NBD_ENOTSUP).
  assert.equal(await zero(c, 0, 8192, 0), 0);
  assert.ok(plain.bytes.subarray(0, 8192).every((b) => b === 0));
  c.destroy();
});

test('NO_HOLE reaches the device as "write, do not deallocate"; a fast zero with it is refused by a device that is fast only by deallocating', async () => {
  const { c } = await open('trimming');
  trimming.bytes.fill(9, 0, 16384);
  assert.equal(await zero(c, 0, 4096, NBD_CMD_FLAG_FAST_ZERO), 0);
  assert.equal(await zero(c, 4096, 4096, NBD_CMD_FLAG_NO_HOLE), 0);
  assert.equal(await zero(c, 8192, 4096, 0), 0);
  assert.equal(await zero(c, 12288, 4096, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO), NBD_ENOTSUP);
  assert.deepEqual(trimming.mayTrim, [true, false, true]);
  assert.ok(trimming.bytes.subarray(0, 12288).every((b) => b === 0));
  assert.ok(trimming.bytes.subarray(12288, 16384).every((b) => b === 9), 'the refused range is untouched');
  c.destroy();
});
