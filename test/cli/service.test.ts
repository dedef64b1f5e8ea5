/**
 * The service helpers of `blkif serve`: which addresses count as loopback and what the warning
 * for the others says, systemd's LISTEN_PID/LISTEN_FDS, the PID file.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { bareHost, exposureWarning, inheritedSockets, isLoopback, removePidFile, writePidFile } from '../../src/cli/service.js';
import { tempDir } from '../nbd/support.js';

describe('service helpers', { timeout: 10_000 }, () => {
  test('loopback: 127.0.0.0/8, ::1, localhost, IPv4-mapped 127.x; not ::, 0.0.0.0 or a LAN address', () => {
    for (const h of ['127.0.0.1', '127.1.2.3', '::1', '[::1]', 'localhost', '::ffff:127.0.0.1']) assert.equal(isLoopback(h), true, h);
    for (const h of ['::', '0.0.0.0', '192.0.2.7', '2001:db8::1', 'example.org', '128.0.0.1']) assert.equal(isLoopback(h), false, h);
    assert.equal(bareHost('[::]'), '::');
  });

  test('the warning names the address and the risk, and is silent when TLS is required or on loopback', () => {
    const w = exposureWarning('::', 'off', false)!;
    assert.match(w, /serving on :: without TLS/);
    assert.match(w, /read and overwrite the disks/);
    assert.match(w, /--tls=require/);
    assert.match(exposureWarning('0.0.0.0', 'on', true)!, /not required .*can read the disks/);
    assert.equal(exposureWarning('::', 'require', false), undefined);
    assert.equal(exposureWarning('127.0.0.1', 'off', false), undefined);
  });

  test('LISTEN_FDS counts sockets from fd 3 only when LISTEN_PID is this process; the variables are consumed', () => {
    const env: NodeJS.ProcessEnv = { LISTEN_PID: '42', LISTEN_FDS: '2', LISTEN_FDNAMES: 'a:b' };
    assert.deepEqual(inheritedSockets(env, 42), [3, 4]);
    assert.deepEqual(env, {});
    assert.equal(inheritedSockets({ LISTEN_PID: '41', LISTEN_FDS: '1' }, 42), undefined, 'meant for another process');
    assert.equal(inheritedSockets({ LISTEN_PID: '42', LISTEN_FDS: '0' }, 42), undefined);
    assert.equal(inheritedSockets({ LISTEN_PID: '42', LISTEN_FDS: 'x' }, 42), undefined);
    assert.equal(inheritedSockets({}, 42), undefined);
  });

  test('PID file: the number and a newline, written whole; removal tolerates absence', () => {
    const t = tempDir('pidfile-');
    try {
      const p = join(t.dir, 'x.pid');
      writePidFile(p, 1234);
      assert.equal(readFileSync(p, 'utf8'), '1234\n');
      removePidFile(p);
      assert.ok(!existsSync(p));
      removePidFile(p);
    } finally {
      t.cleanup();
    }
  });
});
