/**
 * NbdStorage when things go wrong: a server killed with SIGKILL mid-run and started again on the
 * same port (every request completes, the data is right), a server stopped (SIGSTOP) past the
 * timeout and continued, a server that stays down (EIO for pending and new requests within a
 * bounded time), requests that never get an answer (nbdkit's delay filter), errors injected by
 * nbdkit's error filter (EIO, ENOSPC, EPERM→EROFS for the requests hit, the others fine).
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NbdStorage, StorageError } from '../../src/storage/index.js';
import { Rng, firstDifference, sparseImage } from '../e2e/helpers.js';
import { rejectsWith, tempDir } from './helpers.js';
import { ServerProcess, freePort, randomIo, verifyAll } from './nbd-support.js';
import { eventually } from '../support/common.js';
import { needTools } from '../support/tools.js';

const MiB = 1024 * 1024;
const tmp = tempDir('blkif-nbd-failures-');
after(() => tmp.cleanup());

describe('server restarts', () => {
  needTools('qemu-nbd');
  test('qemu-nbd killed (SIGKILL) mid-run and started again on the same port: every request completes, data right', async () => {
    const img = join(tmp.dir, 'restart.img');
    sparseImage(img, 16 * MiB);
    const where = { port: await freePort() };
    let srv = await ServerProcess.qemuNbd(where, img, 'raw');
    const logs: string[] = [];
    const s = await NbdStorage.connect(srv.uri(), { timeoutMs: 2000, reconnect: { attempts: 20, baseDelayMs: 20, maxDelayMs: 200 }, log: (m) => logs.push(m) });
    const model = new Uint8Array(s.size);
    try {
      const rng = new Rng(21);
      let restarted = false;
      let batchesAfter = 0;
      let caught = 0;
      const chaos = (async () => {
        // Killed mid-run: only once requests are on the wire. Replies arrive as I/O, so nothing
        // completes between the poll that saw them and the kill.
        await eventually(() => s.stats.inFlight > 0, 'requests in flight before the kill', 30_000, 1);
        caught = s.stats.inFlight;
        await srv.kill();
        // Down long enough that a reconnection is refused, as the log assertion below expects.
        await eventually(() => logs.some((l) => /reconnection attempt 1\/20 failed/.test(l)), 'a refused reconnection', 30_000);
        srv = await ServerProcess.qemuNbd(where, img, 'raw');
        restarted = true;
      })();
      while (!restarted || batchesAfter < 6) {
        await randomIo(s, model, rng, 1, 512);
        if (restarted) batchesAfter++;
      }
      await chaos;
      await verifyAll(s, model);
      assert.ok(caught > 0, `${caught} requests in flight when the server was killed`);
      const st = s.stats;
      assert.ok(st.drops >= 1 && st.reconnects >= 1, `drops ${st.drops}, reconnects ${st.reconnects}`);
      const text = logs.join('\n');
      assert.match(text, /connection 0 lost/);
      assert.match(text, /reconnection attempt 1\/20 failed: .*ECONNREFUSED/);
      assert.match(text, /connection 0 reconnected/);
    } finally {
      await s.close();
      await srv.kill();
    }
    assert.equal(firstDifference(readFileSync(img), model), -1, 'the image equals the model');
  });
});

describe('nbdkit failures', () => {
  needTools('nbdkit');
  test('server stopped (SIGSTOP) past the timeout, then continued: requests time out, are re-sent, complete', async () => {
    const where = { socket: join(tmp.dir, 'stall.sock') };
    const srv = await ServerProcess.nbdkit(where, ['memory', '16M']);
    const logs: string[] = [];
    const s = await NbdStorage.connect(srv.uri(), { timeoutMs: 300, reconnect: { attempts: 20, baseDelayMs: 20, maxDelayMs: 100 }, log: (m) => logs.push(m) });
    try {
      const rng = new Rng(31);
      const model = new Uint8Array(s.size);
      await randomIo(s, model, rng, 4);
      srv.signal('SIGSTOP');
      const data = rng.bytes(MiB);
      const pending = [s.write(MiB, [data]), s.read(0, [new Uint8Array(MiB)]), s.flush()];
      // Stopped past the timeout: continued once a request has timed out, not after a guess.
      await eventually(() => s.stats.timeouts >= 1, 'a request timed out against the stopped server', 30_000);
      srv.signal('SIGCONT');
      await Promise.all(pending);
      model.set(data, MiB);
      await verifyAll(s, model);
      assert.ok(s.stats.timeouts >= 1, `timeouts ${s.stats.timeouts}`);
      assert.match(logs.join('\n'), /no reply in 300 ms/);
      assert.match(logs.join('\n'), /reconnected/);
    } finally {
      await s.close();
      await srv.kill();
    }
  });

  test('reads that never get an answer in time (delay filter, rdelay 2 s > timeoutMs): EIO after 3 sends; writes fine', async () => {
    const srv = await ServerProcess.nbdkit({ socket: join(tmp.dir, 'delay.sock') }, ['--filter=delay', 'memory', '16M', 'rdelay=2']);
    const logs: string[] = [];
    const s = await NbdStorage.connect(srv.uri(), { timeoutMs: 250, reconnect: { attempts: 5, baseDelayMs: 20 }, log: (m) => logs.push(m) });
    try {
      const read = s.read(0, [new Uint8Array(4096)]);
      const write = s.write(4096, [new Uint8Array(4096).fill(9)]);
      await write;
      await rejectsWith(read, 'EIO', /NBD_CMD_READ of 4096 bytes at 0 lost its connection 3 times \(last: no reply in 250 ms/);
      // Each of the 3 sends waited out its timeout: counted, not clocked (a busy machine only
      // makes it later). At least 3: on a loaded machine the undelayed write may time out too.
      assert.ok(s.stats.timeouts >= 3, `timeouts ${s.stats.timeouts}`);
      assert.match(logs.join('\n'), /lost \(no reply in 250 ms to NBD_CMD_READ/);
      await s.write(0, [new Uint8Array(4096)]); // the storage carries on
    } finally {
      await s.close();
      await srv.kill();
    }
  });

  test('a server that stays down: pending and new requests fail with EIO naming it, within a bounded time', async () => {
    const where = { socket: join(tmp.dir, 'down.sock') };
    const srv = await ServerProcess.nbdkit(where, ['--filter=delay', 'memory', '16M', 'rdelay=200ms']);
    const logs: string[] = [];
    const s = await NbdStorage.connect(srv.uri(), { timeoutMs: 1000, reconnect: { attempts: 3, baseDelayMs: 50, maxDelayMs: 100 }, log: (m) => logs.push(m) });
    try {
      const inFlight = [s.read(0, [new Uint8Array(4096)]), s.read(8192, [new Uint8Array(4096)])];
      await eventually(() => s.stats.inFlight === 2, 'both reads on the wire', 30_000);
      await srv.kill();
      rmSync(where.socket, { force: true });
      const later = s.write(0, [new Uint8Array(512)]);
      const uri = /nbd\+unix:\/\/\/\?socket=.*down\.sock is unreachable: gave up after 3 reconnection attempt\(s\)/;
      // Bounded by attempts (3, asserted from the log below), not by a clock.
      for (const p of [...inFlight, later]) await rejectsWith(p, 'EIO', uri);
      await rejectsWith(s.read(0, [new Uint8Array(512)]), 'EIO', uri);
      await rejectsWith(s.flush(), 'EIO', uri);
      assert.equal(s.stats.connected, 0);
      assert.match(logs.join('\n'), /reconnection attempt 3\/3 failed/);
      assert.match(logs.join('\n'), /failing every request/);
    } finally {
      await s.close();
    }
  });

  test('NBD_ESHUTDOWN: the connection is re-made and the request sent again (EIO after 3 tries)', async () => {
    const flag = join(tmp.dir, 'inject-shutdown');
    const srv = await ServerProcess.nbdkit({ socket: join(tmp.dir, 'shut.sock') }, ['--filter=error', 'memory', '1M',
      'error-pread=ESHUTDOWN', 'error-pread-rate=100%', `error-pread-file=${flag}`]);
    const logs: string[] = [];
    const s = await NbdStorage.connect(srv.uri(), { reconnect: { baseDelayMs: 10 }, log: (m) => logs.push(m) });
    try {
      writeFileSync(flag, '');
      await rejectsWith(s.read(0, [new Uint8Array(512)]), 'EIO', /lost its connection 3 times \(last: the server is shutting down/);
      assert.equal(s.stats.resent, 2);
      const resent = s.stats.resent;
      const read = s.read(0, [new Uint8Array(512)]);
      // Switched off once the read has been refused and re-sent; the next re-send waits a
      // reconnection delay (10 ms) that this 1 ms poll's timer precedes on the same event loop.
      await eventually(() => s.stats.resent > resent, 'the read re-sent after NBD_ESHUTDOWN', 30_000, 1);
      rmSync(flag);
      await read;
      assert.match(logs.join('\n'), /NBD_ESHUTDOWN/);
    } finally {
      await s.close();
      await srv.kill();
    }
  });

  test('injected errors: EIO on the reads hit, the others correct; ENOSPC and EPERM (EROFS) while switched on', async () => {
    const nospc = join(tmp.dir, 'inject-nospc');
    const eperm = join(tmp.dir, 'inject-eperm');
    const srv = await ServerProcess.nbdkit({ socket: join(tmp.dir, 'err.sock') }, ['--filter=error', 'memory', '16M',
      'error-pread=EIO', 'error-pread-rate=30%',
      'error-pwrite=ENOSPC', 'error-pwrite-rate=100%', `error-pwrite-file=${nospc}`,
      'error-zero=EPERM', 'error-zero-rate=100%', `error-zero-file=${eperm}`]);
    const s = await NbdStorage.connect(srv.uri());
    try {
      const data = new Rng(41).bytes(4 * MiB);
      await s.write(0, [data]);
      const results = await Promise.allSettled(Array.from({ length: 128 }, async (_, i) => {
        const b = new Uint8Array(32 * 1024);
        await s.read(i * b.length, [b]);
        assert.deepEqual(b, data.subarray(i * b.length, (i + 1) * b.length), `read ${i}`);
      }));
      const failed = results.filter((r) => r.status === 'rejected').map((r) => (r as PromiseRejectedResult).reason as Error);
      for (const e of failed) {
        assert.ok(e instanceof StorageError && e.code === 'EIO', String(e));
        assert.match(e.message, /NBD server nbd\+unix:.*err\.sock: NBD_CMD_READ of 32768 bytes at \d+ failed: NBD_EIO/);
      }
      assert.ok(failed.length > 5 && failed.length < 100, `${failed.length} of 128 reads failed`);
      assert.equal(s.stats.errors, failed.length);
      writeFileSync(nospc, '');
      await rejectsWith(s.write(0, [new Uint8Array(4096)]), 'ENOSPC', /NBD_ENOSPC/);
      rmSync(nospc);
      writeFileSync(eperm, '');
      await rejectsWith(s.writeZeroes(0, 4096), 'EROFS', /NBD_EPERM/);
      await rejectsWith(s.discard(0, 4096), 'EROFS');
      rmSync(eperm);
      await s.writeZeroes(0, 4096);
      await s.write(4096, [new Uint8Array(4096).fill(3)]);
      assert.equal(s.stats.drops, 0, 'errors do not cost the connection');
    } finally {
      await s.close();
      await srv.kill();
    }
  });
});
