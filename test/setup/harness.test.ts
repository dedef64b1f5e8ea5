/**
 * The test harness itself: a missing Debian tool fails with one line naming its package, the
 * pre-test installer names what it would install, a child started by a failing test does not
 * outlive its file, and a file that hangs is ended by its time limit.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DEBIAN_PACKAGES, MissingTool, have, requireTools } from '../support/tools.js';
import { track } from '../support/children.js';

const INSTALL = fileURLToPath(new URL('../../../test/setup/install.sh', import.meta.url));
const FILE_TIMEOUT = fileURLToPath(new URL('./file-timeout.js', import.meta.url));
const fixture = (name: string) => fileURLToPath(new URL(`./fixtures/${name}.js`, import.meta.url));
// A test runner of its own: without the variable that tells `node --test` it runs under another.
const { NODE_TEST_CONTEXT: _nested, ...ENV } = process.env;
const tmp = mkdtempSync(join(tmpdir(), 'blkif-harness-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

interface Exit { code: number | null; stdout: string; stderr: string }
function run(cmd: string, args: string[], env: NodeJS.ProcessEnv, timeoutMs = 60_000): Promise<Exit> {
  return new Promise((resolve) => {
    const child = track(execFile(cmd, args, { env, timeout: timeoutMs, encoding: 'utf8' }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : null) : 0, stdout, stderr });
    }));
    void child;
  });
}

/** Whether `pid` runs (a zombie waiting for a reaper does not). */
function alive(pid: number): boolean {
  try {
    return !/^State:\s+Z/m.test(readFileSync(`/proc/${pid}/status`, 'utf8'));
  } catch {
    return false;
  }
}

test('every Debian package the tests need is named, once per need', () => {
  for (const pkg of ['libxen-dev', 'gcc-multilib', 'qemu-user', 'xenstore-utils', 'qemu-utils', 'libnbd-bin', 'fio', 'nbdkit']) {
    assert.ok([...DEBIAN_PACKAGES.values()].includes(pkg), pkg);
  }
  assert.equal(DEBIAN_PACKAGES.get('qemu-io'), 'qemu-utils');
  assert.equal(DEBIAN_PACKAGES.get('nbdcopy'), 'libnbd-bin');
});

test('a missing tool fails with one line naming its Debian package', () => {
  const saved = process.env.PATH;
  process.env.PATH = join(tmp, 'empty');
  try {
    assert.equal(have('qemu-io'), false);
    assert.throws(() => requireTools('qemu-io', 'nbdinfo', 'fio'), (e: unknown) => {
      assert.ok(e instanceof MissingTool);
      assert.equal(e.message, 'qemu-io, nbdinfo, fio not installed: install Debian package qemu-utils libnbd-bin fio (npm test does it as root)');
      assert.doesNotMatch(String(e.stack), /\n/, 'one line, no stack');
      return true;
    });
  } finally {
    process.env.PATH = saved;
  }
  assert.equal(have('/no/such/file.h'), false);
  requireTools('sh', '/bin/sh');
});

test('the pre-test installer names the missing packages and the command to run', async () => {
  // An empty PATH: every command is missing; BLKIF_TEST_NO_INSTALL makes it report, not install.
  const r = await run('/bin/sh', [INSTALL], { PATH: join(tmp, 'empty'), BLKIF_TEST_NO_INSTALL: '1' });
  assert.equal(r.code, 1, r.stderr);
  const lines = r.stderr.trim().split('\n');
  assert.equal(lines.length, 1, r.stderr);
  assert.match(lines[0]!, /^the tests need Debian packages that are missing: .*qemu-utils.*; install them with: sudo apt-get install -y .*libnbd-bin/);
  assert.equal((lines[0]!.match(/qemu-utils/g) ?? []).length, 2, 'each package once in the list and once in the command');
  // With everything there, it says nothing and succeeds.
  const ok = await run('/bin/sh', [INSTALL], { PATH: process.env.PATH, BLKIF_TEST_NO_INSTALL: '1' });
  assert.deepEqual([ok.code, ok.stderr], [0, '']);
});

test('a child started by a failing test is ended with its file', async () => {
  const pidFile = join(tmp, 'child.pid');
  const r = await run(process.execPath, ['--test', '--test-force-exit', '--import', FILE_TIMEOUT, fixture('leaky-child')], { ...ENV, BLKIF_FIXTURE_PID_FILE: pidFile });
  assert.equal(r.code, 1, 'the fixture fails');
  assert.match(r.stdout, /failed on purpose/);
  const pid = Number(readFileSync(pidFile, 'utf8'));
  assert.ok(pid > 0);
  assert.equal(alive(pid), false, `the child ${pid} is gone`);
});

test('a test file that hangs is ended by its time limit, saying so', async () => {
  const r = await run(process.execPath, ['--test', '--test-force-exit', '--import', FILE_TIMEOUT, fixture('stuck')], { ...ENV, BLKIF_TEST_FILE_TIMEOUT: '2' });
  assert.notEqual(r.code, 0);
  assert.match(r.stdout + r.stderr, /still running after 2 s \(BLKIF_TEST_FILE_TIMEOUT\): ended/);
});
