/**
 * What a benchmark run must undo however it ends: child processes, temporary images, the
 * toolstack. Undo steps run last-in first-out, each at most once, also on Ctrl-C / SIGTERM.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readSync, rmSync, statfsSync, writeSync } from 'node:fs';
import { createServer, connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomFillSync } from 'node:crypto';
import { MiB } from './types.js';

export class Cleanup {
  private steps: { name: string; fn: () => unknown }[] = [];
  private running: Promise<void> | undefined;

  /**
   * Registers an undo step; returns a function that runs it now (and only once), or with
   * `false` just forgets it (it is no longer needed).
   */
  add(name: string, fn: () => unknown): (run?: boolean) => Promise<void> {
    const step = { name, fn };
    this.steps.push(step);
    return async (run = true) => {
      const i = this.steps.indexOf(step);
      if (i < 0) return;
      this.steps.splice(i, 1);
      if (run) await fn();
    };
  }

  /** Runs every remaining step, newest first; failures are reported, never thrown. */
  run(report: (msg: string) => void = () => undefined): Promise<void> {
    this.running ??= (async () => {
      while (this.steps.length > 0) {
        const s = this.steps.pop()!;
        try {
          await s.fn();
        } catch (e) {
          report(`cleanup: ${s.name}: ${(e as Error).message}`);
        }
      }
      this.running = undefined;
    })();
    return this.running;
  }

  /** On SIGINT/SIGTERM: clean up, then exit 130/143. Returns a function removing the handlers. */
  onSignals(report: (msg: string) => void): () => void {
    const handler = (sig: NodeJS.Signals) => {
      report(`${sig}: cleaning up`);
      void this.run(report).finally(() => process.exit(sig === 'SIGINT' ? 130 : 143));
    };
    process.once('SIGINT', handler);
    process.once('SIGTERM', handler);
    return () => {
      process.off('SIGINT', handler);
      process.off('SIGTERM', handler);
    };
  }
}

/**
 * Where the image goes: /dev/shm (tmpfs: the page cache and nothing else, so that writes do not
 * start writeback to a disk in the middle of the measurements) when it has room for
 * `bytes` twice over, else the system's temporary directory.
 */
export function imageParent(bytes: number): { dir: string; tmpfs: boolean } {
  try {
    const st = statfsSync('/dev/shm');
    if (st.bavail * st.bsize >= 2 * bytes) return { dir: '/dev/shm', tmpfs: true };
  } catch {
    // no /dev/shm here
  }
  return { dir: tmpdir(), tmpfs: false };
}

/** A temporary directory removed by `cleanup`. */
export function tempDir(cleanup: Cleanup, prefix = 'blkif-bench-', parent = tmpdir()): string {
  const dir = mkdtempSync(join(parent, prefix));
  cleanup.add(`remove ${dir}`, () => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/**
 * A raw image of `size` bytes full of incompressible, non-zero data (no holes, nothing a client
 * could skip as zeroes), then read once so that it is warm in the page cache.
 */
export function createImage(path: string, size: number): void {
  const chunk = Buffer.allocUnsafe(MiB);
  const fd = openSync(path, 'w');
  try {
    for (let at = 0; at < size; at += chunk.length) {
      randomFillSync(chunk);
      writeSync(fd, chunk, 0, Math.min(chunk.length, size - at), at);
    }
  } finally {
    closeSync(fd);
  }
  warmImage(path, size);
}

/** Reads the whole file once (page cache warm-up). */
export function warmImage(path: string, size: number): void {
  const buf = Buffer.allocUnsafe(4 * MiB);
  const fd = openSync(path, 'r');
  try {
    // A short read at the end is fine: the point is touching every page.
    for (let at = 0; at < size; at += buf.length) readSync(fd, buf, 0, buf.length, at);
  } finally {
    closeSync(fd);
  }
}

/** A TCP port on 127.0.0.1 free right now (for servers that cannot be told "port 0"). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const a = s.address();
      const port = typeof a === 'object' && a !== null ? a.port : 0;
      s.close(() => resolve(port));
    });
  });
}

/** Resolves once something accepts TCP connections on 127.0.0.1:port (or rejects after `ms`). */
export async function waitForPort(port: number, ms: number, alive: () => boolean): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const c = connect({ host: '127.0.0.1', port }, () => { c.destroy(); resolve(true); });
      c.once('error', () => resolve(false));
    });
    if (ok) return;
    if (!alive()) throw new Error('the server exited before accepting connections');
    if (Date.now() > deadline) throw new Error(`nothing listens on 127.0.0.1:${port} after ${ms} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export interface Child {
  readonly proc: ChildProcess;
  readonly exited: Promise<number | null>;
  stdout(): string;
  stderr(): string;
  /** SIGTERM, then SIGKILL after `graceMs`; resolves with the exit code. Idempotent. */
  stop(graceMs?: number): Promise<number | null>;
}

/** Spawns a child whose output is collected (pipes always drained) and which `cleanup` kills. */
export function spawnChild(cleanup: Cleanup, cmd: string, args: readonly string[]): Child {
  const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  const keep = (s: string, b: Buffer) => (s.length > 65536 ? s.slice(-32768) : s) + b.toString();
  proc.stdout!.on('data', (b: Buffer) => { out = keep(out, b); });
  proc.stderr!.on('data', (b: Buffer) => { err = keep(err, b); });
  const exited = new Promise<number | null>((resolve) => {
    proc.once('exit', (code, signal) => resolve(code ?? (signal !== null ? -1 : null)));
    proc.once('error', (e) => { err += `\n${e.message}`; resolve(-1); });
  });
  let stopping: Promise<number | null> | undefined;
  const stop = (graceMs = 20_000) => {
    stopping ??= (async () => {
      if (proc.exitCode !== null || proc.signalCode !== null) return exited;
      proc.kill('SIGTERM');
      let timer: NodeJS.Timeout | undefined;
      const killed = new Promise<null>((resolve) => {
        timer = setTimeout(() => { proc.kill('SIGKILL'); resolve(null); }, graceMs);
      });
      const code = await Promise.race([exited, killed]);
      clearTimeout(timer);
      return code ?? exited;
    })();
    return stopping;
  };
  const remove = cleanup.add(`stop ${cmd} (pid ${proc.pid})`, () => stop());
  void exited.then(() => remove(false));
  return { proc, exited, stdout: () => out, stderr: () => err, stop };
}
