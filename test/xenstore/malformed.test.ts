// Malformed requests get xenstored's error replies; an oversized payload
// drops that socket only; other clients carry on.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  XENSTORE_PAYLOAD_MAX,
  XS_DIRECTORY_PART,
  XS_ERROR,
  XS_READ,
  XS_SET_PERMS,
  XS_TRANSACTION_END,
  XS_WATCH,
  XS_WRITE,
  XenstoreClient,
  encodeHeader,
  encodeMessage,
  splitStrings,
} from '../../src/xenstore/index.js';
import { RawConnection, startSocketDaemon, type SocketDaemon } from './helpers.js';

let d: SocketDaemon;
let other: XenstoreClient;
before(async () => {
  d = await startSocketDaemon();
  other = await XenstoreClient.connectSocket(d.socketPath);
  await other.write('/m/x', 'v');
});
after(async () => {
  other.close();
  await d.close();
});

const enc = (s: string) => new TextEncoder().encode(s);

async function reply(raw: RawConnection, type: number, payload: Uint8Array, txId = 0) {
  raw.send(encodeMessage({ type, reqId: 42, txId, payload }));
  const m = await raw.next();
  assert.ok(m, 'a reply');
  assert.equal(m.reqId, 42);
  return m.type === XS_ERROR ? splitStrings(m.payload)[0] : `type ${m.type}`;
}

test('bad requests get the errors xenstored gives', async () => {
  const raw = await RawConnection.connect(d.socketPath);
  try {
    assert.equal(await reply(raw, XS_READ, enc('/m/x')), 'EINVAL'); // no NUL
    assert.equal(await reply(raw, XS_READ, enc('/m/x\0extra\0')), 'EINVAL'); // two strings
    assert.equal(await reply(raw, XS_READ, new Uint8Array(0)), 'EINVAL');
    assert.equal(await reply(raw, XS_WRITE, enc('/m/nonul')), 'EINVAL');
    assert.equal(await reply(raw, XS_READ, enc('/m/bad path\0')), 'EINVAL');
    assert.equal(await reply(raw, XS_READ, enc('/m/x/\0')), 'EINVAL');
    assert.equal(await reply(raw, XS_READ, enc('/m//x\0')), 'EINVAL');
    assert.equal(await reply(raw, XS_READ, enc(`/${'a'.repeat(2100)}\0`)), 'EINVAL');
    assert.equal(await reply(raw, XS_WATCH, enc('/m\0')), 'EINVAL');
    assert.equal(await reply(raw, XS_SET_PERMS, enc('/m/x\0q0\0')), 'EINVAL');
    assert.equal(await reply(raw, XS_SET_PERMS, enc('/m/x\0')), 'EINVAL');
    assert.equal(await reply(raw, XS_DIRECTORY_PART, enc('/m\0')), 'EINVAL');
    assert.equal(await reply(raw, XS_TRANSACTION_END, enc('T\0'), 1234), 'ENOENT');
    assert.equal(await reply(raw, XS_READ, enc('/m/x\0'), 77), 'ENOENT'); // unknown transaction
    assert.equal(await reply(raw, 20, enc('\0')), 'ENOSYS'); // removed XS_RESTRICT
    assert.equal(await reply(raw, 0xffff, enc('\0')), 'ENOSYS');
    assert.equal(await reply(raw, 15, enc('\0')), 'ENOSYS'); // XS_WATCH_EVENT is not a request
    assert.equal(await reply(raw, XS_READ, enc('/m/x\0')), 'type 2'); // still served
  } finally {
    raw.close();
  }
});

test('payload over XENSTORE_PAYLOAD_MAX drops that connection only', async () => {
  const raw = await RawConnection.connect(d.socketPath);
  raw.send(encodeHeader({ type: XS_READ, reqId: 1, txId: 0, len: XENSTORE_PAYLOAD_MAX + 1 }));
  assert.equal(await raw.next(), undefined);
  assert.ok(raw.closed);
  assert.equal(await other.read('/m/x'), 'v');
});

test('random garbage never stops the daemon', async () => {
  for (let i = 0; i < 20; i++) {
    const raw = await RawConnection.connect(d.socketPath);
    const junk = new Uint8Array(200 + i * 13);
    for (let j = 0; j < junk.length; j++) junk[j] = (j * 7919 + i * 104729) & 0xff;
    raw.send(junk);
    raw.close();
  }
  assert.equal(await other.read('/m/x'), 'v');
});

test('XS_DIRECTORY_PART pages a listing larger than one payload', async () => {
  const names = Array.from({ length: 300 }, (_, i) => `child-with-a-long-name-${String(i).padStart(4, '0')}`);
  await Promise.all(names.map((n) => other.mkdir(`/big/${n}`)));
  await assert.rejects(other.directory('/big'), { code: 'E2BIG' });
  const got: string[] = [];
  let off = 0;
  for (;;) {
    const part = await other.directoryPart('/big', off);
    got.push(...part.children);
    off += part.children.reduce((n, c) => n + c.length + 1, 0);
    if (part.done) break;
  }
  assert.deepEqual(got, names);
});
