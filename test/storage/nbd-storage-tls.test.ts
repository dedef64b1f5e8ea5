/**
 * NbdStorage (our NBD client) over TLS to nbdkit --tls=require: pre-shared keys over TCP and a
 * Unix socket, X.509 with a client certificate the server verifies; each a data round trip
 * checked through libnbd's nbdcopy as well. Plaintext, a wrong key and a server certificate from
 * another CA refused with an error that says so. Keys and certificates are made by the test.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { NbdStorage, StorageError } from '../../src/storage/index.js';
import { makeCa, makeCert, pskLine, writePskFile } from '../nbd/tls-support.js';
import { randomBytes, runOk, tempDir } from '../nbd/support.js';
import { ServerProcess, freePort } from './nbd-support.js';
import { requireLocalhost, requireTools } from '../support/tools.js';

const MiB = 1024 * 1024;
const tmp = tempDir('nbd-storage-tls-');
const dir = (name: string) => join(tmp.dir, name);
const procs: ServerProcess[] = [];
let pskFile: string;
let wrongPskFile: string;
let psk: { port: number; srv: ServerProcess };
let pskUnix: string;
let x509: { port: number; srv: ServerProcess };

async function nbdkit(where: { port: number } | { socket: string }, tls: string[]): Promise<ServerProcess> {
  const s = await ServerProcess.nbdkit(where, ['--tls=require', ...tls, 'memory', `${16 * MiB}`]);
  procs.push(s);
  return s;
}

before(async () => {
  requireTools('nbdkit', 'nbdcopy', 'openssl');
  requireLocalhost();
  pskFile = writePskFile(dir('psk'), [pskLine('alice')]);
  wrongPskFile = writePskFile(dir('wrong'), [pskLine('alice')]);
  makeCa(dir('ca'), 'nbdkit test CA');
  makeCert(dir('ca'), dir('server'), 'server', 'localhost');
  makeCert(dir('ca'), dir('client'), 'client', 'blkif');
  makeCa(dir('other-ca'), 'some other CA');
  // Our client certificate, but trusting only the other CA.
  makeCert(dir('other-ca'), dir('other'), 'client', 'x');
  const pp = await freePort();
  psk = { port: pp, srv: await nbdkit({ port: pp }, [`--tls-psk=${pskFile}`]) };
  pskUnix = dir('psk.sock');
  await nbdkit({ socket: pskUnix }, [`--tls-psk=${pskFile}`]);
  const xp = await freePort();
  x509 = { port: xp, srv: await nbdkit({ port: xp }, [`--tls-certificates=${dir('server')}`, '--tls-verify-peer']) };
});

after(async () => {
  await Promise.all(procs.map((p) => p.kill()));
  tmp.cleanup();
});

/** Writes 2 MiB at `at` through NbdStorage, reads it back, flushes; then checks it with nbdcopy over `libnbdUri`. */
async function roundTrip(uri: string, libnbdUri: string, at: number, seed: number): Promise<void> {
  const s = await NbdStorage.connect(uri, { timeoutMs: 10_000 });
  try {
    assert.equal(s.size, 16 * MiB);
    const data = randomBytes(2 * MiB, seed);
    await s.write(at, [data]);
    await s.flush();
    const back = new Uint8Array(2 * MiB);
    await s.read(at, [back]);
    assert.deepEqual(back, data);
    const copy = join(tmp.dir, `copy-${seed}.raw`);
    await runOk('nbdcopy', [libnbdUri, copy]);
    assert.deepEqual(new Uint8Array(readFileSync(copy)).subarray(at, at + 2 * MiB), data, 'nbdcopy reads what we wrote');
  } finally {
    await s.close();
  }
}

async function refused(uri: string, message: RegExp): Promise<void> {
  await assert.rejects(NbdStorage.connect(uri, { timeoutMs: 10_000 }), (e: unknown) => {
    assert.ok(e instanceof StorageError, String(e));
    assert.equal(e.code, 'EIO');
    assert.match(e.message, message);
    return true;
  });
}

describe('NbdStorage on nbdkit --tls=require', { timeout: 120_000 }, () => {
  test('PSK over TCP: nbds://alice@127.0.0.1:PORT/?tls-psk-file=FILE', async () => {
    const uri = `nbds://alice@127.0.0.1:${psk.port}/?tls-psk-file=${encodeURIComponent(pskFile)}`;
    await roundTrip(uri, uri, 0, 1);
  });

  test('PSK over a Unix socket: nbds+unix://alice@/?socket=PATH&tls-psk-file=FILE', async () => {
    const uri = `nbds+unix://alice@/?socket=${encodeURIComponent(pskUnix)}&tls-psk-file=${encodeURIComponent(pskFile)}`;
    await roundTrip(uri, uri, 4 * MiB, 2);
  });

  test('X.509: the server checked against our CA and the host name, our certificate checked by nbdkit', async () => {
    const uri = `nbds://localhost:${x509.port}/?tls-certificates=${encodeURIComponent(dir('client'))}`;
    await roundTrip(uri, uri, 8 * MiB, 3);
  });

  test('plaintext to a TLS-only server: the error says to use nbds://', async () => {
    await refused(`nbd://127.0.0.1:${psk.port}/`, /requires TLS: use an nbds:\/\/ URI/);
  });

  test('a wrong key, or a server certificate from a CA we do not trust: TLS handshake failed', async () => {
    await refused(`nbds://alice@127.0.0.1:${psk.port}/?tls-psk-file=${encodeURIComponent(wrongPskFile)}`, /TLS handshake failed/);
    await refused(`nbds://localhost:${x509.port}/?tls-certificates=${encodeURIComponent(dir('other'))}`, /TLS handshake failed: .*(certificate|verify)/i);
  });

  test('no client certificate where nbdkit wants one: refused', async () => {
    // Only the CA: nbdkit --tls-verify-peer asks for a certificate we do not have.
    const onlyCa = dir('only-ca');
    mkdirSync(onlyCa);
    copyFileSync(join(dir('ca'), 'ca-cert.pem'), join(onlyCa, 'ca-cert.pem'));
    await refused(`nbds://localhost:${x509.port}/?tls-certificates=${encodeURIComponent(onlyCa)}`, /TLS handshake failed|did not accept our certificate/);
  });
});
