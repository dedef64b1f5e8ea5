/**
 * NbdServer against the real NBD clients installed on this machine (libnbd's nbdinfo and
 * nbdcopy, qemu-img and qemu-io, fio's nbd engine), over TCP on 127.0.0.1 and over a Unix
 * socket, with in-memory exports checked byte for byte. A test whose program is missing
 * fails, naming its Debian package.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NbdServer, nbdUri, type NbdAddress } from '../../src/nbd/index.js';
import { MemoryDevice, randomBytes, run, runOk, tempDir } from './support.js';
import { needTools } from '../support/tools.js';

const MiB = 1024 * 1024;
const disk = new MemoryDevice(16 * MiB);
const ro = new MemoryDevice(2 * MiB, { readOnly: true, multiConn: false, canTrim: false });
ro.bytes.set(randomBytes(ro.size, 42));
const sector4k = new MemoryDevice(8 * MiB, { blockSize: 4096, canTrim: false });
const scratch = new MemoryDevice(32 * MiB);
const server = new NbdServer({
  exports: [
    { name: 'disk', description: 'scratch disk for the tests', device: disk },
    { name: 'ro', description: 'read-only', device: ro },
    { name: 'sector4k', device: sector4k },
    { name: 'scratch', device: scratch },
  ],
  defaultExport: 'scratch',
});
const tmp = tempDir('nbd-clients-');
let tcp: NbdAddress;
let unix: NbdAddress;

before(async () => {
  tcp = await server.listen({ host: '127.0.0.1', port: 0 });
  unix = await server.listen({ path: join(tmp.dir, 'nbd.sock') });
});

after(async () => {
  await server.close();
  tmp.cleanup();
  const s = server.stats();
  assert.equal(s.inFlight, 0);
  assert.equal(s.protocolErrors, 0, 'no real client broke the protocol');
});

function nbdinfoJson(out: string): { exports: Record<string, unknown>[] } & Record<string, unknown> {
  return JSON.parse(out) as { exports: Record<string, unknown>[] } & Record<string, unknown>;
}

describe('nbdinfo', () => {
  needTools('nbdinfo');
  test('--json: size, read-only flag, capabilities, block sizes', async () => {
    const w = nbdinfoJson((await runOk('nbdinfo', ['--json', '--no-content', nbdUri(tcp, 'disk')])).stdout);
    assert.equal(w.protocol, 'newstyle-fixed');
    assert.equal(w.TLS, false);
    assert.equal(w.structured, true);
    assert.deepEqual(
      pick(w.exports[0]!, ['export-name', 'description', 'export-size', 'is_read_only', 'can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_multi_conn', 'can_df', 'block_size_minimum', 'block_size_preferred', 'block_size_maximum']),
      {
        'export-name': 'disk', description: 'scratch disk for the tests', 'export-size': 16 * MiB, is_read_only: false,
        can_flush: true, can_fua: true, can_trim: true, can_zero: true, can_multi_conn: true, can_df: true,
        block_size_minimum: 512, block_size_preferred: 4096, block_size_maximum: 32 * MiB,
      },
    );
    const r = nbdinfoJson((await runOk('nbdinfo', ['--json', '--no-content', nbdUri(tcp, 'ro')])).stdout);
    assert.deepEqual(pick(r.exports[0]!, ['export-size', 'is_read_only', 'can_trim', 'can_zero', 'can_multi_conn']),
      { 'export-size': 2 * MiB, is_read_only: true, can_trim: false, can_zero: false, can_multi_conn: false });
    const s = nbdinfoJson((await runOk('nbdinfo', ['--json', '--no-content', nbdUri(tcp, 'sector4k')])).stdout);
    assert.deepEqual(pick(s.exports[0]!, ['block_size_minimum', 'block_size_preferred', 'block_size_maximum']),
      { block_size_minimum: 4096, block_size_preferred: 4096, block_size_maximum: 32 * MiB });
  });

  test('--list: every export with its description', async () => {
    const l = nbdinfoJson((await runOk('nbdinfo', ['--list', '--json', '--no-content', nbdUri(tcp)])).stdout);
    assert.deepEqual(
      l.exports.map((e) => [e['export-name'], e.description ?? null, e['export-size']]),
      [['disk', 'scratch disk for the tests', 16 * MiB], ['ro', 'read-only', 2 * MiB], ['sector4k', null, 8 * MiB], ['scratch', null, 32 * MiB]],
    );
  });

  test('--list of a server with 64 exports: every one listed (the option cap grows with the exports)', async () => {
    const many = new NbdServer({ exports: Array.from({ length: 64 }, (_, i) => ({ name: `vbd${i}`, device: new MemoryDevice(MiB) })) });
    try {
      const at = await many.listen({ host: '127.0.0.1', port: 0 });
      const l = nbdinfoJson((await runOk('nbdinfo', ['--list', '--json', '--no-content', nbdUri(at)])).stdout);
      assert.deepEqual(l.exports.map((e) => e['export-name']), Array.from({ length: 64 }, (_, i) => `vbd${i}`));
      assert.equal(many.stats().protocolErrors, 0, 'listing every export is no flood');
    } finally {
      await many.close();
    }
  });

  test('the empty name is the default export; an unknown name is refused', async () => {
    const d = nbdinfoJson((await runOk('nbdinfo', ['--json', '--no-content', nbdUri(tcp)])).stdout);
    assert.equal(d.exports[0]!['export-size'], 32 * MiB);
    const bad = await run('nbdinfo', [nbdUri(tcp, 'no-such-export')]);
    assert.notEqual(bad.code, 0);
    assert.match(bad.stderr, /no-such-export/);
  });

  test('over a Unix socket', async () => {
    const u = nbdinfoJson((await runOk('nbdinfo', ['--json', '--no-content', nbdUri(unix, 'disk')])).stdout);
    assert.equal(u.exports[0]!['export-size'], 16 * MiB);
  });
});

function pick(o: Record<string, unknown>, keys: string[]): Record<string, unknown> {
  return Object.fromEntries(keys.map((k) => [k, o[k]]));
}

describe('qemu', () => {
  needTools('qemu-img', 'qemu-io');
  test('qemu-img info sees a raw image of the export size', async () => {
    const info = JSON.parse((await runOk('qemu-img', ['info', '--output=json', nbdUri(tcp, 'disk')])).stdout) as Record<string, unknown>;
    assert.equal(info['virtual-size'], 16 * MiB);
    assert.equal(info.format, 'raw');
  });

  test('qemu-io writes and reads patterns at several offsets and sizes', async () => {
    // [offset, length, pattern]: aligned, sector-sized, large, the last 4K, and sub-sector
    // (qemu read-modify-writes around it, honouring the 512-byte minimum block size).
    const cases: [number, number, number][] = [
      [0, 64 * 1024, 0xab],
      [MiB + 512, 512, 0x11],
      [3 * MiB, 3 * MiB, 0x22],
      [16 * MiB - 4096, 4096, 0x33],
      [10 * MiB + 1000, 300, 0x44],
    ];
    const args = ['-f', 'raw'];
    for (const [o, l, p] of cases) args.push('-c', `write -P 0x${p.toString(16)} ${o} ${l}`);
    for (const [o, l, p] of cases) args.push('-c', `read -P 0x${p.toString(16)} ${o} ${l}`);
    const out = await runOk('qemu-io', [...args, nbdUri(tcp, 'disk')]);
    assert.doesNotMatch(out.stdout + out.stderr, /fail|mismatch/i);
    for (const [o, l, p] of cases) {
      assert.ok(disk.bytes.subarray(o, o + l).every((b) => b === p), `device bytes at ${o}+${l}`);
    }
    assert.equal(disk.bytes[10 * MiB + 999], 0, 'the bytes around a sub-sector write are preserved');
    assert.equal(disk.bytes[10 * MiB + 1300], 0);
  });

  test('qemu-io write-zeroes, discard, flush, and pipelined aio writes', async () => {
    disk.bytes.fill(0x99, 12 * MiB, 13 * MiB);
    const before = { zero: disk.count('writeZeroes'), trim: disk.count('trim'), flush: disk.count('flush') };
    const out = await runOk('qemu-io', ['-f', 'raw',
      '-c', `write -z ${12 * MiB} 64k`, '-c', `read -P 0 ${12 * MiB} 64k`,
      '-c', `discard ${12 * MiB + 65536} 64k`,
      '-c', 'flush',
      ...[0, 1, 2, 3, 4, 5, 6, 7].flatMap((i) => ['-c', `aio_write -P 0x${(0x60 + i).toString(16)} ${12 * MiB + 131072 + i * 65536} 64k`]),
      '-c', 'aio_flush',
      nbdUri(tcp, 'disk')]);
    assert.doesNotMatch(out.stdout + out.stderr, /fail|mismatch/i);
    assert.ok(disk.bytes.subarray(12 * MiB, 12 * MiB + 131072).every((b) => b === 0));
    for (let i = 0; i < 8; i++) assert.equal(disk.bytes[12 * MiB + 131072 + i * 65536 + 100], 0x60 + i);
    assert.ok(disk.count('writeZeroes') > before.zero);
    assert.ok(disk.count('trim') > before.trim);
    assert.ok(disk.count('flush') > before.flush);
  });

  test('qemu-io through --image-opts, and over a Unix socket', async () => {
    await runOk('qemu-io', ['--image-opts', '-c', 'write -P 0x5c 4M 128k', '-c', 'read -P 0x5c 4M 128k',
      `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${'port' in tcp ? tcp.port : 0},export=sector4k`]);
    assert.ok(sector4k.bytes.subarray(4 * MiB, 4 * MiB + 131072).every((b) => b === 0x5c));
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x7e 5M 64k', '-c', 'read -P 0x7e 5M 64k', nbdUri(unix, 'disk')]);
    assert.ok(disk.bytes.subarray(5 * MiB, 5 * MiB + 65536).every((b) => b === 0x7e));
  });

  test('a read-only export: qemu-io reads it, and a write fails', async () => {
    await runOk('qemu-io', ['-r', '-f', 'raw', '-c', `read -v 0 16`, nbdUri(tcp, 'ro')]);
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0 0 64k', nbdUri(tcp, 'ro')]);
    assert.notEqual(w.code, 0);
    assert.match(w.stderr, /Permission denied|read-only/i);
    assert.deepEqual(ro.bytes, randomBytes(ro.size, 42), 'the read-only export is untouched');
    assert.equal(ro.count('write'), 0);
  });
});

describe('nbdcopy', () => {
  needTools('nbdcopy');
  test('16 MiB of random data in and back out, byte for byte (multi-conn)', async () => {
    const data = randomBytes(16 * MiB, 7);
    const src = join(tmp.dir, 'in.bin');
    const dst = join(tmp.dir, 'out.bin');
    writeFileSync(src, data);
    const before = server.stats().connections.total;
    await runOk('nbdcopy', ['--connections=4', src, nbdUri(tcp, 'disk')]);
    assert.ok(server.stats().connections.total - before >= 2, 'nbdcopy used several connections');
    assert.ok(Buffer.from(disk.bytes).equals(Buffer.from(data)), 'the export holds the file');
    disk.bytes.fill(0xff, 0, 1); // and what comes back out is what the export holds
    data[0] = 0xff;
    await runOk('nbdcopy', [nbdUri(tcp, 'disk'), dst]);
    assert.ok(readFileSync(dst).equals(Buffer.from(data)), 'copied back out unchanged');
  });
});

describe('fio', () => {
  needTools('fio');
  // The default export ('scratch'), by the URI with an empty name.
  const fio = (args: string[]) => runOk('fio', ['--ioengine=nbd', `--uri=${nbdUri(tcp)}`, '--verify_fatal=1', '--verify_state_save=0', '--output-format=terse', '--terse-version=3', ...args], 60_000);

  test('random 4K reads and writes at queue depth 16, verified with crc32c', async () => {
    await fio(['--name=randrw', '--rw=randrw', '--bs=4k', '--iodepth=16', '--size=8m', '--verify=crc32c', '--do_verify=1']);
  });

  test('1 MiB sequential writes, then verified', async () => {
    const written = server.stats().bytesWritten;
    await fio(['--name=seq', '--rw=write', '--bs=1m', '--iodepth=4', '--size=16m', '--verify=crc32c', '--do_verify=1']);
    assert.ok(server.stats().bytesWritten - written >= 16 * MiB);
  });
});
