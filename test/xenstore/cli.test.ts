// `blkif xenstored --socket PATH` as its own process, used by xenstore-read.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { XenstoreClient } from '../../src/xenstore/index.js';
import { track } from '../support/children.js';
import { needTools } from '../support/tools.js';

needTools('xenstore-read');

test('xenstored command prints ready, serves, exits on SIGTERM', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkif-xsd-'));
  const sock = path.join(dir, 'socket');
  const cli = new URL('../../src/cli/xenstored.js', import.meta.url).href;
  const script = `import { xenstoredCommand } from ${JSON.stringify(cli)};
await xenstoredCommand().parseAsync(['--socket', process.argv[1]], { from: 'user' });`;
  const child = track(spawn(process.execPath, ['--input-type=module', '-e', script, sock], { stdio: ['ignore', 'pipe', 'inherit'] }));
  try {
    const line = await new Promise<string>((resolve, reject) => {
      let out = '';
      child.stdout.on('data', (b: Buffer) => {
        out += b.toString();
        if (out.includes('\n')) resolve(out.split('\n')[0]!);
      });
      child.once('exit', (c) => reject(new Error(`exited ${c}`)));
    });
    assert.equal(line, `ready ${sock}`);
    const c = await XenstoreClient.connectSocket(sock);
    await c.write('/cli', 'works');
    c.close();
    const { stdout } = await promisify(execFile)('xenstore-read', ['/cli'], { env: { ...process.env, XENSTORED_PATH: sock } });
    assert.equal(stdout, 'works\n');
  } finally {
    const exited = new Promise((r) => (child.exitCode !== null ? r(child.exitCode) : child.once('exit', r)));
    child.kill('SIGTERM');
    assert.equal(await exited, 0);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
