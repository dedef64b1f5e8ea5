/**
 * `blkif serve` as a service beyond loopback, run as a user would and reached with the real
 * clients, everything bound to loopback: --tls=require with a PSK on ::1 (the README's
 * commands), VBDs whose storage is nbdkit --tls=require (PSK and X.509) through our client,
 * systemd socket activation from a launcher that passes an inherited socket, --pid-file,
 * --exit-with-parent, and the usage errors of the TLS options.
 */
import { after, afterEach, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { MAIN, execFileP, serve, type Served } from './serve-support.js';
import { makeCa, makeCert, pskLine, writePskFile } from '../nbd/tls-support.js';
import { randomBytes, tempDir, until } from '../nbd/support.js';
import { ServerProcess, freePort } from '../storage/nbd-support.js';
import { requireLocalhost, requireTools } from '../support/tools.js';

const MiB = 1024 * 1024;
const tmp = tempDir('serve-tls-');
const dir = (name: string) => join(tmp.dir, name);
let pskFile: string;
const running: Served[] = [];
const kits: ServerProcess[] = [];
const children: ChildProcess[] = [];
const pids: number[] = [];

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

before(() => {
  requireTools('nbdinfo', 'nbdcopy', 'qemu-io', 'qemu-img', 'nbdkit', 'openssl');
  requireLocalhost();
  pskFile = writePskFile(tmp.dir, [pskLine('alice')]);
  makeCa(dir('ca'), 'test CA');
  makeCert(dir('ca'), dir('server'), 'server', 'localhost');
  makeCert(dir('ca'), dir('client'), 'client', 'blkif');
  makeCa(dir('other-ca'), 'another CA');
  makeCert(dir('other-ca'), dir('intruder'), 'client', 'intruder');
  // The intruder trusts our CA (so it trusts the server) and its own (qemu checks its own
  // certificate against ca-cert.pem before connecting): only the server's check can stop it.
  writeFileSync(join(dir('intruder'), 'ca-cert.pem'), Buffer.concat([readFileSync(join(dir('ca'), 'ca-cert.pem')), readFileSync(join(dir('other-ca'), 'ca-cert.pem'))]));
});

afterEach(async () => {
  // static-check: allow cleanup: the tests check their own stops; this one ends what a failed test left
  await Promise.all(running.splice(0).map((s) => s.stop('SIGKILL').catch(() => undefined)));
  await Promise.all(kits.splice(0).map((k) => k.kill()));
  for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  for (const p of pids.splice(0)) if (alive(p)) process.kill(p, 'SIGKILL');
});

after(() => tmp.cleanup());

/** `run` (a client) fails, and for the reason `why`, read in what it printed. */
async function refused(run: Promise<unknown>, why: RegExp): Promise<void> {
  await assert.rejects(run, (e: { stderr?: string }) => {
    assert.match(String(e.stderr), why);
    return true;
  });
}

async function started(args: string[], env: NodeJS.ProcessEnv = {}): Promise<Served> {
  const s = await serve(args, env);
  running.push(s);
  return s;
}

describe('blkif serve beyond loopback', { timeout: 240_000 }, () => {
  test('--tls=require --tls-psk=keys.psk --bind ::1: nbds:// URI; nbdinfo, nbdcopy, qemu-io with the key; plaintext refused; SIGTERM stops cleanly', async () => {
    const image = dir('psk.img');
    const pidFile = dir('serve.pid');
    const s = await started([image, '--size', '32M', '--tls=require', `--tls-psk=${pskFile}`, '--bind', '::1', '--port', '0', '--pid-file', pidFile]);
    const m = /^nbds:\/\/alice@\[::1\]:(\d+)\/\?tls-psk-file=(.+)$/.exec(s.uri);
    assert.ok(m !== null, s.uri);
    assert.equal(m[2], pskFile);
    const port = m[1]!;
    assert.equal(readFileSync(pidFile, 'utf8'), `${s.proc.pid}\n`);
    assert.doesNotMatch(s.stderr(), /warning/, 'TLS required on loopback: nothing to warn about');
    // As the README says it: the key file named relative to the client's directory.
    const info = await execFileP('nbdinfo', ['--json', `nbds://alice@[::1]:${port}/?tls-psk-file=keys.psk`], { cwd: tmp.dir });
    const j = JSON.parse(info.stdout) as { TLS: boolean; exports: { 'export-size': number }[] };
    assert.equal(j.TLS, true);
    assert.equal(j.exports[0]!['export-size'], 32 * MiB);
    const data = randomBytes(3 * MiB, 5);
    writeFileSync(dir('in.raw'), data);
    await execFileP('nbdcopy', [dir('in.raw'), s.uri]);
    await execFileP('qemu-io', ['--object', `tls-creds-psk,id=tls0,endpoint=client,dir=${tmp.dir},username=alice`, '--image-opts',
      `driver=nbd,host=::1,port=${port},tls-creds=tls0`, '-c', 'write -P 0xc3 4M 1M', '-c', 'read -P 0xc3 4M 1M']);
    // Plaintext refused (NBD_REP_ERR_TLS_REQD, which libnbd reports as unsupported), not merely unreachable.
    await refused(execFileP('nbdinfo', [`nbd://[::1]:${port}/`]), /opt_go request: Operation not supported/);
    assert.equal(await s.stop(), 0);
    assert.ok(!existsSync(pidFile), 'PID file removed on a clean stop');
    const img = readFileSync(image);
    assert.deepEqual(new Uint8Array(img.subarray(0, 3 * MiB)), data, 'nbdcopy\'s bytes are on disk after the stop');
    assert.ok(img.subarray(4 * MiB, 5 * MiB).every((b) => b === 0xc3), 'qemu-io\'s bytes are on disk');
    assert.match(s.stderr(), /PSK user "alice"/);
  });

  test('--tls=require --tls-certificates=DIR --tls-verify-peer: nbdinfo, nbdcopy and qemu-img with our CA\'s client certificate; another CA\'s refused', async () => {
    const image = dir('x509.img');
    const s = await started([image, '--size', '16M', '--tls=require', `--tls-certificates=${dir('server')}`, '--tls-verify-peer', '--port', '0']);
    const m = /^nbds:\/\/127\.0\.0\.1:(\d+)\/$/.exec(s.uri);
    assert.ok(m !== null, s.uri);
    const uri = (certs: string) => `nbds://localhost:${m[1]}/?tls-certificates=${certs}`;
    const j = JSON.parse((await execFileP('nbdinfo', ['--json', uri(dir('client'))])).stdout) as { TLS: boolean };
    assert.equal(j.TLS, true);
    const data = randomBytes(MiB, 8);
    writeFileSync(dir('x.raw'), data);
    await execFileP('nbdcopy', [dir('x.raw'), uri(dir('client'))]);
    const creds = (d: string) => `tls-creds-x509,id=tls0,endpoint=client,dir=${d}`;
    const image0 = `driver=nbd,host=localhost,port=${m[1]},tls-creds=tls0`;
    const info = await execFileP('qemu-img', ['info', '--object', creds(dir('client')), '--image-opts', image0]);
    assert.match(info.stdout, /virtual size: 16 MiB/);
    // Refused in the TLS handshake (the server's peer check), not for any other reason.
    await refused(execFileP('nbdinfo', [uri(dir('intruder'))]), /TLS fatal alert has been received/);
    await refused(execFileP('qemu-img', ['info', '--object', creds(dir('intruder')), '--image-opts', image0]), /Failed to read option reply: Cannot read from TLS channel/);
    assert.equal(await s.stop(), 0);
    assert.deepEqual(new Uint8Array(readFileSync(image).subarray(0, MiB)), data);
    assert.match(s.stderr(), /client blkif/);
    assert.match(s.stderr(), /TLS handshake with .* failed/);
  });

  test('VBDs on nbdkit --tls=require, PSK and X.509, through our client: data round trip', async () => {
    const [p1, p2] = [await freePort(), await freePort()];
    kits.push(await ServerProcess.nbdkit({ port: p1 }, ['--tls=require', `--tls-psk=${pskFile}`, 'memory', `${16 * MiB}`]));
    kits.push(await ServerProcess.nbdkit({ port: p2 }, ['--tls=require', `--tls-certificates=${dir('server')}`, '--tls-verify-peer', 'memory', `${16 * MiB}`]));
    const pskUri = `nbds://alice@127.0.0.1:${p1}/?tls-psk-file=${pskFile}`;
    const x509Uri = `nbds://localhost:${p2}/?tls-certificates=${dir('client')}`;
    const s = await started([pskUri, x509Uri, '--port', '0']);
    assert.match(s.uri, /^nbd:\/\/127\.0\.0\.1:\d+\/$/);
    const base = s.uri.replace(/\/$/, '');
    await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 1M 2M', `${base}/vbd0`]);
    await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 3M 1M', `${base}/vbd1`]);
    assert.equal(await s.stop(), 0);
    // Straight from nbdkit, past blkif: the bytes arrived.
    await execFileP('nbdcopy', [pskUri, dir('kit1.raw')]);
    await execFileP('nbdcopy', [x509Uri, dir('kit2.raw')]);
    const k1 = readFileSync(dir('kit1.raw'));
    const k2 = readFileSync(dir('kit2.raw'));
    assert.ok(k1.subarray(MiB, 3 * MiB).every((b) => b === 0x11));
    assert.ok(k1.subarray(0, MiB).every((b) => b === 0));
    assert.ok(k2.subarray(3 * MiB, 4 * MiB).every((b) => b === 0x22));
    assert.ok(k2.subarray(0, 3 * MiB).every((b) => b === 0));
  });

  test('socket activation: a launcher passes a listening socket as fd 3 with LISTEN_FDS/LISTEN_PID, as systemd does', async () => {
    const listener: Server = createServer();
    await new Promise<void>((r) => listener.listen(0, '127.0.0.1', () => r()));
    const { port } = listener.address() as { port: number };
    // The descriptor of our listening socket, handed down as the child's fd 3.
    const fd = (listener as unknown as { _handle: { fd: number } })._handle.fd;
    assert.ok(fd > 2);
    const image = dir('activated.img');
    const child = spawn('sh', ['-c', 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@"', process.execPath, MAIN, 'serve', image, '--size', '16M'],
      { stdio: ['ignore', 'pipe', 'pipe', fd] });
    children.push(child);
    listener.close();
    let out = '';
    let err = '';
    child.stdout!.on('data', (b: Buffer) => (out += b.toString()));
    child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
    await until(() => /^ready /m.test(out) || child.exitCode !== null, 30_000, `ready (${err})`);
    assert.match(out, new RegExp(`^ready nbd://127\\.0\\.0\\.1:${port}/vbd0$`, 'm'), err);
    const info = JSON.parse((await execFileP('nbdinfo', ['--json', `nbd://127.0.0.1:${port}/`])).stdout) as { exports: { 'export-size': number }[] };
    assert.equal(info.exports[0]!['export-size'], 16 * MiB);
    const exited = new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
    child.kill('SIGTERM');
    assert.equal(await exited, 0, err);
  });

  test('--exit-with-parent: the server stops cleanly when its parent dies', async () => {
    const pidFile = dir('orphan.pid');
    const image = dir('orphan.img');
    const parent = spawn('sh', ['-c', `"$0" "$@" >/dev/null 2>${dir('orphan.err')} & sleep 120`, process.execPath, MAIN, 'serve', image,
      '--size', '16M', '--port', '0', '--exit-with-parent', '--pid-file', pidFile], { stdio: 'ignore' });
    children.push(parent);
    await until(() => existsSync(pidFile), 30_000, 'the PID file');
    const pid = Number(readFileSync(pidFile, 'utf8'));
    pids.push(pid);
    assert.ok(alive(pid));
    parent.kill('SIGKILL');
    await until(() => !alive(pid), 30_000, 'the orphaned server to exit');
    const err = readFileSync(dir('orphan.err'), 'utf8');
    assert.match(err, /parent exited: stopping/);
    assert.match(err, /vbd0: flushed and closed/);
    assert.ok(!existsSync(pidFile));
  });

  test('--log FILE: JSON lines in the file, the ready URI among them', async () => {
    const logFile = dir('serve.log');
    const s = await started([dir('log.img'), '--size', '16M', '--port', '0', '--log', logFile]);
    assert.equal(await s.stop(), 0, `${s.stderr()}\n${readFileSync(logFile, 'utf8')}`);
    const lines = readFileSync(logFile, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { msg: string; uri?: string });
    assert.ok(lines.some((l) => l.msg === 'ready' && l.uri === s.readyUri), 'a ready line with the URI');
    assert.ok(lines.some((l) => l.msg === 'stopped'));
  });

  test('-r refuses writes, as --readonly (qemu-nbd and nbdkit spell it -r too)', async () => {
    const s = await started([dir('ro.img'), '--size', '16M', '--port', '0', '-r']);
    const j = JSON.parse((await execFileP('nbdinfo', ['--json', s.uri])).stdout) as { exports: { is_read_only: boolean }[] };
    assert.equal(j.exports[0]!.is_read_only, true);
    await refused(execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', s.uri]), /Could not open image: Permission denied/);
    assert.equal(await s.stop(), 0);
  });

  test('TLS usage errors: one line, exit 2', async () => {
    const image = dir('usage.img');
    const cases: [string[], RegExp][] = [
      [['--tls=require'], /--tls=require needs --tls-psk=FILE or --tls-certificates=DIR/],
      [[`--tls-psk=${pskFile}`], /need --tls=on or --tls=require/],
      [['--tls=on', `--tls-psk=${pskFile}`, `--tls-certificates=${dir('server')}`], /not both/],
      [['--tls=require', `--tls-psk=${dir('none.psk')}`], /cannot read PSK file .*none\.psk: ENOENT/],
      [['--tls=require', `--tls-certificates=${dir('client')}`], /server-cert\.pem: ENOENT/],
      [['--socket', dir('s.sock'), '--bind', '::1'], /--bind is for TCP/],
    ];
    writeFileSync(dir('bad.psk'), 'alice:xyz\n');
    cases.push([['--tls=require', `--tls-psk=${dir('bad.psk')}`], /bad\.psk:1: the key of "alice" is not an even number of hex digits/]);
    for (const [args, message] of cases) {
      const r = await execFileP(process.execPath, [MAIN, 'serve', image, '--size', '16M', '--port', '0', ...args]).then(
        () => assert.fail(`${args.join(' ')} started`),
        (e: { code: number; stderr: string }) => e,
      );
      assert.equal(r.code, 2, args.join(' '));
      assert.match(r.stderr, message);
      assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    }
  });
});
