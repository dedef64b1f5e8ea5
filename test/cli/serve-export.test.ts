/**
 * `blkif serve` as a qemu-nbd user expects it: exports named and described per image
 * (-x/--export-name, -D/--description), the ready line naming the default export, and bad
 * names refused in one line; copies into it (qemu-img convert, nbdcopy) as sparse as their source.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { openSync, readFileSync, statSync, writeSync, closeSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { sparseImage, tempDir } from '../e2e/helpers.js';
import { execFileP, serve, MAIN } from './serve-support.js';
import { needTools } from '../support/tools.js';

needTools('qemu-img', 'qemu-io', 'nbdinfo', 'nbdcopy');

const tmp = tempDir('blkif-serve-export-');
after(() => tmp.cleanup());

const MiB = 1024 * 1024;

test('-x and -D name and describe each image in order; nbdinfo --list shows them; ready names the default', async () => {
  const a = join(tmp.dir, 'a.img');
  const b = join(tmp.dir, 'b.img');
  sparseImage(a, 16 * MiB);
  sparseImage(b, 8 * MiB);
  const s = await serve([a, b, '--port', '0', '-x', 'sys', '-D', 'system disk', '--export-name', 'data']);
  try {
    assert.match(s.readyUri, /^nbd:\/\/127\.0\.0\.1:\d+\/sys$/);
    const list = JSON.parse((await execFileP('nbdinfo', ['--list', '--json', s.uri])).stdout) as { exports: { 'export-name': string; description?: string; 'export-size': number }[] };
    const byName = new Map(list.exports.map((e) => [e['export-name'], e]));
    assert.deepEqual([...byName.keys()].sort(), ['data', 'sys']);
    assert.equal(byName.get('sys')!.description, 'system disk');
    assert.equal(byName.get('sys')!['export-size'], 16 * MiB);
    assert.match(byName.get('data')!.description ?? '', /^Xen PV disk xvdb of guest \d+ /, 'no -D for the second: what the disk is');
    const info = JSON.parse((await execFileP('qemu-img', ['info', '--output=json', `${s.uri}data`])).stdout) as { 'virtual-size': number };
    assert.equal(info['virtual-size'], 8 * MiB);
    const dflt = JSON.parse((await execFileP('qemu-img', ['info', '--output=json', s.readyUri])).stdout) as { 'virtual-size': number };
    assert.equal(dflt['virtual-size'], 16 * MiB);
    const flags = JSON.parse((await execFileP('nbdinfo', ['--json', s.readyUri])).stdout) as { exports: Record<string, unknown>[] };
    assert.equal(flags.exports[0]!['can_fast_zero'], true, 'NBD_FLAG_SEND_FAST_ZERO');
    assert.equal(flags.exports[0]!['can_zero'], true);
  } finally {
    assert.equal(await s.stop(), 0);
  }
});

test('bad names and limits: one clear line, exit 2', async () => {
  const image = join(tmp.dir, 'c.img');
  sparseImage(image, MiB);
  const cases: [string[], RegExp][] = [
    [[image, '-x', 'a', '-x', 'b'], /2 --export-name for 1 image/],
    [[image, image.replace('c.img', 'd.img'), '--size', '1M', '-x', 'vbd1'], /two exports named "vbd1"/],
    [[image, '-x', ''], /cannot be empty/],
    [[image, '-D', 'x'.repeat(4097)], /at most 4096 bytes/],
    [[image, '--shared', '-1'], /--shared must be an integer/],
    [[image, '--handshake-limit', 'soon'], /--handshake-limit must be an integer/],
  ];
  for (const [args, msg] of cases) {
    const r = await execFileP(process.execPath, [MAIN, 'serve', ...args, '--port', '0']).then(
      () => ({ code: 0, stderr: '' }),
      (e: { code: number; stderr: string }) => ({ code: e.code, stderr: e.stderr }),
    );
    assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, msg);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  }
});

/** Bytes the file really holds (du), from its allocated blocks. */
const allocated = (path: string) => statSync(path).blocks * 512;

test('qemu-img convert and nbdcopy into serve leave the image as sparse as the source, even over old data', async () => {
  const src = join(tmp.dir, 'sparse-src.img');
  sparseImage(src, 32 * MiB);
  const fd = openSync(src, 'r+');
  for (const at of [0, 10, 31]) writeSync(fd, randomBytes(MiB), 0, MiB, at * MiB);
  closeSync(fd);
  const srcBytes = readFileSync(src);
  for (const [tool, copy] of [
    ['qemu-img convert', (uri: string) => execFileP('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, uri])],
    ['nbdcopy', (uri: string) => execFileP('nbdcopy', [src, uri])],
  ] as const) {
    // The target holds old data everywhere: every zero of the source must be made, and sparse.
    const dst = join(tmp.dir, `sparse-dst-${tool.split(' ')[0]}.img`);
    writeFileSync(dst, Buffer.alloc(32 * MiB, 0xaa));
    assert.ok(allocated(dst) >= 32 * MiB);
    const s = await serve([dst, '--port', '0']);
    try {
      await copy(s.readyUri);
    } finally {
      assert.equal(await s.stop(), 0);
    }
    assert.ok(readFileSync(dst).equals(srcBytes), `${tool}: the copy is byte-identical`);
    assert.ok(allocated(dst) <= allocated(src) + MiB, `${tool}: ${allocated(dst)} bytes allocated, the source ${allocated(src)}`);
  }
});

test('block status through serve: a range zeroed by discard is a hole until data is written over it; qemu-img map agrees', async () => {
  const image = join(tmp.dir, 'map.img');
  sparseImage(image, 16 * MiB);
  const s = await serve([image, '--port', '0']);
  try {
    const uri = s.readyUri;
    await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 7 0 16M', '-c', 'write -z -u 4M 8M', '-c', 'write -P 9 6M 1M', '-c', 'discard 10M 1M', uri]);
    const m = (await execFileP('nbdinfo', ['--map', uri])).stdout;
    const rows = m.trim().split('\n').map((l) => l.trim().split(/\s+/)).map(([o, l, t]) => [Number(o), Number(l), Number(t)]);
    const at = (o: number) => rows.find(([s0, l]) => s0! <= o && o < s0! + l!)![2];
    assert.equal(at(0), 0, m);
    assert.equal(at(4 * MiB), 3, `zeroed by discard: hole and zero\n${m}`);
    assert.equal(at(6 * MiB), 0, `written over the hole: data, never a hole\n${m}`);
    assert.equal(at(7 * MiB), 3, m);
    assert.equal(at(10 * MiB), 0, `trimmed: unknown, so data\n${m}`);
    assert.equal(at(12 * MiB), 0, m);
    const map = JSON.parse((await execFileP('qemu-img', ['map', '--output=json', '-f', 'raw', uri])).stdout) as { start: number; length: number; zero: boolean; data: boolean }[];
    const q = (o: number) => map.find((e) => e.start <= o && o < e.start + e.length)!;
    assert.deepEqual([q(4 * MiB).zero, q(4 * MiB).data], [true, false]);
    assert.deepEqual([q(6 * MiB).zero, q(6 * MiB).data], [false, true]);
  } finally {
    assert.equal(await s.stop(), 0);
  }
});
