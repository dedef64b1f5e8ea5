/**
 * The NBD export against the reference: `blkif serve IMAGE --port 0` (a child, as a user runs it)
 * and `qemu-nbd -f raw -t -p PORT -b 127.0.0.1 IMAGE` on the same image, driven by the same
 * clients: fio's nbd engine (4 KiB random read at QD 32, 1 MiB sequential read) and nbdcopy of
 * the whole export to null:. Servers listen on 127.0.0.1 only and are stopped after their runs.
 */
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { freePort, spawnChild, waitForPort, type Child, type Cleanup } from './cleanup.js';
import { KiB, MiB, perfOf, sizeLabel, type Perf, type Workload } from './types.js';

const execFileP = promisify(execFile);
const MAIN = fileURLToPath(new URL('../../src/cli/main.js', import.meta.url));

export interface NbdServerSpec {
  /** Row config: 'blkif serve', 'qemu-nbd', ... */
  readonly name: string;
  readonly start: (cleanup: Cleanup, image: string) => Promise<{ uri: string; child: Child }>;
}

export interface NbdTest {
  readonly id: string;
  readonly label: string;
  readonly workload?: Workload;
  readonly run: (uri: string) => Promise<Perf>;
}

/** `blkif serve` with extra arguments; resolves on its "ready nbd://..." line. */
export function blkifServe(extra: readonly string[] = []): NbdServerSpec['start'] {
  return async (cleanup, image) => {
    const child = spawnChild(cleanup, process.execPath, [MAIN, 'serve', image, '--port', '0', ...extra]);
    const uri = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`blkif serve not ready in 60 s: ${child.stderr().slice(-2000)}`)), 60_000);
      const look = () => {
        const m = /^ready (\S+)$/m.exec(child.stdout());
        if (m !== null) { clearTimeout(timer); resolve(m[1]!); }
      };
      child.proc.stdout!.on('data', look);
      void child.exited.then((code) => { clearTimeout(timer); reject(new Error(`blkif serve exited (${code}) before ready: ${child.stderr().slice(-2000)}`)); });
      look();
    });
    return { uri, child };
  };
}

/** qemu-nbd cannot be told "any port": pick a free one, retry if someone took it meanwhile. */
export async function qemuNbd(cleanup: Cleanup, image: string): Promise<{ uri: string; child: Child }> {
  let last: Error | undefined;
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    const child = spawnChild(cleanup, 'qemu-nbd', ['-f', 'raw', '-t', '-p', String(port), '-b', '127.0.0.1', image]);
    try {
      await waitForPort(port, 15_000, () => child.proc.exitCode === null && child.proc.signalCode === null);
      return { uri: `nbd://127.0.0.1:${port}/`, child };
    } catch (e) {
      last = new Error(`${(e as Error).message}: ${child.stderr().slice(-500)}`);
      await child.stop(2000);
    }
  }
  throw last ?? new Error('qemu-nbd did not start');
}

interface FioJob {
  error: number;
  read: { iops: number; bw_bytes: number; io_bytes: number; total_ios: number; runtime: number; clat_ns?: { percentile?: Record<string, number> } };
}

/** fio's nbd engine, time based; the read side of its JSON report. */
export function fioTest(w: Workload, seconds: number): NbdTest {
  const rw = w.pattern;
  const bs = w.blockSize % MiB === 0 ? `${w.blockSize / MiB}m` : `${w.blockSize / KiB}k`;
  return {
    id: `fio-${rw}-${bs}-qd${w.depth}`,
    label: `fio ${rw} ${sizeLabel(w.blockSize)} QD${w.depth}`,
    workload: w,
    async run(uri) {
      const { stdout } = await execFileP('fio', [
        '--name=bench', '--ioengine=nbd', `--uri=${uri}`, `--rw=${rw}`, `--bs=${bs}`, `--iodepth=${w.depth}`,
        '--time_based', `--runtime=${seconds}`, '--output-format=json',
      ], { maxBuffer: 16 << 20, timeout: (seconds + 60) * 1000 });
      const job = (JSON.parse(stdout.slice(stdout.indexOf('{'))) as { jobs: FioJob[] }).jobs[0]!;
      if (job.error !== 0) throw new Error(`fio error ${job.error}`);
      const r = job.read;
      const p = r.clat_ns?.percentile ?? {};
      return perfOf(r.total_ios, r.io_bytes, r.runtime / 1000, (p['50.000000'] ?? Number.NaN) / 1000, (p['99.000000'] ?? Number.NaN) / 1000);
    },
  };
}

/** nbdcopy of the whole export (the image) to null:, timed from spawn to exit. */
export function nbdcopyTest(bytes: number): NbdTest {
  return {
    id: 'nbdcopy',
    label: `nbdcopy ${sizeLabel(bytes)} to null:`,
    async run(uri) {
      const t0 = performance.now();
      await execFileP('nbdcopy', [uri, 'null:'], { timeout: 300_000 });
      const seconds = (performance.now() - t0) / 1000;
      return perfOf(1, bytes, seconds, Number.NaN, Number.NaN);
    },
  };
}

/** Version line of a tool, or undefined if it is not installed. */
export async function toolVersion(cmd: string, args: readonly string[] = ['--version']): Promise<string | undefined> {
  try {
    const { stdout, stderr } = await execFileP(cmd, [...args], { timeout: 10_000 });
    return (stdout || stderr).split('\n').find((l) => l.trim() !== '')?.trim();
  } catch {
    return undefined;
  }
}
