/**
 * Builds the C conformance program against Xen's genuine headers for both ABIs and runs it.
 * The -m32 build is static and runs natively where the kernel executes i386 binaries, else
 * under qemu-i386 (Debian's qemu-user), which test/setup/install.sh installs.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const SOURCE = fileURLToPath(new URL('../../../test/conformance/blkif_conformance.c', import.meta.url));
export const XEN_BLKIF_H = '/usr/include/xen/io/blkif.h';

export interface CBuild {
  dir: string;
  /** Runs the x86_64 (`-m64`) or x86_32 (`-m32`) build with `args`, feeding `input`. */
  run(abi: 'x86_64-abi' | 'x86_32-abi', args: string[], input?: string): { status: number | null; stdout: string; stderr: string };
  cleanup(): void;
}

export function buildConformance(source = SOURCE): CBuild {
  const dir = mkdtempSync(join(tmpdir(), 'blkif-conformance-'));
  const bin64 = join(dir, 'conformance64');
  const bin32 = join(dir, 'conformance32');
  const cc = (m: string, out: string, extra: string[]) =>
    execFileSync('gcc', ['-std=gnu11', '-Wall', '-Wextra', '-Werror', '-O1', m, ...extra, '-o', out, source], { stdio: 'pipe' });
  cc('-m64', bin64, []);
  cc('-m32', bin32, ['-static']);
  // Where the kernel cannot execute i386 binaries, exec fails with ENOEXEC and libuv falls back
  // to /bin/sh: only our own usage line proves the binary really ran.
  const probe = spawnSync(bin32, ['--probe'], { encoding: 'utf8' });
  const native32 = probe.status === 2 && probe.stderr.includes('usage:');
  const exec = (abi: string, args: string[]): [string, string[]] =>
    abi === 'x86_64-abi' ? [bin64, args] : native32 ? [bin32, args] : ['qemu-i386', [bin32, ...args]];
  return {
    dir,
    run(abi, args, input) {
      const [cmd, argv] = exec(abi, args);
      const r = spawnSync(cmd, argv, { input, encoding: 'utf8', maxBuffer: 64 << 20 });
      if (r.error) throw r.error;
      return { status: r.status, stdout: r.stdout, stderr: r.stderr };
    },
    cleanup() {
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
