/**
 * README.md's "Use it as a library" example, taken from the README itself (so the two cannot
 * drift), type-checked by tsc in strict mode against the built package entry (`import ... from
 * 'blkif'`, resolved through package.json's `exports`, as a user's program would), then run.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ChildProcess } from 'node:child_process';
import { spawnTracked } from './support/children.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));

/** The first ```ts block after the "Use it as a library" heading. */
function readmeExample(): string {
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
  const section = readme.indexOf('## Use it as a library');
  assert.ok(section >= 0, 'README.md has a "Use it as a library" section');
  const m = /```ts\n([\s\S]*?)```/.exec(readme.slice(section));
  assert.ok(m !== null, 'the section holds a ```ts block');
  return m[1]!;
}

/** Runs a child to its end; resolves with its exit code and output. */
function run(child: ChildProcess): Promise<{ code: number | null; out: string; err: string }> {
  let out = '';
  let err = '';
  child.stdout?.on('data', (b: Buffer) => { out += b.toString(); });
  child.stderr?.on('data', (b: Buffer) => { err += b.toString(); });
  return new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, out, err }));
  });
}

test('the README\'s library example compiles against the package entry and runs', async () => {
  const code = readmeExample();
  assert.match(code, /from 'blkif'/, 'the example imports the package by name');
  // Inside the package (under dist/, which npm ships without), so `blkif` resolves to this package.
  const dir = mkdtempSync(join(ROOT, 'dist', 'readme-example-'));
  try {
    writeFileSync(join(dir, 'example.ts'), code);
    writeFileSync(join(dir, 'tsconfig.json'), JSON.stringify({
      compilerOptions: { target: 'ES2022', module: 'NodeNext', moduleResolution: 'NodeNext', strict: true, types: ['node'], outDir: '.', rootDir: '.', skipLibCheck: true },
      files: ['example.ts'],
    }));
    const tsc = await run(spawnTracked(join(ROOT, 'node_modules', '.bin', 'tsc'), ['-p', dir], { cwd: dir }));
    assert.equal(tsc.code, 0, `tsc: ${tsc.out}${tsc.err}`);
    const ran = await run(spawnTracked(process.execPath, [join(dir, 'example.js')], { cwd: dir, env: { ...process.env, BLKIF_XEN_CHECKED: '1' } }));
    assert.equal(ran.code, 0, `the example exits 0: ${ran.err}`);
    const lines = ran.out.trim().split('\n');
    assert.equal(lines[0], 'read back through blkfront: 42');
    assert.match(lines[1] ?? '', /^nbd:\/\/127\.0\.0\.1:\d+\/: 1048576 bytes, first byte 0$/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
