/**
 * NbdServer with TLS against the real GnuTLS clients (libnbd's nbdinfo and nbdcopy, qemu-img and
 * qemu-io), with pre-shared keys and with X.509 certificates made by the test; plaintext,
 * a wrong key and a certificate from another CA refused; hostile negotiation (garbage around
 * NBD_OPT_STARTTLS, a handshake left halfway, option floods) costs only the client doing it.
 * Everything listens on 127.0.0.1.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import {
  NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_LIST, NBD_OPT_STARTTLS, NBD_REP_ACK, NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY, NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_UNSUP, NbdServer, encodeInfoRequest, encodeOption, loadServerTls, parsePskFile,
  NbdTlsConfigError, NBD_FLAG_SEND_DF, NBD_OPT_STRUCTURED_REPLY, NBD_REP_INFO, ServerParser, decodeInfo, encodeGreeting,
  type NbdAddress, type NbdServerTls, type ServerMessage,
} from '../../src/nbd/index.js';
import { MemoryDevice, RawClient, randomBytes, run, runOk, tempDir, until } from './support.js';
import { makeCa, makeCert, pskLine, writePskFile } from './tls-support.js';
import { requireLocalhost, requireTools } from '../support/tools.js';

const MiB = 1024 * 1024;
const tmp = tempDir('nbd-tls-');
const dir = (name: string) => join(tmp.dir, name);

interface Served {
  server: NbdServer;
  addr: { host: string; port: number };
  disk: MemoryDevice;
  logs: string[];
}

const servers: NbdServer[] = [];

async function start(tls: NbdServerTls, mode: 'on' | 'require' = 'require', extra: { tlsHandshakeTimeoutMs?: number; maxOptions?: number } = {}): Promise<Served> {
  const disk = new MemoryDevice(8 * MiB);
  const logs: string[] = [];
  const server = new NbdServer({
    exports: [{ name: 'disk', description: 'TLS test disk', device: disk }],
    tls: { mode, credentials: tls },
    log: (level, m) => logs.push(`${level} ${m}`),
    ...extra,
  });
  servers.push(server);
  const a = await server.listen({ host: '127.0.0.1', port: 0 }) as NbdAddress & { host: string; port: number };
  return { server, addr: { host: a.host, port: a.port }, disk, logs };
}

let pskFile: string;
let wrongPskFile: string;
let strangerPskFile: string;
let psk: Served;
let x509: Served;
let on: Served;

before(() => {
  requireTools('nbdinfo', 'nbdcopy', 'qemu-img', 'qemu-io', 'openssl');
  requireLocalhost();
  const alice = pskLine('alice');
  pskFile = writePskFile(dir('psk'), [pskLine('bob'), alice]);
  // The same user with another key.
  wrongPskFile = writePskFile(dir('wrong-psk'), [pskLine('alice')]);
  // A user the server does not know.
  strangerPskFile = writePskFile(dir('stranger-psk'), [pskLine('mallory')]);
  makeCa(dir('ca'), 'blkif test CA');
  makeCert(dir('ca'), dir('server'), 'server', 'localhost');
  makeCert(dir('ca'), dir('client'), 'client', 'test client');
  makeCa(dir('evil-ca'), 'another CA');
  makeCert(dir('evil-ca'), dir('evil-client'), 'client', 'intruder');
  // The intruder trusts our CA (so only the server's check can stop it)...
  makeCert(dir('evil-ca'), dir('intruder'), 'client', 'intruder');
  writeFileSync(join(dir('intruder'), 'ca-cert.pem'), readFileSync(join(dir('ca'), 'ca-cert.pem')));
  // ...and a client with our certificate that trusts only another CA refuses the server.
  makeCert(dir('ca'), dir('misled'), 'client', 'misled client');
  writeFileSync(join(dir('misled'), 'ca-cert.pem'), readFileSync(join(dir('evil-ca'), 'ca-cert.pem')));
});

before(async () => {
  psk = await start(loadServerTls({ psk: pskFile }));
  x509 = await start(loadServerTls({ certificates: dir('server'), verifyPeer: true }));
  on = await start(loadServerTls({ psk: pskFile }), 'on');
});

after(async () => {
  await Promise.all(servers.map((s) => s.close()));
  tmp.cleanup();
});

const pskUri = (s: Served, file = pskFile, user = 'alice') => `nbds://${user}@127.0.0.1:${s.addr.port}/disk?tls-psk-file=${encodeURIComponent(file)}`;
const x509Uri = (s: Served, certs = dir('client')) => `nbds://localhost:${s.addr.port}/disk?tls-certificates=${encodeURIComponent(certs)}`;
const qemuPsk = (file: string) => `tls-creds-psk,id=tls0,endpoint=client,dir=${join(file, '..')},username=alice`;
const qemuImage = (s: Served, host = '127.0.0.1') => `driver=nbd,host=${host},port=${s.addr.port},export=disk,tls-creds=tls0`;

describe('NBD over TLS', { timeout: 240_000 }, () => {
  describe('key file and certificate directory', () => {
    test('psktool lines parse; malformed ones name the line', () => {
      const keys = parsePskFile('alice:00ff\n\nbob:0a0B0c\n');
      assert.deepEqual([...keys.keys()], ['alice', 'bob']);
      assert.deepEqual([...keys.get('bob')!], [10, 11, 12]);
      assert.throws(() => parsePskFile('alice:0g\n', 'k.psk'), (e: Error) => e instanceof NbdTlsConfigError && /k\.psk:1:.*hex/.test(e.message));
      assert.throws(() => parsePskFile('alice:00\nalice:01\n', 'k.psk'), /k\.psk:2: "alice" appears twice/);
      assert.throws(() => parsePskFile('justakey\n', 'k.psk'), /k\.psk:1: expected username:hexkey/);
      assert.throws(() => parsePskFile('\n', 'k.psk'), /no username:hexkey line/);
    });

    test('a certificate directory without server-key.pem is named', () => {
      assert.throws(() => loadServerTls({ certificates: dir('client') }), /server certificate .*server-cert\.pem: ENOENT/);
    });
  });

  describe('pre-shared keys', () => {
    test('nbdinfo: TLS on, the export as without TLS', async () => {
      const w = JSON.parse((await runOk('nbdinfo', ['--json', '--no-content', pskUri(psk)])).stdout) as Record<string, unknown> & { exports: Record<string, unknown>[] };
      assert.equal(w.TLS, true);
      assert.equal(w.exports[0]!['export-size'], 8 * MiB);
      assert.match(psk.logs.join('\n'), /TLS TLSv1\.[23] \S+, PSK user "alice"/);
    });

    test('nbdcopy: 4 MiB up and back down, byte for byte', async () => {
      const data = randomBytes(4 * MiB, 7);
      writeFileSync(dir('up.raw'), data);
      await runOk('nbdcopy', [dir('up.raw'), pskUri(psk)]);
      assert.deepEqual(psk.disk.bytes.subarray(0, 4 * MiB), data);
      await runOk('nbdcopy', [pskUri(psk), dir('down.raw')]);
      assert.deepEqual(new Uint8Array(readFileSync(dir('down.raw'))).subarray(0, 4 * MiB), data);
    });

    test('qemu-io and qemu-img with tls-creds-psk', async () => {
      await runOk('qemu-io', ['--object', qemuPsk(pskFile), '--image-opts', qemuImage(psk), '-c', 'write -P 0x5a 1M 512k', '-c', 'read -P 0x5a 1M 512k']);
      assert.ok(psk.disk.bytes.subarray(MiB, MiB + 512 * 1024).every((b) => b === 0x5a));
      const info = (await runOk('qemu-img', ['info', '--output=json', '--object', qemuPsk(pskFile), '--image-opts', qemuImage(psk)])).stdout;
      assert.equal((JSON.parse(info) as { 'virtual-size': number })['virtual-size'], 8 * MiB);
    });

    test('TLS 1.2 with a PSK suite, for peers without TLS 1.3', async () => {
      const keys = parsePskFile(readFileSync(pskFile, 'utf8'));
      const raw = await RawClient.connect(psk.addr);
      await raw.handshake();
      const [ack] = await raw.option(NBD_OPT_STARTTLS);
      assert.equal(ack!.replyType, NBD_REP_ACK);
      raw.socket.removeAllListeners('data');
      const s = tlsConnect({
        socket: raw.socket, maxVersion: 'TLSv1.2', ciphers: 'PSK-AES256-GCM-SHA384',
        pskCallback: () => ({ psk: keys.get('alice')!, identity: 'alice' }), checkServerIdentity: () => undefined,
      });
      await new Promise<void>((resolve, reject) => { s.once('secureConnect', resolve); s.once('error', reject); });
      assert.equal(s.getProtocol(), 'TLSv1.2');
      assert.equal(s.getCipher().name, 'PSK-AES256-GCM-SHA384');
      s.write(encodeOption(NBD_OPT_ABORT));
      const reply = await new Promise<Buffer>((resolve) => s.once('data', resolve));
      assert.equal(reply.readUInt32BE(12), NBD_REP_ACK);
      s.destroy();
    });

    test('a wrong key and an unknown user get no export', async () => {
      const before = psk.disk.calls.length;
      for (const uri of [pskUri(psk, wrongPskFile), pskUri(psk, strangerPskFile, 'mallory')]) {
        const r = await run('nbdinfo', ['--json', uri]);
        assert.notEqual(r.code, 0, `${uri} connected`);
      }
      const wrongKey = join(dir('wrong-psk'), 'keys.psk');
      const q = await run('qemu-img', ['info', '--object', qemuPsk(wrongKey), '--image-opts', qemuImage(psk)]);
      assert.notEqual(q.code, 0);
      assert.match(q.stderr, /TLS|handshake/i);
      assert.equal(psk.disk.calls.length, before, 'the disk was not touched');
      await until(() => psk.logs.filter((l) => /^warn .*TLS handshake with .* failed/.test(l)).length >= 3, 5000, 'three handshake failures logged');
    });
  });

  describe('X.509', () => {
    test('nbdinfo, nbdcopy and qemu-io with certificates from the test CA, client verified', async () => {
      const w = JSON.parse((await runOk('nbdinfo', ['--json', '--no-content', x509Uri(x509)])).stdout) as { TLS: boolean };
      assert.equal(w.TLS, true);
      assert.match(x509.logs.join('\n'), /client test client/);
      const data = randomBytes(2 * MiB, 9);
      writeFileSync(dir('x.raw'), data);
      await runOk('nbdcopy', [dir('x.raw'), x509Uri(x509)]);
      assert.deepEqual(x509.disk.bytes.subarray(0, 2 * MiB), data);
      const creds = `tls-creds-x509,id=tls0,endpoint=client,dir=${dir('client')}`;
      await runOk('qemu-io', ['--object', creds, '--image-opts', qemuImage(x509, 'localhost'), '-c', 'read -P 0 4M 1M', '-c', 'write -P 0x33 4M 64k']);
      assert.ok(x509.disk.bytes.subarray(4 * MiB, 4 * MiB + 65536).every((b) => b === 0x33));
      const info = await runOk('qemu-img', ['info', '--object', creds, '--image-opts', qemuImage(x509, 'localhost')]);
      assert.match(info.stdout, /virtual size: 8 MiB/);
    });

    test('a client certificate from another CA gets no export, nor does a client that trusts another CA', async () => {
      const before = x509.disk.calls.length;
      const failures = () => x509.logs.filter((l) => /TLS handshake with .* failed/.test(l)).length;
      const intruder = await run('nbdinfo', ['--json', x509Uri(x509, dir('intruder'))]);
      assert.notEqual(intruder.code, 0);
      await until(() => failures() === 1, 5000, 'the server refusing the intruder');
      const misled = await run('nbdinfo', ['--json', x509Uri(x509, dir('misled'))]);
      assert.notEqual(misled.code, 0);
      assert.match(misled.stderr, /certificate|verif/i);
      const creds = `tls-creds-x509,id=tls0,endpoint=client,dir=${dir('intruder')}`;
      const q = await run('qemu-img', ['info', '--object', creds, '--image-opts', qemuImage(x509, 'localhost')]);
      assert.notEqual(q.code, 0);
      assert.equal(x509.disk.calls.length, before);
    });
  });

  describe('plaintext', () => {
    test('under require: NBD_REP_ERR_TLS_REQD for every option, export names included; EXPORT_NAME hangs up', async () => {
      const r = await run('nbdinfo', ['--json', `nbd://127.0.0.1:${psk.addr.port}/disk`]);
      assert.notEqual(r.code, 0);
      const q = await run('qemu-img', ['info', `nbd://127.0.0.1:${psk.addr.port}/disk`]);
      assert.notEqual(q.code, 0);
      assert.match(q.stderr, /TLS/);
      const raw = await RawClient.connect(psk.addr);
      await raw.handshake();
      for (const [opt, data] of [[NBD_OPT_LIST, undefined], [NBD_OPT_GO, encodeInfoRequest({ name: 'disk', infos: [] })], [99, undefined]] as const) {
        const replies = await raw.option(opt, data);
        assert.deepEqual(replies.map((x) => x.replyType), [NBD_REP_ERR_TLS_REQD], `option ${opt}`);
      }
      raw.send(encodeOption(NBD_OPT_EXPORT_NAME, new TextEncoder().encode('disk')));
      await raw.closedByServer();
    });

    test('under on: plaintext and TLS clients are both served', async () => {
      const w = JSON.parse((await runOk('nbdinfo', ['--json', '--no-content', `nbd://127.0.0.1:${on.addr.port}/disk`])).stdout) as { TLS: boolean };
      assert.equal(w.TLS, false);
      const t = JSON.parse((await runOk('nbdinfo', ['--json', '--no-content', pskUri(on)])).stdout) as { TLS: boolean };
      assert.equal(t.TLS, true);
    });

    test('under on: structured replies agreed in the clear are forgotten once TLS is up', async () => {
      const keys = parsePskFile(readFileSync(pskFile, 'utf8'));
      const raw = await RawClient.connect(on.addr);
      await raw.handshake();
      const [sr] = await raw.option(NBD_OPT_STRUCTURED_REPLY);
      assert.equal(sr!.replyType, NBD_REP_ACK);
      await raw.option(NBD_OPT_STARTTLS);
      raw.socket.removeAllListeners('data');
      const s = tlsConnect({ socket: raw.socket, pskCallback: () => ({ psk: keys.get('alice')!, identity: 'alice' }), checkServerIdentity: () => undefined });
      await new Promise<void>((resolve, reject) => { s.once('secureConnect', resolve); s.once('error', reject); });
      const parser = new ServerParser();
      // The greeting went by in the clear; this parser starts past it.
      parser.push(encodeGreeting(0));
      parser.next();
      const got: ServerMessage[] = [];
      s.on('data', (d: Buffer) => {
        parser.push(d);
        for (let m = parser.next(); m; m = parser.next()) got.push(m);
      });
      s.write(encodeOption(NBD_OPT_GO, encodeInfoRequest({ name: 'disk', infos: [] })));
      await until(() => got.some((m) => m.kind === 'optionReply' && m.replyType === NBD_REP_ACK), 5000, 'NBD_OPT_GO acknowledged');
      const info = got.map((m) => (m.kind === 'optionReply' && m.replyType === NBD_REP_INFO ? decodeInfo(m.data) : undefined)).find((i) => i !== undefined && 'transmissionFlags' in i);
      assert.ok(info !== undefined && 'transmissionFlags' in info);
      assert.equal(info.transmissionFlags & NBD_FLAG_SEND_DF, 0, 'no NBD_FLAG_SEND_DF: structured replies are off');
      s.destroy();
    });

    test('without TLS configured, STARTTLS gets NBD_REP_ERR_UNSUP', async () => {
      const plain = new NbdServer({ exports: [{ name: 'disk', device: new MemoryDevice(MiB) }] });
      servers.push(plain);
      const a = await plain.listen({ host: '127.0.0.1', port: 0 }) as { port: number };
      const raw = await RawClient.connect(a);
      await raw.handshake();
      const [r] = await raw.option(NBD_OPT_STARTTLS);
      assert.equal(r!.replyType, NBD_REP_ERR_UNSUP);
      raw.destroy();
    });
  });

  describe('hostile negotiation', () => {
    test('garbage before STARTTLS: that client is dropped', async () => {
      const h = await start(loadServerTls({ psk: pskFile }));
      const raw = await RawClient.connect(h.addr);
      await raw.handshake();
      raw.send(new TextEncoder().encode('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
      await raw.closedByServer();
      assert.equal(h.server.stats().protocolErrors, 1);
    });

    test('bytes after STARTTLS, before its reply: dropped without an answer in the clear', async () => {
      const h = await start(loadServerTls({ psk: pskFile }));
      const raw = await RawClient.connect(h.addr);
      await raw.handshake();
      // STARTTLS and a plaintext NBD_OPT_GO in one write: an attacker's injection.
      raw.send(Buffer.concat([encodeOption(NBD_OPT_STARTTLS), encodeOption(NBD_OPT_GO, encodeInfoRequest({ name: 'disk', infos: [] }))]));
      await raw.closedByServer();
      assert.equal(await raw.recv(), undefined, 'no reply at all');
      assert.match(h.logs.join('\n'), /bytes sent after NBD_OPT_STARTTLS before its reply/);
    });

    test('garbage instead of a ClientHello after the ACK: handshake fails, the client is dropped', async () => {
      const h = await start(loadServerTls({ psk: pskFile }));
      const raw = await RawClient.connect(h.addr);
      await raw.handshake();
      const [ack] = await raw.option(NBD_OPT_STARTTLS);
      assert.equal(ack!.replyType, NBD_REP_ACK);
      raw.send(encodeOption(NBD_OPT_LIST));
      await raw.closedByServer();
      await until(() => h.logs.some((l) => /TLS handshake with .* failed/.test(l)), 5000, 'the failure logged');
      assert.equal(h.server.stats().connections.active, 0);
    });

    test('a handshake stopped halfway is cut after the TLS timeout; other clients are served meanwhile', async () => {
      const h = await start(loadServerTls({ psk: pskFile }), 'require', { tlsHandshakeTimeoutMs: 1500 });
      const raw = await RawClient.connect(h.addr);
      await raw.handshake();
      const [ack] = await raw.option(NBD_OPT_STARTTLS);
      assert.equal(ack!.replyType, NBD_REP_ACK);
      // The first 40 bytes of a real ClientHello, then silence.
      raw.send(Buffer.from('16030100c4010000c00303' + '00'.repeat(29), 'hex'));
      const w = JSON.parse((await runOk('nbdinfo', ['--json', '--no-content', pskUri(h)])).stdout) as { TLS: boolean };
      assert.equal(w.TLS, true, 'served while another client hangs in its handshake');
      await raw.closedByServer(10_000);
      assert.match(h.logs.join('\n'), /TLS handshake with .* not finished after 1500 ms/);
    });

    test('garbage after TLS is up is a protocol error inside the session; STARTTLS again is refused', async () => {
      const h = await start(loadServerTls({ psk: pskFile }));
      const keys = parsePskFile(readFileSync(pskFile, 'utf8'));
      const raw = await RawClient.connect(h.addr);
      await raw.handshake();
      await raw.option(NBD_OPT_STARTTLS);
      raw.socket.removeAllListeners('data');
      const s = tlsConnect({ socket: raw.socket, pskCallback: () => ({ psk: keys.get('alice')!, identity: 'alice' }), checkServerIdentity: () => undefined });
      await new Promise<void>((resolve, reject) => { s.once('secureConnect', resolve); s.once('error', reject); });
      const replies: Buffer[] = [];
      s.on('data', (d: Buffer) => replies.push(d));
      s.write(encodeOption(NBD_OPT_STARTTLS));
      await until(() => Buffer.concat(replies).length >= 20, 5000, 'the reply');
      assert.equal(Buffer.concat(replies).readUInt32BE(12), NBD_REP_ERR_INVALID);
      const closed = new Promise<void>((r) => s.once('close', () => r()));
      s.write(Buffer.from('not an option header, just noise'));
      await closed;
      assert.equal(h.server.stats().protocolErrors, 1);
    });

    test('an option flood is cut at maxOptions; a client at the same time is served', async () => {
      const h = await start(loadServerTls({ psk: pskFile }), 'require', { maxOptions: 32 });
      const raw = await RawClient.connect(h.addr);
      await raw.handshake();
      const one = encodeOption(NBD_OPT_LIST);
      const flood = Buffer.concat(Array.from({ length: 5000 }, () => one));
      raw.send(flood);
      const w = JSON.parse((await runOk('nbdinfo', ['--json', '--no-content', pskUri(h)])).stdout) as { TLS: boolean };
      assert.equal(w.TLS, true);
      await raw.closedByServer();
      const replies: number[] = [];
      for (let m = await raw.recv(); m !== undefined; m = await raw.recv()) if (m.kind === 'optionReply') replies.push(m.replyType);
      assert.deepEqual(replies, [...Array.from({ length: 32 }, () => NBD_REP_ERR_TLS_REQD), NBD_REP_ERR_POLICY], 'each option up to the limit answered, then one refusal, nothing after');
      assert.match(h.logs.join('\n'), /more than 32 options without choosing an export/);
    });
  });
});
