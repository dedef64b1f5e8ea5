/**
 * What a user sees: `blkif serve` run as a child, as a user runs it (its defaults unless a section
 * says otherwise), driven by fio's nbd engine with one job per VBD; beside it qemu-nbd and
 * nbdkit's file plugin on the same image with the same client; nbdkit's memory plugin behind its
 * delay filter as slow or fixed-latency storage. While they run, the child's threads are read from
 * /proc (CPU time and sleeps per role, resident memory) and its counters from `--metrics`.
 */
import { execFile } from 'node:child_process';
import { existsSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { freePort, spawnChild, waitForPort, type Child, type Cleanup } from './cleanup.js';
import { residentBytes, sampleProcess, usageBetween, type ProcSample, type ThreadRole } from './procstat.js';
import { KiB, MiB, perfOf, type Perf, type Workload } from './types.js';

const execFileP = promisify(execFile);
/** The `blkif` executable as a user runs it: its CommonJS launcher sizes libuv's pool for serve (blkif.cts). */
const MAIN = fileURLToPath(new URL('../../src/cli/blkif.cjs', import.meta.url));

export interface Server {
  /** The export URI of VBD `i` (or the server's only export). */
  uri(i: number): string;
  child: Child;
  /** Spawn to "ready" (blkif serve) or to accepting connections. */
  readySeconds: number;
  /** http://127.0.0.1:PORT/metrics when started with metrics. */
  metrics?: string;
}

/** `blkif serve IMAGES --port 0 [extra]`; resolves on its "ready nbd://..." line. */
export async function startServe(cleanup: Cleanup, images: readonly string[], extra: readonly string[] = [], o: { metrics?: boolean; readyTimeoutMs?: number } = {}): Promise<Server> {
  const metricsPort = o.metrics === true ? await freePort() : undefined;
  const t0 = performance.now();
  const child = spawnChild(cleanup, process.execPath, [MAIN, 'serve', ...images, '--port', '0', ...(metricsPort !== undefined ? ['--metrics', String(metricsPort)] : []), ...extra]);
  // Under the harness's step limit (120 s), so that a server that never gets ready is stopped here.
  const limit = o.readyTimeoutMs ?? 110_000;
  const ready = new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`blkif serve not ready in ${limit / 1000} s: ${child.stderr().slice(-1000)}`)), limit);
    const look = () => {
      const m = /^ready (nbd:\/\/[^/\s]+)\/\S*$/m.exec(child.stdout());
      if (m !== null) { clearTimeout(timer); resolve(m[1]!); }
    };
    child.proc.stdout!.on('data', look);
    void child.exited.then((code) => { clearTimeout(timer); reject(new Error(`blkif serve exited (${code}) before ready: ${child.stderr().slice(-1000)}`)); });
    look();
  });
  let base: string;
  try {
    base = await ready;
  } catch (e) {
    await child.stop(5000);
    throw e;
  }
  const readySeconds = (performance.now() - t0) / 1000;
  return { uri: (i) => `${base}/vbd${i}`, child, readySeconds, ...(metricsPort !== undefined ? { metrics: `http://127.0.0.1:${metricsPort}/metrics` } : {}) };
}

async function startListening(cleanup: Cleanup, cmd: string, args: (port: number) => string[]): Promise<Server> {
  let last: Error | undefined;
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    const t0 = performance.now();
    const child = spawnChild(cleanup, cmd, args(port));
    try {
      await waitForPort(port, 15_000, () => child.proc.exitCode === null && child.proc.signalCode === null);
      return { uri: () => `nbd://127.0.0.1:${port}/`, child, readySeconds: (performance.now() - t0) / 1000 };
    } catch (e) {
      last = new Error(`${cmd}: ${(e as Error).message}: ${child.stderr().slice(-500)}`);
      await child.stop(2000);
    }
  }
  throw last ?? new Error(`${cmd} did not start`);
}

/** qemu-nbd at its defaults (raw, persistent, one export), on 127.0.0.1. */
export const startQemuNbd = (cleanup: Cleanup, image: string) =>
  startListening(cleanup, 'qemu-nbd', (p) => ['-f', 'raw', '-t', '-p', String(p), '-b', '127.0.0.1', image]);

/** nbdkit's file plugin at its defaults (16 threads, parallel), on 127.0.0.1. */
export const startNbdkitFile = (cleanup: Cleanup, image: string) =>
  startListening(cleanup, 'nbdkit', (p) => ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(p), 'file', image]);

/**
 * nbdkit's memory plugin behind its delay filter: every read and write waits `delayMs` first.
 * On a Unix socket in `dir`; `uri` is what `blkif serve` takes as an image.
 */
export async function startDelayedMemory(cleanup: Cleanup, dir: string, size: number, delayMs: number, threads?: number): Promise<{ uri: string; child: Child }> {
  const sock = join(dir, `nbdkit-${delayMs}ms-${Date.now() % 1e6}.sock`);
  const child = spawnChild(cleanup, 'nbdkit', ['-f', '--exit-with-parent', '-U', sock, ...(threads !== undefined ? ['--threads', String(threads)] : []),
    '--filter=delay', 'memory', String(size), `rdelay=${delayMs}ms`, `wdelay=${delayMs}ms`]);
  const deadline = Date.now() + 15_000;
  while (!existsSync(sock)) {
    if (child.proc.exitCode !== null || Date.now() > deadline) throw new Error(`nbdkit memory did not start: ${child.stderr().slice(-500)}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return { uri: `nbd+unix:///?socket=${sock}`, child };
}

interface FioSide { iops: number; io_bytes: number; total_ios: number; runtime: number; clat_ns?: { percentile?: Record<string, number> } }
interface FioJob { jobname: string; error: number; read: FioSide; write: FioSide }

const fioBs = (n: number) => (n % MiB === 0 ? `${n / MiB}m` : `${n / KiB}k`);

/**
 * One fio run with a job per URI (fio's nbd engine, time based, all at once). Each job its own
 * workload (default `w`); the result per job, in order.
 */
export async function fioJobs(uris: readonly string[], w: Workload, seconds: number, perJob?: readonly (Workload | undefined)[]): Promise<Perf[]> {
  const args = ['--ioengine=nbd', '--time_based', `--runtime=${Math.round(seconds * 1000)}ms`, '--output-format=json', '--group_reporting=0'];
  uris.forEach((u, i) => {
    const j = perJob?.[i] ?? w;
    args.push(`--name=job${i}`, `--uri=${u}`, `--rw=${j.pattern}`, `--bs=${fioBs(j.blockSize)}`, `--iodepth=${j.depth}`);
  });
  const { stdout } = await execFileP('fio', args, { maxBuffer: 64 << 20, timeout: (seconds + 90) * 1000 });
  const jobs = (JSON.parse(stdout.slice(stdout.indexOf('{'))) as { jobs: FioJob[] }).jobs;
  return uris.map((_, i) => {
    const job = jobs.find((j) => j.jobname === `job${i}`);
    if (job === undefined) throw new Error(`fio reported no job${i}`);
    if (job.error !== 0) throw new Error(`fio job${i} error ${job.error}`);
    const j = perJob?.[i] ?? w;
    const s = j.pattern === 'read' || j.pattern === 'randread' ? job.read : job.write;
    const p = s.clat_ns?.percentile ?? {};
    return perfOf(s.total_ios, s.io_bytes, s.runtime / 1000, (p['50.000000'] ?? Number.NaN) / 1000, (p['99.000000'] ?? Number.NaN) / 1000);
  });
}

/** One Prometheus sample of `blkif serve --metrics`, summed over VBDs: metric name -> value. */
export async function scrape(url: string | undefined): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  if (url === undefined) return out;
  const text = await (await fetch(url)).text();
  for (const line of text.split('\n')) {
    const m = /^([a-z_]+)(?:\{[^}]*\})? ([0-9.eE+-]+)$/.exec(line);
    if (m !== null) out.set(m[1]!, (out.get(m[1]!) ?? 0) + Number(m[2]));
  }
  return out;
}

/** CPU and sleeps of a child's threads by role, and its counters, around `run`. */
export interface Observed<T> {
  result: T;
  seconds: number;
  cpu: Map<ThreadRole, { cpuSeconds: number; sleeps: number; threads: number }>;
  counters: Map<string, number>;
}

export async function observe<T>(s: Server, run: () => Promise<T>): Promise<Observed<T>> {
  const pid = s.child.proc.pid!;
  const [m0, p0] = [await scrape(s.metrics), sampleProcess(pid)];
  const result = await run();
  const p1: ProcSample = sampleProcess(pid);
  const m1 = await scrape(s.metrics);
  const counters = new Map([...m1].map(([k, v]) => [k, v - (m0.get(k) ?? 0)]));
  return { result, seconds: (p1.at - p0.at) / 1000, cpu: usageBetween(p0, p1), counters };
}

/** Idle: CPU % of the whole process over `seconds` (100 = one core), and VmRSS at the end. */
export async function idleOf(s: Server, seconds: number): Promise<{ cpuPercent: number; rssBytes: number | undefined }> {
  const pid = s.child.proc.pid!;
  const a = sampleProcess(pid);
  await new Promise((r) => setTimeout(r, seconds * 1000));
  const b = sampleProcess(pid);
  let cpu = 0;
  for (const u of usageBetween(a, b).values()) cpu += u.cpuSeconds;
  return { cpuPercent: (cpu / ((b.at - a.at) / 1000)) * 100, rssBytes: residentBytes(pid) };
}

/** Sparse images of `size` (serve only reads what clients ask for). */
export function sparseImages(dir: string, prefix: string, n: number, size: number): string[] {
  return Array.from({ length: n }, (_, i) => {
    const p = join(dir, `${prefix}${i}.img`);
    writeFileSync(p, '');
    truncateSync(p, size);
    return p;
  });
}
