/**
 * The Debian programs tests drive (qemu-io, nbdinfo, fio, nbdkit, ...). A test whose program is
 * missing fails with one line naming the Debian package that brings it — never a silent skip and
 * never an ENOENT stack. The list lives in test/setup/debian-packages.txt, which
 * test/setup/install.sh (run before `npm test`) installs from.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { before } from 'node:test';
import { fileURLToPath } from 'node:url';

const LIST = fileURLToPath(new URL('../../../test/setup/debian-packages.txt', import.meta.url));

/** need -> Debian package, from test/setup/debian-packages.txt. */
export const DEBIAN_PACKAGES: ReadonlyMap<string, string> = new Map(
  readFileSync(LIST, 'utf8')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !l.startsWith('#'))
    .map((l) => l.split(/\s+/) as [string, string]),
);

/** Whether a need is met: a command on PATH, an absolute path that exists, or `gcc-m32`. */
export function have(need: string): boolean {
  if (need.startsWith('/')) return existsSync(need);
  if (need === 'gcc-m32') {
    return spawnSync('gcc', ['-m32', '-x', 'c', '-', '-o', '/dev/null'], { input: 'int main(void){return 0;}', stdio: ['pipe', 'ignore', 'ignore'] }).status === 0;
  }
  return spawnSync('/bin/sh', ['-c', 'command -v "$1"', 'sh', need], { stdio: 'ignore' }).status === 0;
}

/** An error that reads as one line in the test report (no stack: the message says it all). */
export class MissingTool extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'MissingTool';
    this.stack = message;
  }
}

/** Throws MissingTool naming the Debian package(s) unless every need is met. */
export function requireTools(...cmds: string[]): void {
  const gone = cmds.filter((c) => !have(c));
  if (gone.length === 0) return;
  const pkgs = [...new Set(gone.map((c) => DEBIAN_PACKAGES.get(c) ?? `(unknown package for ${c}: add it to test/setup/debian-packages.txt)`))];
  throw new MissingTool(`${gone.join(', ')} not installed: install Debian package ${pkgs.join(' ')} (npm test does it as root)`);
}

/** In a describe (or at a file's top level): its tests fail with that line unless the tools are there. */
export function needTools(...cmds: string[]): void {
  before(() => requireTools(...cmds));
}

/**
 * Fails with one line unless the name `localhost` resolves (the X.509 tests' certificates are
 * issued for it; a bare debootstrap root has no /etc/hosts).
 */
export function requireLocalhost(): void {
  // getent (libc-bin, on every Debian) resolves as the clients under test do, through NSS.
  const ok = spawnSync('getent', ['hosts', 'localhost'], { stdio: 'ignore' }).status === 0;
  if (!ok) throw new MissingTool('the name localhost does not resolve: this machine needs an /etc/hosts (127.0.0.1 localhost, ::1 localhost)');
}
