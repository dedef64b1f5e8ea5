/**
 * NbdClient, the protocol client on its own (test/storage covers it as BlockStorage), against our
 * NbdServer: requests land on the device, flushes reach every connection, failures are
 * NbdClientErrors with errno names; and the nbd layer imports nothing of the storage layer.
 */
import { after, afterEach, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { NbdClient, NbdClientError, NbdServer, nbdUri, type NbdClientErrorCode } from '../../src/nbd/index.js';
import { MemoryDevice, randomBytes, tempDir } from './support.js';

const MiB = 1024 * 1024;
const tmp = tempDir('blkif-nbd-client-');
after(() => tmp.cleanup());

let socks = 0;
let server: NbdServer | undefined;
let client: NbdClient | undefined;
afterEach(async () => {
  await client?.close();
  await server?.close();
  client = undefined;
  server = undefined;
});

async function serve(devices: Record<string, MemoryDevice>): Promise<(name: string) => string> {
  server = new NbdServer({ exports: Object.entries(devices).map(([name, device]) => ({ name, device })) });
  const addr = await server.listen({ path: join(tmp.dir, `s${socks++}.sock`) });
  return (name) => nbdUri(addr, name);
}

async function rejectsWith(p: Promise<unknown>, code: NbdClientErrorCode, message: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof NbdClientError, `expected an NbdClientError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, message);
    return true;
  });
}

describe('NbdClient', { timeout: 60_000 }, () => {
  test('reads and writes land on the export; write zeroes with and without NO_HOLE; a flush per connection', async () => {
    const disk = new MemoryDevice(4 * MiB, { multiConn: true });
    const uri = await serve({ disk });
    client = await NbdClient.connect(uri('disk'), { connections: 2 });
    assert.equal(client.size, 4 * MiB);
    assert.equal(client.multiConn, true);
    assert.equal(client.stats.connections, 2);
    const data = randomBytes(MiB + 4096, 1);
    // Two pieces, the cut not on a sector: the client sends the bytes as one run.
    await client.write(512, [data.subarray(0, 1000), data.subarray(1000)]);
    assert.deepEqual(disk.bytes.subarray(512, 512 + data.length), data);
    const back = [new Uint8Array(3000), new Uint8Array(data.length - 3000)];
    await client.read(512, back);
    assert.deepEqual(Uint8Array.from([...back[0]!, ...back[1]!]), data);
    await client.writeZeroes(512, 4096, true);
    await client.writeZeroes(8192, 4096, false);
    assert.ok(disk.bytes.subarray(512, 512 + 4096).every((b) => b === 0));
    assert.ok(disk.bytes.subarray(8192, 8192 + 4096).every((b) => b === 0));
    assert.equal(disk.calls.filter(([op]) => op === 'writeZeroes').length, 2);
    const before = disk.calls.filter(([op]) => op === 'flush').length;
    await client.flush();
    assert.equal(disk.calls.filter(([op]) => op === 'flush').length - before, 2, 'one flush on each of the 2 connections');
  });

  test('failures are NbdClientErrors with the errno name and the server in the message', async () => {
    const ro = new MemoryDevice(MiB, { readOnly: true });
    const uri = await serve({ ro });
    await rejectsWith(NbdClient.connect('nbd://alice@h/e'), 'EINVAL', /nbds:\/\//);
    await rejectsWith(NbdClient.connect(uri('ro'), { depth: 0 }), 'EINVAL', /depth 0/);
    await rejectsWith(NbdClient.connect(uri('nope')), 'ENOENT', /nope/);
    client = await NbdClient.connect(uri('ro'));
    // The client itself refuses nothing: the server answers NBD_EPERM.
    await rejectsWith(client.write(0, [new Uint8Array(512)]), 'EROFS', /NBD_CMD_WRITE of 512 bytes at 0 failed: NBD_EPERM \(the export is read-only\)/);
    await client.close();
    await rejectsWith(client.read(0, [new Uint8Array(512)]), 'EIO', /is closed/);
  });

  test('the nbd layer imports nothing of the storage layer', () => {
    const dir = fileURLToPath(new URL('../../src/nbd/', import.meta.url));
    const files = readdirSync(dir).filter((f) => f.endsWith('.js'));
    assert.ok(files.includes('client.js') && files.includes('server.js'), files.join(' '));
    for (const f of files) {
      const text = readFileSync(join(dir, f), 'utf8');
      assert.doesNotMatch(text, /from ['"]\.\.\/(storage|blkback|toolstack|cli)\//, f);
    }
  });
});
