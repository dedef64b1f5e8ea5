/** Runs `blkif serve` as a user would (a child process) and talks to it with real NBD clients. */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';
import { track } from '../support/children.js';

export const execFileP = promisify(execFile);
export const MAIN = fileURLToPath(new URL('../../src/cli/blkif.cjs', import.meta.url));

export interface Served {
  /** The server's URI without an export name (the default export; append a name for another). */
  uri: string;
  /** The URI of the ready line: the default export's, by name. */
  readyUri: string;
  proc: ChildProcess;
  stderr: () => string;
  /** SIGTERM, then the exit code (rejects if it does not exit within `ms`). */
  stop(signal?: NodeJS.Signals, ms?: number): Promise<number | null>;
}

export async function serve(args: string[], env: NodeJS.ProcessEnv = {}): Promise<Served> {
  // Tracked: ended when the test file ends, even if the test that started it failed first.
  const proc = track(spawn(process.execPath, [MAIN, 'serve', ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] }));
  let out = '';
  let err = '';
  proc.stderr!.on('data', (b: Buffer) => { err += b.toString(); });
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  const readyUri = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => { proc.kill('SIGKILL'); reject(new Error(`serve not ready in 30 s:\n${err}`)); }, 30_000);
    proc.stdout!.on('data', (b: Buffer) => {
      out += b.toString();
      const m = /^ready (\S+)$/m.exec(out);
      if (m !== null) { clearTimeout(timer); resolve(m[1]!); }
    });
    void exited.then((code) => { clearTimeout(timer); reject(new Error(`serve exited (${code}) before ready:\n${err}`)); });
  });
  // nbd://HOST:PORT/NAME or nbd+unix:///NAME?socket=PATH: the name is the path after the first '/'.
  const uri = readyUri.replace(/^([a-z+]+:\/\/[^/]*\/)[^?]*/, '$1');
  return {
    uri,
    readyUri,
    proc,
    stderr: () => err,
    async stop(signal: NodeJS.Signals = 'SIGTERM', ms = 30_000) {
      if (proc.exitCode !== null) return proc.exitCode;
      proc.kill(signal);
      let timer: NodeJS.Timeout | undefined;
      const t = new Promise<never>((_, reject) => { timer = setTimeout(() => { proc.kill('SIGKILL'); reject(new Error(`serve did not stop in ${ms} ms:\n${err}`)); }, ms); });
      try {
        return await Promise.race([exited, t]);
      } finally {
        clearTimeout(timer);
      }
    },
  };
}
