/**
 * `blkif serve` against the tools people already use (Debian's qemu-utils, libnbd-bin, fio):
 * every byte they read or write goes through blkfront, grants, the ring and blkback in worker
 * domains; after a clean stop the image file holds exactly what they wrote. Indirect on and off.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, statSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { sparseImage, tempDir } from '../e2e/helpers.js';
import { execFileP, serve, MAIN } from './serve-support.js';
import { spawnTracked } from '../support/children.js';
import { eventually } from '../support/common.js';
import { needTools } from '../support/tools.js';

needTools('qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo', 'nbdcopy', 'fio', 'nbdkit');

const tmp = tempDir('blkif-serve-');
after(() => tmp.cleanup());

const MiB = 1024 * 1024;

for (const indirect of [256, 0]) {
  describe(`blkif serve, indirect ${indirect || 'off'}`, () => {
    const image = join(tmp.dir, `disk-${indirect}.img`);
    let s: Awaited<ReturnType<typeof serve>>;
    const expected = new Uint8Array(96 * MiB);
    before(async () => {
      sparseImage(image, expected.length);
      s = await serve([image, '--port', '0', '--max-indirect-segments', String(indirect)]);
    });
    after(async () => { await s?.stop('SIGKILL').catch(() => undefined); }); // static-check: allow cleanup: the test checks its own stop

    test('qemu-img info and nbdinfo see the disk', async () => {
      const { stdout } = await execFileP('qemu-img', ['info', '--output=json', s.uri]);
      assert.equal(JSON.parse(stdout)['virtual-size'], expected.length);
      const ni = JSON.parse((await execFileP('nbdinfo', ['--json', s.uri])).stdout);
      const e = ni.exports[0];
      assert.equal(e['export-size'], expected.length);
      assert.equal(e['is_read_only'], false);
      assert.equal(e['can_flush'], true);
      assert.equal(e['block_size_minimum'], 512);
      const list = (await execFileP('nbdinfo', ['--list', '--json', s.uri])).stdout;
      assert.match(list, /"export-name": "vbd0"/);
    });

    test('qemu-io writes and reads patterns at many offsets and sizes', async () => {
      const cmds: string[] = [];
      const cases: [number, number, number][] = [];
      let pattern = 1;
      for (const [off, len] of [[0, 512], [512, 4096], [8192, 65536], [MiB - 512, 1024], [3 * MiB, 4 * MiB], [80 * MiB, 11 * 4096], [81 * MiB, 45 * 4096], [90 * MiB, 3 * MiB + 512]] as const) {
        cmds.push('-c', `write -P ${pattern} ${off} ${len}`);
        cases.push([off, len, pattern++]);
      }
      for (const [off, len, p] of cases) cmds.push('-c', `read -P ${p} ${off} ${len}`);
      const { stdout } = await execFileP('qemu-io', ['-f', 'raw', ...cmds, s.uri]);
      assert.doesNotMatch(stdout, /Pattern verification failed|error/i);
      assert.equal((stdout.match(/^read /gm) ?? []).length, cases.length);
      for (const [off, len, p] of cases) expected.fill(p, off, off + len);
    });

    test('nbdcopy of 64 MiB of random data in and back out is byte-identical', async () => {
      const src = join(tmp.dir, `random-${indirect}`);
      const back = join(tmp.dir, `back-${indirect}`);
      const data = randomBytes(64 * MiB);
      writeFileSync(src, data);
      await execFileP('nbdcopy', [src, s.uri]);
      expected.set(data, 0);
      await execFileP('nbdcopy', [s.uri, back]);
      const got = readFileSync(back);
      assert.equal(got.length, expected.length);
      assert.equal(Buffer.compare(got.subarray(0, data.length), data), 0, 'what came out is what went in');
      assert.equal(Buffer.compare(got, Buffer.from(expected)), 0, 'and the rest is as written before');
    });

    test('fio with verify=crc32c: 4 KiB random and 1 MiB sequential', async () => {
      for (const [rw, bs, depth] of [['randwrite', '4k', 32], ['write', '1m', 8]] as const) {
        const { stdout } = await execFileP('fio', [
          '--name=verify', '--ioengine=nbd', `--uri=${s.uri}`, `--rw=${rw}`, `--bs=${bs}`, `--iodepth=${depth}`,
          '--offset=64m', '--size=16m', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json',
        ], { maxBuffer: 16 << 20, cwd: tmp.dir });
        const job = JSON.parse(stdout.slice(stdout.indexOf('{'))).jobs[0];
        assert.equal(job.error, 0, `fio ${rw} ${bs}: error ${job.error}`);
        assert.ok(job.write.io_bytes >= 16 * MiB && job.read.io_bytes >= 16 * MiB, `fio ${rw} ${bs} wrote and verified`);
      }
      // fio wrote its own patterns there: take them from the disk for the final comparison.
      const out = join(tmp.dir, `fio-${indirect}`);
      await execFileP('nbdcopy', [s.uri, out]);
      expected.set(readFileSync(out).subarray(64 * MiB, 80 * MiB), 64 * MiB);
    });

    test('a clean stop exits 0 and the image holds exactly what the clients wrote', async () => {
      assert.equal(await s.stop('SIGTERM'), 0, s.stderr());
      assert.match(s.stderr(), /flushed and closed/);
      assert.match(s.stderr(), /checked hypervisor/, 'under node --test, serve runs the hypervisor checked too');
      const img = readFileSync(image);
      assert.equal(img.length, expected.length);
      assert.equal(Buffer.compare(img, Buffer.from(expected)), 0);
    });
  });
}

test('serve with no image creates a 1 GiB sparse default in the data dir and reuses it', async () => {
  const data = join(tmp.dir, 'xdg');
  const s = await serve(['--port', '0'], { XDG_DATA_HOME: data });
  try {
    const img = join(data, 'blkif', 'vbd0.img');
    assert.ok(existsSync(img));
    assert.equal(statSync(img).size, 1024 ** 3);
    assert.ok(statSync(img).blocks * 512 < 16 * MiB, 'sparse');
    assert.match(s.stderr(), /created .*vbd0\.img/);
    await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 7 0 4k', s.uri]);
  } finally {
    assert.equal(await s.stop(), 0);
  }
  const again = await serve(['--port', '0'], { XDG_DATA_HOME: data });
  try {
    assert.match(again.stderr(), /using .*vbd0\.img/);
    const { stdout } = await execFileP('qemu-io', ['-f', 'raw', '-c', 'read -P 7 0 4k', again.uri]);
    assert.doesNotMatch(stdout, /fail/i);
  } finally {
    assert.equal(await again.stop(), 0);
  }
});

test('a read-only export refuses writes; a Unix socket works', async () => {
  const image = join(tmp.dir, 'ro.img');
  sparseImage(image, 8 * MiB);
  const sock = join(tmp.dir, 'nbd.sock');
  const s = await serve([image, '--readonly', '--socket', sock]);
  try {
    assert.match(s.uri, /^nbd\+unix:\/\/\/\?socket=/);
    const ni = JSON.parse((await execFileP('nbdinfo', ['--json', s.uri])).stdout);
    assert.equal(ni.exports[0]['is_read_only'], true);
    await assert.rejects(execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', s.uri]), (e: { stderr?: string }) => /Could not open image: Permission denied/.test(String(e.stderr)));
  } finally {
    assert.equal(await s.stop(), 0);
  }
  assert.ok(readFileSync(image).every((b) => b === 0), 'never written');
});

test('--vbds 2 exports vbd0 and vbd1, disks xvda and xvdb of one guest', async () => {
  const data = join(tmp.dir, 'two');
  const s = await serve(['--port', '0', '--vbds', '2', '--size', '16M', '--data-dir', data]);
  try {
    const base = s.uri.replace(/\/$/, '');
    await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 64k', `${base}/vbd0`]);
    await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 2 0 64k', `${base}/vbd1`]);
    const r0 = await execFileP('qemu-io', ['-f', 'raw', '-c', 'read -P 1 0 64k', `${base}/vbd0`]);
    const r1 = await execFileP('qemu-io', ['-f', 'raw', '-c', 'read -P 2 0 64k', `${base}/vbd1`]);
    assert.doesNotMatch(r0.stdout + r1.stdout, /fail/i);
    const list = JSON.parse((await execFileP('nbdinfo', ['--list', '--json', s.uri])).stdout) as { exports: { 'export-name': string; description: string }[] };
    const guests = list.exports.map((e) => /^Xen PV disk (xvd[a-z]+) of guest (\d+) /.exec(e.description)?.slice(1));
    assert.deepEqual(guests.map((g) => g?.[0]), ['xvda', 'xvdb'], JSON.stringify(list.exports));
    assert.equal(guests[0]![1], guests[1]![1], 'both in the same guest');
  } finally {
    assert.equal(await s.stop(), 0);
  }
  assert.equal(readFileSync(join(data, 'vbd0.img'))[0], 1);
  assert.equal(readFileSync(join(data, 'vbd1.img'))[0], 2);
});

test('bad input: one clear line, exit 2', async () => {
  const cases: [string[], RegExp][] = [
    [['serve', '/nonexistent/x.img', '--port', '0'], /does not exist/],
    [['serve', '--max-indirect-segments', '7', '--port', '0'], /use 0 or more than 11/],
    [['serve', '--sector-size', '1000'], /1000/],
    [['serve', '--size', '12Q', '--port', '0'], /--size/],
  ];
  for (const [args, msg] of cases) {
    const r = await execFileP(process.execPath, [MAIN, ...args], { env: { ...process.env, XDG_DATA_HOME: join(tmp.dir, 'bad') } }).then(
      () => ({ code: 0, stderr: '' }),
      (e: { code: number; stderr: string }) => ({ code: e.code, stderr: e.stderr }),
    );
    assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, msg);
  }
  const image = join(tmp.dir, 'small.img');
  sparseImage(image, MiB);
  const r = await execFileP(process.execPath, [MAIN, 'serve', image, '--size', '512k', '--port', '0']).catch((e: { code: number; stderr: string }) => e);
  assert.equal((r as { code: number }).code, 2);
  assert.match((r as { stderr: string }).stderr, /refusing to shrink/);
});

test('protocol knobs: 2 queues in threads, ring order 2, grant copy, no persistent grants, 4 KiB sectors, metrics', async () => {
  const image = join(tmp.dir, 'knobs.img');
  sparseImage(image, 32 * MiB);
  const s = await serve([image, '--port', '0', '--queues', '2', '--queue-threads', '--ring-page-order', '2', '--grant-copy', '--no-persistent', '--sector-size', '4096', '--metrics', '0', '--json']);
  try {
    const ni = JSON.parse((await execFileP('nbdinfo', ['--json', s.uri])).stdout);
    assert.equal(ni.exports[0]['block_size_minimum'], 4096);
    const { stdout } = await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 9 0 4M', '-c', 'read -P 9 0 4M', s.uri]);
    assert.doesNotMatch(stdout, /fail/i);
    assert.match(s.stderr(), /"msg":"ready"/, 'structured logs');
    assert.match(s.stderr(), /2 queue\(s\) in threads of their own.*grant copy/);
    const port = /metrics at http:\/\/127\.0\.0\.1:(\d+)\/metrics/.exec(s.stderr())?.[1];
    assert.ok(port !== undefined, s.stderr());
    const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    assert.match(text, /blkif_vbd_wr_req_total\{vbd="vbd0"\} [1-9]/);
    assert.match(text, /blkif_vbd_grant_copy_ops_total\{vbd="vbd0"\} [1-9]/);
  } finally {
    assert.equal(await s.stop(), 0);
  }
  assert.equal(readFileSync(image)[4 * MiB - 1], 9);
});

test('--migrate-every: the disk moves between driver domains while fio verifies its data', async () => {
  const image = join(tmp.dir, 'moving.img');
  sparseImage(image, 64 * MiB);
  const s = await serve([image, '--port', '0', '--migrate-every', '1']);
  try {
    const { stdout } = await execFileP('fio', [
      '--name=moving', '--ioengine=nbd', `--uri=${s.uri}`, '--rw=randwrite', '--bs=16k', '--iodepth=16',
      '--size=16m', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json', '--loops=2',
    ], { maxBuffer: 16 << 20, cwd: tmp.dir });
    const job = JSON.parse(stdout.slice(stdout.indexOf('{'))).jobs[0];
    assert.equal(job.error, 0);
    process.kill(s.proc.pid!, 'SIGUSR2');
    await eventually(() => (s.stderr().match(/migrated vbd0/g) ?? []).length >= 2, 'a second migration, on SIGUSR2', 60_000, 50)
      .catch((e: Error) => { throw new Error(`${e.message}\n${s.stderr()}`); });
    assert.match(s.stderr(), /migrated vbd0: driver domain \d+ -> \d+: /);
  } finally {
    assert.equal(await s.stop(), 0, s.stderr());
  }
});

test('durability: data flushed before a SIGKILL of the whole server is in the image', async () => {
  const image = join(tmp.dir, 'durable.img');
  sparseImage(image, 8 * MiB);
  const s = await serve([image, '--port', '0']);
  try {
    // qemu-io flushes before it reports success and exits.
    await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 1M 2M', '-c', 'flush', s.uri]);
  } finally {
    assert.equal(await s.stop('SIGKILL'), null);
  }
  const img = readFileSync(image);
  assert.ok(img.subarray(MiB, 3 * MiB).every((b) => b === 0x42), 'the flushed write survived');
});

test('remote storage: serve a qcow2 image behind qemu-nbd and an nbdkit memory disk, one VBD each', async () => {
  const qcow = join(tmp.dir, 'remote.qcow2');
  await execFileP('qemu-img', ['create', '-f', 'qcow2', qcow, '32M']);
  const sock = join(tmp.dir, 'qemu-nbd.sock');
  const qemu = spawnTracked('qemu-nbd', ['-f', 'qcow2', '-k', sock, '-t', '-x', 'disk', qcow], { stdio: 'ignore' });
  const kitSock = join(tmp.dir, 'nbdkit.sock');
  const kit = spawnTracked('nbdkit', ['-f', '-U', kitSock, 'memory', '16M'], { stdio: 'ignore' });
  try {
    await eventually(() => existsSync(sock) && existsSync(kitSock), 'the qemu-nbd and nbdkit sockets', 30_000, 20);
    const s = await serve([`nbd+unix:///disk?socket=${sock}`, `nbd+unix:///?socket=${kitSock}`, '--port', '0']);
    try {
      const base = s.uri.replace(/\/$/, '');
      const ni = JSON.parse((await execFileP('nbdinfo', ['--json', `${base}/vbd0`])).stdout);
      assert.equal(ni.exports[0]['export-size'], 32 * MiB);
      await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 0x31 1M 2M', `${base}/vbd0`]);
      await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 0x32 0 1M', `${base}/vbd1`]);
      const r0 = await execFileP('qemu-io', ['-f', 'raw', '-c', 'read -P 0x31 1M 2M', `${base}/vbd0`]);
      const r1 = await execFileP('qemu-io', ['-f', 'raw', '-c', 'read -P 0x32 0 1M', `${base}/vbd1`]);
      assert.doesNotMatch(r0.stdout + r1.stdout, /fail/i);
    } finally {
      assert.equal(await s.stop(), 0, s.stderr());
    }
    // Straight from the remote server: the data went all the way through.
    const direct = await execFileP('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x31 1M 2M', `nbd+unix:///disk?socket=${sock}`]);
    assert.doesNotMatch(direct.stdout, /fail/i);
  } finally {
    qemu.kill('SIGKILL');
    kit.kill('SIGKILL');
  }
});
