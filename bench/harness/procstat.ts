/**
 * Where a process's time goes, read from Linux's /proc: each thread's CPU time (utime + stime of
 * /proc/PID/task/TID/stat, in clock ticks), how often it went to sleep (voluntary context
 * switches: each is a sleep, and the wake-up that ends it), its name (comm: domain threads are
 * named after their domain, vCPU threads `name/N`), and the process's resident memory (VmRSS).
 * Threads are grouped by role so that a run's figures read per request.
 */
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';

export interface ThreadSample {
  tid: number;
  comm: string;
  /** utime + stime, seconds. */
  cpuSeconds: number;
  /** Voluntary context switches: times the thread went to sleep. */
  sleeps: number;
}

export interface ProcSample {
  pid: number;
  at: number;
  threads: ThreadSample[];
}

let ticks: number | undefined;
/** sysconf(_SC_CLK_TCK): the unit of utime and stime (proc(5)). */
export function clockTicks(): number {
  if (ticks === undefined) {
    try {
      ticks = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    } catch {
      ticks = 100;
    }
  }
  return ticks;
}

/** utime and stime of a stat line: fields 14 and 15, counted after the ")" that ends comm. */
export function parseStatTicks(stat: string): number {
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // rest[0] is field 3 (state): fields 14, 15 are rest[11], rest[12].
  return Number(rest[11]) + Number(rest[12]);
}

/** Every thread of `pid` now; threads that end while being read are left out. */
export function sampleProcess(pid: number): ProcSample {
  const hz = clockTicks();
  const threads: ThreadSample[] = [];
  let tids: string[] = [];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    return { pid, at: performance.now(), threads };
  }
  for (const t of tids) {
    try {
      const base = `/proc/${pid}/task/${t}`;
      const stat = readFileSync(`${base}/stat`, 'utf8');
      const status = readFileSync(`${base}/status`, 'utf8');
      const comm = stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'));
      const vol = /^voluntary_ctxt_switches:\s+(\d+)/m.exec(status);
      threads.push({ tid: Number(t), comm, cpuSeconds: parseStatTicks(stat) / hz, sleeps: vol === null ? 0 : Number(vol[1]) });
    } catch {
      // the thread ended meanwhile
    }
  }
  return { pid, at: performance.now(), threads };
}

/** VmRSS of a process in bytes (undefined if it is gone). */
export function residentBytes(pid: number): number | undefined {
  try {
    const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m === null ? undefined : Number(m[1]) * 1024;
  } catch {
    return undefined;
  }
}

/**
 * A thread's role from its name: the process's first thread (the toolstack and xenstored, or
 * the bench itself), driver domains and their vCPU (queue) threads, guests (their blkfront and,
 * under `blkif serve`, the NBD server), and the rest (V8's helper threads, libuv's pool).
 */
export type ThreadRole = 'main thread' | 'guests (blkfront, NBD)' | 'driver domain' | 'queue threads' | 'V8 and libuv helpers';
export const THREAD_ROLES: readonly ThreadRole[] = ['guests (blkfront, NBD)', 'driver domain', 'queue threads', 'main thread', 'V8 and libuv helpers'];

export function roleOf(t: ThreadSample, pid: number, isDriver: (comm: string) => boolean): ThreadRole {
  if (t.tid === pid) return 'main thread';
  if (t.comm === 'node' || t.comm.startsWith('V8') || t.comm.startsWith('libuv')) return 'V8 and libuv helpers';
  const vcpu = /\/\d+$/.test(t.comm);
  if (isDriver(t.comm)) return vcpu ? 'queue threads' : 'driver domain';
  return 'guests (blkfront, NBD)';
}

/** Driver domains are named driver-* by `blkif serve` and bench-driver-* by the bench. */
export const isDriverThread = (comm: string): boolean => /^(bench-)?driver/.test(comm);

export interface RoleUsage {
  cpuSeconds: number;
  sleeps: number;
  threads: number;
}

/** CPU seconds and sleeps per role between two samples of the same process (threads new since count from zero). */
export function usageBetween(a: ProcSample, b: ProcSample, isDriver: (comm: string) => boolean = isDriverThread): Map<ThreadRole, RoleUsage> {
  const before = new Map(a.threads.map((t) => [t.tid, t]));
  const out = new Map<ThreadRole, RoleUsage>(THREAD_ROLES.map((r) => [r, { cpuSeconds: 0, sleeps: 0, threads: 0 }]));
  for (const t of b.threads) {
    const p = before.get(t.tid);
    const u = out.get(roleOf(t, b.pid, isDriver))!;
    const cpu = t.cpuSeconds - (p?.cpuSeconds ?? 0);
    const sleeps = t.sleeps - (p?.sleeps ?? 0);
    u.cpuSeconds += Math.max(0, cpu);
    u.sleeps += Math.max(0, sleeps);
    if (cpu > 0 || sleeps > 0) u.threads++;
  }
  return out;
}

/** Total CPU seconds of a process between two samples (all threads). */
export function cpuBetween(a: ProcSample, b: ProcSample): number {
  let s = 0;
  for (const u of usageBetween(a, b).values()) s += u.cpuSeconds;
  return s;
}
