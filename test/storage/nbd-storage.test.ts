/**
 * NbdStorage against real NBD servers (qemu-nbd on raw and qcow2 images, nbdkit's memory plugin
 * with and without structured replies, through its log and blocksize-policy filters), against our
 * own NbdServer, and against a scripted server that splits and reorders structured replies or
 * knows only NBD_OPT_EXPORT_NAME: random vectored I/O checked against a byte model, multi-conn,
 * block-size limits, read-only exports, URIs. Servers listen on 127.0.0.1 or on Unix sockets in a
 * temp dir and are killed afterwards. A suite whose program is missing fails, naming its Debian package.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NbdServer, nbdUri, parseNbdUri, formatNbdUri } from '../../src/nbd/index.js';
import { NbdStorage } from '../../src/storage/index.js';
import { Rng, firstDifference, sparseImage } from '../e2e/helpers.js';
import { MemoryDevice } from '../nbd/support.js';
import { rejectsWith, sharedViews, tempDir } from './helpers.js';
import { ScriptedServer, ServerProcess, freePort, randomIo, verifyAll } from './nbd-support.js';
import { needTools } from '../support/tools.js';

const MiB = 1024 * 1024;
const tmp = tempDir('blkif-nbd-storage-');
after(() => tmp.cleanup());

let socketCount = 0;
const sock = () => ({ socket: join(tmp.dir, `s${socketCount++}.sock`) });

describe('NBD URIs', () => {
  test('parse: TCP with and without port, IPv6, Unix socket, percent-encoded names', () => {
    assert.deepEqual(parseNbdUri('nbd://127.0.0.1:1234/disk'), { transport: 'tcp', host: '127.0.0.1', port: 1234, exportName: 'disk' });
    assert.deepEqual(parseNbdUri('nbd://example.org'), { transport: 'tcp', host: 'example.org', port: 10809, exportName: '' });
    assert.deepEqual(parseNbdUri('nbd://[::1]:99/a%20b%2Fc'), { transport: 'tcp', host: '::1', port: 99, exportName: 'a b/c' });
    assert.deepEqual(parseNbdUri('nbd+unix:///vm%201?socket=/run/a%20b.sock'), { transport: 'unix', path: '/run/a b.sock', exportName: 'vm 1' });
    assert.deepEqual(parseNbdUri('nbd+unix://?socket=/s'), { transport: 'unix', path: '/s', exportName: '' });
    assert.deepEqual(parseNbdUri('nbds://alice@[::1]/?tls-psk-file=keys.psk'),
      { transport: 'tcp', host: '::1', port: 10809, exportName: '', tls: { username: 'alice', verifyPeer: true, pskFile: 'keys.psk' } });
    assert.deepEqual(parseNbdUri('nbds+unix://bob@/vm?socket=/s&tls-psk-file=/k'),
      { transport: 'unix', path: '/s', exportName: 'vm', tls: { username: 'bob', verifyPeer: true, pskFile: '/k' } });
    assert.deepEqual(parseNbdUri('nbds://h:7/e?tls-certificates=/pki&tls-verify-peer=false&tls-hostname=disk.example&tls-username=carol'),
      { transport: 'tcp', host: 'h', port: 7, exportName: 'e', tls: { username: 'carol', verifyPeer: false, certificates: '/pki', hostname: 'disk.example' } });
    assert.equal(formatNbdUri(parseNbdUri('nbds+unix://bob@/vm?socket=/s&tls-psk-file=/k')), 'nbds+unix://bob@/vm?socket=%2Fs');
    for (const u of ['nbd://h:1/x y', 'nbd+unix:///e?socket=/tmp/s p', 'nbd://[::1]:5/'] as const) {
      assert.deepEqual(parseNbdUri(formatNbdUri(parseNbdUri(u))), parseNbdUri(u), `${u} survives formatting`);
    }
  });

  test('connect refuses anything but nbd[s]:// and nbd[s]+unix:// with EINVAL, before touching the network', async () => {
    for (const u of ['', 'disk.img', 'http://h/e', 'nbds://h/e?tls-verify-peer=maybe', 'nbds+unix:///e', 'nbd+vsock://1/e', 'nbd:///e', 'nbd://h:0/e',
      'nbd://h:70000/e', 'nbd://u:p@h/e', 'nbds://u:p@h/e', 'nbd+unix:///e', 'nbd+unix://host/e?socket=/s', 'nbd://h/%zz']) {
      await rejectsWith(NbdStorage.connect(u), 'EINVAL');
    }
    await rejectsWith(NbdStorage.connect('nbd://alice@h/e'), 'EINVAL', /nbds:\/\//);
    await rejectsWith(NbdStorage.connect('nbds://alice@h/e?tls-psk-file=/nonexistent/keys.psk'), 'EINVAL', /\/nonexistent\/keys\.psk/);
    await rejectsWith(NbdStorage.connect('nbd://127.0.0.1/e', { sectorSize: 1024 as 512 }), 'EINVAL');
    await rejectsWith(NbdStorage.connect('nbd://127.0.0.1/e', { depth: 0 }), 'EINVAL');
  });

  test('nobody listening: EIO at once, naming the server', async () => {
    const port = await freePort();
    await rejectsWith(NbdStorage.connect(`nbd://127.0.0.1:${port}/x`), 'EIO', new RegExp(`nbd://127\\.0\\.0\\.1:${port}/x.*ECONNREFUSED`));
    await rejectsWith(NbdStorage.connect(`nbd+unix:///?socket=${join(tmp.dir, 'nobody.sock')}`), 'EIO', /nobody\.sock/);
  });
});

describe('our own NbdServer', () => {
  test('unknown export: ENOENT; block size, structured replies and multi-conn taken from the server', async () => {
    const dev = new MemoryDevice(4 * MiB, { blockSize: 4096 });
    const server = new NbdServer({ exports: [{ name: 'd', device: dev }] });
    const addr = await server.listen({ host: '127.0.0.1', port: 0 });
    try {
      await rejectsWith(NbdStorage.connect(nbdUri(addr, 'nope')), 'ENOENT', /nope/);
      await rejectsWith(NbdStorage.connect(nbdUri(addr, 'd')), 'EINVAL', /4096 bytes.*512-byte sector size.*sectorSize 4096/);
      const s = await NbdStorage.connect(nbdUri(addr, 'd'), { sectorSize: 4096, connections: 3 });
      try {
        assert.deepEqual([s.size, s.sectorSize, s.readOnly, s.canDiscard, s.structuredReplies, s.info.negotiation], [4 * MiB, 4096, false, true, true, 'go']);
        assert.deepEqual(s.info.blockSize, { minimum: 4096, preferred: 4096, maximum: 32 * MiB });
        assert.equal(s.stats.connections, 3);
        const model = new Uint8Array(s.size);
        await randomIo(s, model, new Rng(11), 24);
        await verifyAll(s, model);
        assert.deepEqual(dev.bytes, model, 'the server holds what the model says');
        assert.equal(server.stats().connections.active, 3);
      } finally {
        await s.close();
      }
      assert.equal(server.stats().requests.disc, 3, 'NBD_CMD_DISC on every connection');
    } finally {
      await server.close();
    }
  });
});

describe('scripted server', () => {
  test('an old server without NBD_OPT_GO: falls back to NBD_OPT_EXPORT_NAME and simple replies', async () => {
    const srv = new ScriptedServer(8 * MiB, { oldStyle: true });
    const port = await srv.listen();
    try {
      const s = await NbdStorage.connect(`nbd://127.0.0.1:${port}/whatever`);
      try {
        assert.deepEqual([s.info.negotiation, s.structuredReplies, s.info.blockSize, s.size], ['exportName', false, undefined, 8 * MiB]);
        assert.deepEqual(srv.options, [8, 7, 1], 'STRUCTURED_REPLY and GO refused, then EXPORT_NAME');
        const model = new Uint8Array(s.size);
        await randomIo(s, model, new Rng(5), 16);
        await verifyAll(s, model);
      } finally {
        await s.close();
      }
    } finally {
      await srv.close();
    }
  });

  test('structured reads split into shuffled data and hole chunks, replies out of order, interleaved', async () => {
    const srv = new ScriptedServer(8 * MiB, { chunky: true });
    const port = await srv.listen();
    try {
      const s = await NbdStorage.connect(`nbd://127.0.0.1:${port}/`);
      try {
        assert.equal(s.structuredReplies, true);
        const model = new Uint8Array(s.size);
        const rng = new Rng(99);
        // Data with zero runs, so that reads come back as a mix of data and holes.
        for (let off = 0; off < 2 * MiB; off += 64 * 1024) {
          const d = rng.bytes(64 * 1024);
          for (let z = 0; z < 8; z++) d.fill(0, rng.int(0, 60_000), rng.int(0, 65_536));
          model.set(d, off);
        }
        await s.write(0, [model.subarray(0, 2 * MiB)]);
        await randomIo(s, model, rng, 24, 64);
        await verifyAll(s, model);
        assert.ok(srv.holes > 0 && srv.reordered > 0, `holes ${srv.holes}, reordered batches ${srv.reordered}`);
      } finally {
        await s.close();
      }
    } finally {
      await srv.close();
    }
  });

  test('a reply that breaks the protocol: the connection is cut and re-made, the read sent again', async () => {
    const srv = new ScriptedServer(MiB, { garbleFirstRead: true });
    const port = await srv.listen();
    const logs: string[] = [];
    try {
      const s = await NbdStorage.connect(`nbd://127.0.0.1:${port}/`, { log: (m) => logs.push(m), reconnect: { baseDelayMs: 10 } });
      try {
        await s.write(0, [new Uint8Array(8192).fill(4)]);
        const b = new Uint8Array(8192);
        await s.read(0, [b]);
        assert.ok(b.every((x) => x === 4));
        assert.deepEqual([s.stats.drops, s.stats.reconnects, s.stats.resent], [1, 1, 1]);
        assert.match(logs.join('\n'), /lost \(protocol error: bad reply magic 0x5a5a5a5a\)/);
      } finally {
        await s.close();
      }
    } finally {
      await srv.close();
    }
  });

  test('an error chunk fails its read with EIO, carrying the server\'s message; other reads are fine', async () => {
    const srv = new ScriptedServer(MiB, { failReadsAt: 100_000 });
    const port = await srv.listen();
    try {
      const s = await NbdStorage.connect(`nbd://127.0.0.1:${port}/`);
      try {
        await s.write(0, [new Uint8Array(MiB).fill(7)]);
        const bad = s.read(98_304, [new Uint8Array(4096)]);
        const good = new Uint8Array(4096);
        await s.read(0, [good]);
        await rejectsWith(bad, 'EIO', /NBD_CMD_READ of 4096 bytes at 98304 failed: NBD_EIO \(injected\)/);
        assert.ok(good.every((b) => b === 7));
        assert.equal(s.stats.drops, 0, 'an error reply does not cost the connection');
      } finally {
        await s.close();
      }
    } finally {
      await srv.close();
    }
  });
});

describe('qemu-nbd', () => {
  needTools('qemu-nbd', 'qemu-img');
  test('raw image over TCP, 3 connections (qemu-nbd -e 8 allows multi-conn): random vectored I/O, the file equals the model', async () => {
    const img = join(tmp.dir, 'raw.img');
    sparseImage(img, 16 * MiB);
    const srv = await ServerProcess.qemuNbd({ port: await freePort() }, img, 'raw');
    try {
      const s = await NbdStorage.connect(srv.uri(), { connections: 3 });
      const model = new Uint8Array(16 * MiB);
      try {
        assert.deepEqual([s.size, s.readOnly, s.structuredReplies, s.info.negotiation, s.stats.connections], [16 * MiB, false, true, 'go', 3]);
        assert.ok(s.info.blockSize !== undefined && s.info.blockSize.minimum <= 512, 'qemu-nbd states block sizes');
        await randomIo(s, model, new Rng(1), 48);
        await verifyAll(s, model);
      } finally {
        await s.close();
      }
      const file = readFileSync(img);
      assert.equal(firstDifference(file.subarray(0, model.length), model), -1, 'the image file equals the model');
    } finally {
      await srv.kill();
    }
  });

  test('qcow2 image over a Unix socket: random I/O, discards and zeroes read back as zeroes; 4096-byte sectors', async () => {
    const img = join(tmp.dir, 'disk.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '16M']);
    const srv = await ServerProcess.qemuNbd(sock(), img, 'qcow2', ['--discard=unmap']);
    try {
      const model = new Uint8Array(16 * MiB);
      for (const sectorSize of [512, 4096] as const) {
        const s = await NbdStorage.connect(srv.uri(), { sectorSize });
        try {
          assert.equal(s.size, model.length);
          await randomIo(s, model, new Rng(sectorSize), 40, 128);
          await verifyAll(s, model);
        } finally {
          await s.close();
        }
      }
    } finally {
      await srv.kill();
    }
  });

  test('read-only export (qemu-nbd -r): readOnly, writes refused locally with EROFS, reads served', async () => {
    const img = join(tmp.dir, 'ro.img');
    const data = new Rng(3).bytes(MiB);
    writeFileSync(img, data);
    const srv = await ServerProcess.qemuNbd(sock(), img, 'raw', ['-r']);
    try {
      const s = await NbdStorage.connect(srv.uri());
      try {
        assert.equal(s.readOnly, true);
        const before = s.stats.requests;
        await rejectsWith(s.write(0, [new Uint8Array(512)]), 'EROFS');
        await rejectsWith(s.discard(0, 512), 'EROFS');
        await rejectsWith(s.writeZeroes(0, 512), 'EROFS');
        await s.flush();
        assert.equal(s.stats.requests, before, 'nothing was sent');
        const got = new Uint8Array(MiB);
        await s.read(0, [got]);
        assert.deepEqual(got, data);
      } finally {
        await s.close();
      }
    } finally {
      await srv.kill();
    }
  });
});

describe('nbdkit', () => {
  needTools('nbdkit');
  test('memory 64M: random I/O at depth; a second client sees the data', async () => {
    const srv = await ServerProcess.nbdkit({ port: await freePort() }, ['memory', '64M']);
    try {
      const s = await NbdStorage.connect(srv.uri(), { depth: 16 });
      const model = new Uint8Array(64 * MiB);
      try {
        assert.deepEqual([s.size, s.canDiscard, s.structuredReplies], [64 * MiB, true, true]);
        await randomIo(s, model, new Rng(2), 48, 2048);
        // More than the 32 MiB a request may carry: two requests each way.
        const big = new Rng(22).bytes(40 * MiB);
        const before = s.stats.requests;
        await s.write(8 * MiB, [big.subarray(0, 3 * MiB), big.subarray(3 * MiB)]);
        model.set(big, 8 * MiB);
        const back = new Uint8Array(40 * MiB);
        await s.read(8 * MiB, [back]);
        assert.equal(firstDifference(back, big), -1);
        assert.equal(s.stats.requests - before, 4);
      } finally {
        await s.close();
      }
      const t = await NbdStorage.connect(srv.uri(), { readOnly: true });
      try {
        assert.equal(t.readOnly, true, 'opts.readOnly on a writable export');
        await rejectsWith(t.write(0, [new Uint8Array(512)]), 'EROFS');
        await verifyAll(t, model);
      } finally {
        await t.close();
      }
    } finally {
      await srv.kill();
    }
  });

  test('simple replies only (nbdkit --no-sr), over a Unix socket', async () => {
    const srv = await ServerProcess.nbdkit(sock(), ['--no-sr', 'memory', '8M']);
    try {
      const s = await NbdStorage.connect(srv.uri(), { depth: 1 });
      try {
        assert.equal(s.structuredReplies, false);
        const model = new Uint8Array(s.size);
        await randomIo(s, model, new Rng(4), 24);
        await verifyAll(s, model);
      } finally {
        await s.close();
      }
    } finally {
      await srv.kill();
    }
  });

  test('multi-conn: requests spread over every connection, a flush on each; at most 8', async () => {
    const log = join(tmp.dir, 'multi.log');
    const srv = await ServerProcess.nbdkit(sock(), ['--filter=log', 'memory', '64M', `logfile=${log}`]);
    try {
      const s = await NbdStorage.connect(srv.uri(), { connections: 4 });
      const model = new Uint8Array(s.size);
      try {
        assert.equal(s.info.transmissionFlags & 0x100, 0x100, 'the server allows multi-conn');
        assert.deepEqual([s.stats.connections, s.stats.connected], [4, 4]);
        await randomIo(s, model, new Rng(6), 24);
        await s.flush();
        await verifyAll(s, model);
      } finally {
        await s.close();
      }
      const lines = readFileSync(log, 'utf8').split('\n');
      const conns = (what: RegExp) => new Set(lines.filter((l) => what.test(l)).map((l) => /connection=(\d+)/.exec(l)?.[1]));
      assert.equal(conns(/ (Read|Write) id=/).size, 4, 'reads and writes on all four connections');
      assert.equal(conns(/ Flush id=/).size, 4, 'flushes on all four');
      const many = await NbdStorage.connect(srv.uri(), { connections: 20 });
      assert.equal(many.stats.connections, 8);
      await many.close();
    } finally {
      await srv.kill();
    }
  });

  test('no multi-conn (multi-conn filter, disabled): one connection whatever is asked; size rounded down to sectors', async () => {
    const srv = await ServerProcess.nbdkit(sock(), ['--filter=multi-conn', 'memory', '1000000', 'multi-conn-mode=disable']);
    const logs: string[] = [];
    try {
      const s = await NbdStorage.connect(srv.uri(), { connections: 4, log: (m) => logs.push(m) });
      try {
        assert.deepEqual([s.stats.connections, s.info.exportSize, s.size], [1, 1_000_000, 1_000_000 - (1_000_000 % 512)]);
        assert.match(logs.join('\n'), /does not allow multiple connections/);
        await rejectsWith(s.read(s.size, [new Uint8Array(512)]), 'EINVAL', /beyond the end/);
        await s.write(s.size - 512, [new Uint8Array(512).fill(1)]);
        const t = await NbdStorage.connect(srv.uri(), { sectorSize: 4096 });
        assert.equal(t.size, 1_000_000 - (1_000_000 % 4096));
        await t.close();
      } finally {
        await s.close();
      }
    } finally {
      await srv.kill();
    }
  });

  test('read-only export (nbdkit -r)', async () => {
    const srv = await ServerProcess.nbdkit(sock(), ['-r', 'pattern', '1M']);
    try {
      const s = await NbdStorage.connect(srv.uri());
      try {
        assert.equal(s.readOnly, true);
        await rejectsWith(s.write(0, [new Uint8Array(512)]), 'EROFS', /read-only/);
        const b = new Uint8Array(4096);
        await s.read(8192, [b]);
        // The pattern plugin: each 8-byte word holds its own offset, big-endian.
        assert.equal(new DataView(b.buffer).getBigUint64(8), 8192n + 8n);
      } finally {
        await s.close();
      }
    } finally {
      await srv.kill();
    }
  });

  test('block sizes: a minimum above the sector size is refused; requests above the maximum are split', async () => {
    const srv = await ServerProcess.nbdkit(sock(), ['--filter=blocksize-policy', 'memory', '16M', 'blocksize-minimum=4096',
      'blocksize-preferred=4096', 'blocksize-maximum=65536', 'blocksize-error-policy=error']);
    try {
      await rejectsWith(NbdStorage.connect(srv.uri()), 'EINVAL', /aligned to 4096 bytes, more than the 512-byte sector size/);
      const s = await NbdStorage.connect(srv.uri(), { sectorSize: 4096 });
      try {
        assert.deepEqual(s.info.blockSize, { minimum: 4096, preferred: 4096, maximum: 65536 });
        const data = new Rng(8).bytes(MiB);
        const before = s.stats.requests;
        await s.write(4096, sharedViews(data, [1, 5000, 70_000, 500_000]));
        const got = new Uint8Array(MiB);
        await s.read(4096, [got.subarray(0, 3), got.subarray(3)]);
        assert.deepEqual(got, data);
        assert.equal(s.stats.requests - before, 32, '1 MiB in 64 KiB requests, each way');
        const model = new Uint8Array(s.size);
        model.set(data, 4096);
        await randomIo(s, model, new Rng(9), 16, 64);
        await verifyAll(s, model);
      } finally {
        await s.close();
      }
    } finally {
      await srv.kill();
    }
  });
});
