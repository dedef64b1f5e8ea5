/**
 * What a careless or hostile network can hold of NbdServer: more stalled connections (idle TCP,
 * handshakes stopped halfway) than the connection cap. A client already served keeps working, a
 * new one (nbdinfo) is refused saying why, every stalled one is closed by the handshake limit,
 * and then nbdinfo is served.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { NBD_CMD_READ, NBD_CMD_WRITE, NbdServer, nbdUri } from '../../src/nbd/index.js';
import { MemoryDevice, RawClient, randomBytes, run, runOk, until } from './support.js';
import { needTools } from '../support/tools.js';

needTools('nbdinfo', 'qemu-img');

const disk = new MemoryDevice(1024 * 1024);
const server = new NbdServer({ exports: [{ name: 'disk', device: disk }], maxConnections: 3, handshakeTimeoutMs: 400 });
const stalled: Socket[] = [];
after(async () => {
  for (const s of stalled) s.destroy();
  await server.close();
});

/** A connection that has read the greeting; `half`: then sends client flags and half an option header. */
function stall(port: number, half: boolean): Promise<{ closed: Promise<void> }> {
  return new Promise((resolve, reject) => {
    const s = connect(port, '127.0.0.1');
    stalled.push(s);
    const closed = new Promise<void>((r) => s.once('close', () => r()));
    s.on('error', reject);
    s.once('data', () => {
      if (half) s.write(Buffer.from([0, 0, 0, 3, 0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54]));
      resolve({ closed });
    });
  });
}

test('past the cap a client is refused with the reason, served ones carry on, stalled ones are dropped', async () => {
  const addr = await server.listen({ host: '127.0.0.1', port: 0 });
  assert.ok('port' in addr);
  const served = await RawClient.connect({ port: addr.port });
  await served.go('disk');
  // Two take the remaining slots, four are past the cap: all seven stall.
  const flood = [];
  for (let i = 0; i < 6; i++) flood.push(await stall(addr.port, i % 2 === 1));
  assert.equal(server.stats().connections.active, 3);

  const refused = await run('nbdinfo', ['--size', nbdUri(addr, 'disk')]);
  assert.notEqual(refused.code, 0, 'nbdinfo past the cap');
  assert.match(refused.stderr, /server policy prevents NBD_OPT_GO/);
  // qemu-img prints the server's message.
  const qemu = await run('qemu-img', ['info', nbdUri(addr, 'disk')]);
  assert.notEqual(qemu.code, 0, 'qemu-img past the cap');
  assert.match(qemu.stderr, /server busy: 3 connections already, the limit/);

  // The client served before the flood is unaffected.
  const data = randomBytes(4096, 7);
  const w = served.request(NBD_CMD_WRITE, 8192, data.length, { data });
  assert.deepEqual(await served.recv(), { kind: 'simpleReply', error: 0, handle: w });
  const r = served.request(NBD_CMD_READ, 8192, data.length);
  assert.deepEqual(await served.recv(), { kind: 'simpleReply', error: 0, handle: r, data });

  // Every stalled connection is closed by the server (the handshake limit), none by us.
  await Promise.all(flood.map((f) => f.closed));
  await until(() => server.stats().connections.active === 1, 10_000, 'only the served client left');
  const ok = await runOk('nbdinfo', ['--size', nbdUri(addr, 'disk')]);
  assert.equal(ok.stdout.trim(), String(disk.size));
  assert.equal(served.closed, false, 'a transmitting client is not subject to the handshake limit');
  await served.end();
});
