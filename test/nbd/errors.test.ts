/**
 * Error values as proto.md's "Error values" section has them, on both ends, as one table: the
 * errno a device fails with, the NBD error the server puts on the wire (read by a raw client),
 * and the errno name our client gives back; unexpected values are NBD_EINVAL to the client; and
 * NBD_ESHUTDOWN makes the client disconnect softly (NBD_CMD_DISC once what is in flight is
 * answered) and send the request again on a new connection.
 */
import { after, afterEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import {
  NBD_CMD_WRITE, NBD_EINVAL, NBD_EIO, NBD_ENOMEM, NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP, NBD_EPERM, NBD_ESHUTDOWN,
  NbdClient, NbdClientError, NbdDeviceError, NbdServer, clientErrorCode, errnoName, nbdUri, type NbdClientErrorCode,
} from '../../src/nbd/index.js';
import { MemoryDevice, RawClient, deferred, randomBytes, tempDir, until } from './support.js';

const tmp = tempDir('blkif-nbd-errors-');
after(() => tmp.cleanup());

const device = new MemoryDevice(1024 * 1024);
let failWith: unknown;
device.hook = (op) => {
  if (op === 'write' && failWith !== undefined) throw failWith;
};
const server = new NbdServer({ exports: [{ name: 'disk', device }] });
let socks = 0;
const clients: NbdClient[] = [];
afterEach(async () => {
  for (const c of clients.splice(0)) await c.close();
});
after(() => server.close());

const coded = (code: string) => Object.assign(new Error(`host says ${code}`), { code });

/** [what the device throws, the NBD error on the wire, the client's errno name]. */
const TABLE: [string, unknown, number, NbdClientErrorCode][] = [
  ['EPERM', coded('EPERM'), NBD_EPERM, 'EROFS'],
  ['EACCES', coded('EACCES'), NBD_EPERM, 'EROFS'],
  ['EROFS', coded('EROFS'), NBD_EPERM, 'EROFS'],
  ['EIO', coded('EIO'), NBD_EIO, 'EIO'],
  ['ENOMEM', coded('ENOMEM'), NBD_ENOMEM, 'EIO'],
  ['EINVAL', coded('EINVAL'), NBD_EINVAL, 'EINVAL'],
  ['ENOSPC', coded('ENOSPC'), NBD_ENOSPC, 'ENOSPC'],
  ['EDQUOT', coded('EDQUOT'), NBD_ENOSPC, 'ENOSPC'],
  ['EFBIG', coded('EFBIG'), NBD_ENOSPC, 'ENOSPC'],
  ['EOVERFLOW', coded('EOVERFLOW'), NBD_EINVAL, 'EINVAL'],
  ['EOPNOTSUPP', coded('EOPNOTSUPP'), NBD_EINVAL, 'EINVAL'],
  ['an errno with no NBD value (EBADF)', coded('EBADF'), NBD_EIO, 'EIO'],
  ['no errno at all', new Error('the device fell over'), NBD_EIO, 'EIO'],
  ['NbdDeviceError(NBD_ENOSPC)', new NbdDeviceError(NBD_ENOSPC, 'full'), NBD_ENOSPC, 'ENOSPC'],
  ['NbdDeviceError(NBD_ENOTSUP) outside a fast zero', new NbdDeviceError(NBD_ENOTSUP, 'no'), NBD_EINVAL, 'EINVAL'],
];

test('errno in, NBD error out on the wire, errno name back in the client', async () => {
  const addr = await server.listen({ path: join(tmp.dir, `s${socks++}.sock`) });
  const raw = await RawClient.connect({ path: (addr as { path: string }).path });
  await raw.go('disk');
  const client = await NbdClient.connect(nbdUri(addr, 'disk'));
  clients.push(client);
  const data = randomBytes(4096, 3);
  try {
    for (const [what, thrown, wire, code] of TABLE) {
      failWith = thrown;
      const h = raw.request(NBD_CMD_WRITE, 0, data.length, { data });
      const reply = await raw.recv();
      assert.deepEqual(reply, { kind: 'simpleReply', error: wire, handle: h }, `${what}: ${errnoName(wire)} on the wire`);
      await assert.rejects(client.write(0, [data]), (e: unknown) => {
        assert.ok(e instanceof NbdClientError, String(e));
        assert.equal(e.code, code, `${what}: ${e.message}`);
        assert.match(e.message, new RegExp(errnoName(wire)));
        return true;
      });
    }
  } finally {
    failWith = undefined;
    raw.destroy();
  }
});

test('the client reads every error value the spec defines, and an unexpected one as NBD_EINVAL', () => {
  const table: [number, NbdClientErrorCode][] = [
    [NBD_EPERM, 'EROFS'], [NBD_EIO, 'EIO'], [NBD_ENOMEM, 'EIO'], [NBD_EINVAL, 'EINVAL'], [NBD_ENOSPC, 'ENOSPC'],
    [NBD_EOVERFLOW, 'EINVAL'], [NBD_ENOTSUP, 'EINVAL'], [2, 'EINVAL'], [99, 'EINVAL'], [0xffffffff, 'EINVAL'],
  ];
  for (const [wire, code] of table) assert.equal(clientErrorCode(wire), code, `${errnoName(wire)}`);
});

test('NBD_ESHUTDOWN: the client lets what is in flight finish, sends NBD_CMD_DISC, and sends the request again on a new connection', async () => {
  const addr = await server.listen({ path: join(tmp.dir, `s${socks++}.sock`) });
  const logs: string[] = [];
  const client = await NbdClient.connect(nbdUri(addr, 'disk'), { reconnect: { baseDelayMs: 1 }, log: (m) => logs.push(m) });
  clients.push(client);
  const gate = deferred();
  let shutdownOnce = true;
  device.hook = async (op, offset) => {
    if (op === 'write' && offset === 8192) await gate.promise;
    if (op === 'read' && shutdownOnce) {
      shutdownOnce = false;
      throw new NbdDeviceError(NBD_ESHUTDOWN, 'going away');
    }
  };
  try {
    const data = randomBytes(4096, 9);
    const discBefore = server.stats().requests.disc;
    const slow = client.write(8192, [data]);
    await until(() => device.active === 1, 5000, 'the write to reach the device');
    const back = new Uint8Array(4096);
    const read = client.read(8192, [back]);
    // The read was refused with NBD_ESHUTDOWN; the write is still in flight on that connection.
    await until(() => logs.some((l) => /NBD_ESHUTDOWN/.test(l)), 5000, 'the client to hear NBD_ESHUTDOWN');
    assert.equal(server.stats().requests.disc, discBefore, 'no NBD_CMD_DISC while a request is in flight');
    gate.resolve();
    await slow;
    await read;
    assert.deepEqual(back, data, 'the read, sent again, saw the write');
    assert.equal(server.stats().requests.disc, discBefore + 1, 'a soft disconnect: NBD_CMD_DISC');
    assert.equal(client.stats.resent, 1, 'only the refused read went again');
    assert.equal(client.stats.reconnects, 1);
  } finally {
    device.hook = (op) => {
      if (op === 'write' && failWith !== undefined) throw failWith;
    };
  }
});
