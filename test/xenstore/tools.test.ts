// Xen's own command-line clients (Debian xenstore-utils, libxenstore) against our daemon.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { promisify } from 'node:util';
import { XenstoreClient } from '../../src/xenstore/index.js';
import { startSocketDaemon, type SocketDaemon } from './helpers.js';
import { track } from '../support/children.js';
import { needTools } from '../support/tools.js';

needTools('xenstore-read'); // xenstore-utils brings every xenstore-* tool used here

const run = promisify(execFile);
let d: SocketDaemon;
let env: NodeJS.ProcessEnv;

before(async () => {
  d = await startSocketDaemon();
  // libxenstore's xs_open() tries XENSTORED_PATH (else $XENSTORED_RUNDIR/socket) before /dev/xen/xenbus.
  env = { ...process.env, XENSTORED_PATH: d.socketPath, XENSTORED_RUNDIR: d.dir };
});
after(() => d.close());

const xs = (tool: string, ...args: string[]) => run(tool, args, { env, timeout: 5000 });

test('xenstore-write then xenstore-read', async () => {
  await xs('xenstore-write', '/vm/1/name', 'guest-one', '/vm/1/uuid', '1234');
  const { stdout } = await xs('xenstore-read', '/vm/1/name', '/vm/1/uuid');
  assert.equal(stdout, 'guest-one\n1234\n');
});

test('xenstore-read of a missing node fails', async () => {
  await assert.rejects(xs('xenstore-read', '/no/such/node'), (e: { code?: number; stderr?: string }) => {
    assert.equal(e.code, 1);
    assert.match(e.stderr ?? '', /couldn't read path \/no\/such\/node/);
    return true;
  });
});

test('xenstore-ls shows values and permissions (XS_DIRECTORY + XS_GET_PERMS)', async () => {
  await xs('xenstore-write', '/ls/a', 'x', '/ls/b/c', 'y');
  const { stdout } = await xs('xenstore-ls', '-f', '-p', '/ls');
  const lines = stdout.trim().split('\n').map((l) => l.replace(/\s*[. ]*\s*\(/, ' (').replace(/\s+/g, ' '));
  assert.deepEqual(lines, ['/ls/a = "x" (n0)', '/ls/b = "" (n0)', '/ls/b/c = "y" (n0)']);
  const list = await xs('xenstore-list', '/ls');
  assert.equal(list.stdout, 'a\nb\n');
});

test('xenstore-exists and xenstore-rm', async () => {
  await xs('xenstore-write', '/rm/x/y', '1');
  await xs('xenstore-exists', '/rm/x/y');
  await xs('xenstore-rm', '/rm/x');
  // Exit status 1: the node is gone (not a tool that failed to run).
  await assert.rejects(xs('xenstore-exists', '/rm/x/y'), (e: { code?: unknown }) => e.code === 1);
  const c = await XenstoreClient.connectSocket(d.socketPath);
  try {
    assert.deepEqual(await c.directory('/rm'), []);
  } finally {
    c.close();
  }
});

test('xenstore-chmod sets permissions seen by our client and by xenstore-ls', async () => {
  await xs('xenstore-write', '/perm/node', 'v');
  await xs('xenstore-chmod', '/perm/node', 'n0', 'r5', 'b7');
  const c = await XenstoreClient.connectSocket(d.socketPath);
  try {
    assert.deepEqual(await c.getPerms('/perm/node'), [
      { perm: 'n', domid: 0 },
      { perm: 'r', domid: 5 },
      { perm: 'b', domid: 7 },
    ]);
  } finally {
    c.close();
  }
  const { stdout } = await xs('xenstore-ls', '-p', '/perm');
  assert.match(stdout, /node = "v".*\(n0,r5,b7\)/);
});

test('xenstore-watch prints the initial event and a change', async () => {
  await xs('xenstore-write', '/w/init', '0');
  const child = track(spawn('xenstore-watch', ['/w'], { env, stdio: ['ignore', 'pipe', 'pipe'] }));
  try {
    let out = '';
    let onLine: (() => void) | undefined;
    child.stdout.on('data', (b: Buffer) => {
      out += b.toString();
      onLine?.();
    });
    const seen = (s: string) =>
      new Promise<void>((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`no ${s} in ${JSON.stringify(out)}`)), 5000);
        onLine = () => {
          if (out.split('\n').includes(s)) {
            clearTimeout(t);
            onLine = undefined;
            resolve();
          }
        };
        onLine();
      });
    await seen('/w'); // fired on registration
    await xs('xenstore-write', '/w/changed', 'yes');
    await seen('/w/changed');
  } finally {
    child.kill();
    await new Promise((r) => (child.exitCode !== null ? r(null) : child.once('exit', r)));
  }
});
