/**
 * The server's TLS cipher order: AES-GCM first where the CPU has AES instructions (then several
 * times faster than ChaCha20-Poly1305), ChaCha20 first where not; imposed on real GnuTLS clients
 * (nbdinfo) with a PSK and with certificates.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { NbdServer, cpuHasAes, loadServerTls, serverCiphers, type NbdServerTls } from '../../src/nbd/index.js';
import { MemoryDevice, runOk, tempDir } from './support.js';
import { makeCa, makeCert, pskLine, writePskFile } from './tls-support.js';
import { requireTools } from '../support/tools.js';

requireTools('nbdinfo', 'openssl');

const tmp = tempDir('nbd-tls-ciphers-');
const servers: NbdServer[] = [];
after(async () => {
  for (const s of servers) await s.close();
  tmp.cleanup();
});

test('cpuHasAes reads the aes flag of /proc/cpuinfo (x86 flags, ARM Features); unreadable is no', () => {
  assert.equal(cpuHasAes(() => 'processor\t: 0\nflags\t\t: fpu vme sse2 pclmulqdq aes avx2\n'), true);
  assert.equal(cpuHasAes(() => 'processor\t: 0\nflags\t\t: fpu vme sse2 avx2 vaes_x\n'), false);
  assert.equal(cpuHasAes(() => 'processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1\n'), true);
  assert.equal(cpuHasAes(() => { throw new Error('ENOENT'); }), false);
});

test('serverCiphers: AES-GCM or ChaCha20 first, in TLS 1.3 and in TLS 1.2', () => {
  for (const psk of [true, false]) {
    const aes = serverCiphers(true, psk).split(':');
    const chacha = serverCiphers(false, psk).split(':');
    assert.equal(aes[0], 'TLS_AES_128_GCM_SHA256');
    assert.equal(chacha[0], 'TLS_CHACHA20_POLY1305_SHA256');
    const tls12 = (l: string[]) => l.filter((c) => !c.startsWith('TLS_'));
    assert.match(tls12(aes)[0]!, /GCM/);
    assert.match(tls12(chacha)[0]!, /CHACHA20/);
    assert.deepEqual([...aes].sort(), [...chacha].sort(), 'the same suites, in another order');
    if (psk) assert.ok(tls12(aes).every((c) => c.includes('PSK')));
  }
});

async function negotiated(credentials: NbdServerTls, aesFirst: boolean, uri: (port: number) => string): Promise<string> {
  const logs: string[] = [];
  const server = new NbdServer({
    exports: [{ name: 'disk', device: new MemoryDevice(1024 * 1024) }],
    tls: { mode: 'require', credentials, aesFirst },
    log: (_l, m) => logs.push(m),
  });
  servers.push(server);
  const a = await server.listen({ host: '127.0.0.1', port: 0 });
  await runOk('nbdinfo', ['--size', uri((a as { port: number }).port)]);
  const line = logs.find((l) => /TLS TLSv1\.3 /.test(l));
  assert.ok(line !== undefined, logs.join('\n'));
  return line;
}

test('nbdinfo (GnuTLS) gets the server\'s choice: AES-128-GCM first or ChaCha20 first, with a PSK and with certificates', async () => {
  const pskFile = writePskFile(join(tmp.dir, 'psk'), [pskLine('alice')]);
  const psk = loadServerTls({ psk: pskFile });
  const pskUri = (port: number) => `nbds://alice@127.0.0.1:${port}/disk?tls-psk-file=${encodeURIComponent(pskFile)}`;
  makeCa(join(tmp.dir, 'ca'), 'cipher test CA');
  makeCert(join(tmp.dir, 'ca'), join(tmp.dir, 'server'), 'server', 'localhost');
  makeCert(join(tmp.dir, 'ca'), join(tmp.dir, 'client'), 'client', 'client');
  const x509 = loadServerTls({ certificates: join(tmp.dir, 'server') });
  const x509Uri = (port: number) => `nbds://localhost:${port}/disk?tls-certificates=${encodeURIComponent(join(tmp.dir, 'client'))}`;
  assert.match(await negotiated(psk, true, pskUri), /TLS_AES_128_GCM_SHA256/);
  assert.match(await negotiated(psk, false, pskUri), /TLS_CHACHA20_POLY1305_SHA256/);
  assert.match(await negotiated(x509, true, x509Uri), /TLS_AES_128_GCM_SHA256/);
  assert.match(await negotiated(x509, false, x509Uri), /TLS_CHACHA20_POLY1305_SHA256/);
});
