/**
 * The benchmark harness behind `npm run bench`: a plan of steps (baselines, the blkfront API,
 * the protocol matrix, bytes in flight, queues in threads, where the time goes; then `blkif serve`
 * as a user runs it: start-up, scaling, isolation, the NBD servers side by side, bytes in flight on
 * slow storage; and any extra suites), run one after the other (or the sections `only` names)
 * with progress on stderr; then one document of
 * results, a Markdown report with SVG charts, and either tables or JSON on stdout. It asserts
 * nothing about speed: every figure is reported beside its baseline as a ratio. Whatever happens,
 * child processes are stopped, temporary images removed and the toolstack shut down.
 */
import { arch, cpus, loadavg, release, totalmem, type as osType } from 'node:os';
import { join } from 'node:path';
import type { StorageSpec } from '../../src/storage/index.js';
import type { GuestDisk } from '../../src/toolstack/index.js';
import { directBaseline, MemoryCopy, memcpyBaseline, memcpyId } from './baselines.js';
import { Cleanup, createImage, imageParent, tempDir } from './cleanup.js';
import { GRANT_POOL_CAP, GuestBench, poolPagesFor, reachableInflight } from './guest.js';
import {
  apiWorkloads, configLabel, DEFAULT_CONFIG_LABEL, INFLIGHT_BLOCK, INFLIGHT_DEPTH, matrixConfigs, matrixWorkloads, PROTOCOL_MATRIX, SCALING_WORKLOAD,
  TIME_WORKLOADS, type MatrixConfig,
} from './matrix.js';
import { toolVersion } from './nbd.js';
import { addServeSections } from './serve-sections.js';
import { sumOf, timeInProcess } from './time.js';
import { makeProgress } from './progress.js';
import { measureThreads, THREADS_BUFFER_PAGES, THREADS_LAYOUTS, THREADS_WORKLOADS, threadsModeLabel, ThreadsRuns } from './threads.js';
import { linkBaselines, computeTargets, renderText, writeReport } from './report.js';
import {
  KiB, MiB, sizeLabel, workloadId, workloadLabel, type BenchDocument, type BenchResults, type ExtraSuite, type InflightRow,
  type MachineInfo, type Row, type Section, type StorageKind, type Workload,
} from './types.js';

export interface BenchOptions {
  readonly quick: boolean;
  readonly json: boolean;
  /** Reports go to `<outDir>/<timestamp>/report.md` (with their charts). */
  readonly outDir: string;
  /** Where the latest report is copied as REPORT.md (charts in `report/` beside it). */
  readonly latestDir?: string;
  /** Suites contributed from outside src (bench/'s micro-benchmarks), run last. */
  readonly extraSuites?: readonly ExtraSuite[];
  /** The command line that started the run, for the report (default: `npm run bench` and the flags). */
  readonly command?: string;
  /** Where the tables (or the JSON document) go; stdout by default. */
  readonly out?: NodeJS.WritableStream;
  /** Run only these sections (the image and, for its sections, the toolstack are set up as needed). */
  readonly only?: readonly Section[];
}

/** Sections that run in this process's toolstack (started only for them). */
const TOOLSTACK_SECTIONS: readonly Section[] = ['api', 'matrix', 'inflight', 'threads', 'time'];

/** Durations and sizes of a run; `--quick` shrinks them to stay under a minute in all. */
export function parameters(quick: boolean) {
  return {
    imageBytes: 256 * MiB,
    memoryDiskBytes: 64 * MiB,
    apiMs: quick ? 80 : 1000,
    matrixMs: quick ? 50 : 500,
    baselineMs: quick ? 100 : 700,
    inflightRounds: quick ? 2 : 4,
    scalingMs: quick ? 250 : 2000,
    /** Each workload of the queues-in-threads runs, per layout and mode. */
    threadsMs: quick ? 100 : 1000,
    fioSeconds: quick ? 0.5 : 3,
    /** The unmeasured fio run before a server's first measured one. */
    warmSeconds: quick ? 0.25 : 1,
    /** Where the time goes: long enough for CPU clock ticks (10 ms) to resolve each thread. */
    timeMs: quick ? 400 : 1500,
    /** blkif serve: images at start-up (time to ready, idle CPU, VmRSS), idle seconds measured. */
    startupCounts: quick ? [1, 4] : [1, 4, 16, 64],
    idleSeconds: quick ? 0.5 : 3,
    /** blkif serve with n images, a fio job per VBD. */
    serveScalingCounts: quick ? [1, 4] : [1, 2, 4, 8, 16],
    serveImageBytes: 32 * MiB,
    /** Isolation: vbd0's storage waits this long per request. */
    slowDelayMs: 200,
    /** Bytes in flight over NBD: the storage's latency per request, and the configurations. */
    inflightDelayMs: 10,
    /** nbdkit --threads of the fixed-latency storage: enough that the storage never caps the ring (256 x 1 MiB in service). */
    inflightNbdThreads: 256,
    inflightNbdConfigs: (quick ? [[0, 0], [256, 0]] : [0, 32, 256, 4096].flatMap((n) => [[n, 0], [n, 4]])) as [number, number][],
    matrixStorages: (quick ? ['file'] : ['file', 'memory']) as StorageKind[],
    inflightModes: (quick ? ['async'] : ['sync', 'async']) as ('sync' | 'async')[],
    inflightOrders: quick ? [0] : [0, 4],
    /** The seed's 8 x 512 x 32 needs 16 MiB requests and a 512 MiB pool: full runs only. */
    inflight16MiB: !quick,
    /** blkif serve with indirect 4096 and a 16-page ring besides the defaults: full runs only. */
    nbdTunedServer: !quick,
  };
}

interface Step {
  readonly name: string;
  readonly run: () => Promise<string | undefined>;
  /** Runs in the toolstack: a step that hangs there takes the toolstack down with it. */
  readonly toolstack: boolean;
  /** Its section; 'setup' (the image) always runs, 'toolstack' when a section needs it. */
  readonly section: Section | 'setup' | 'toolstack';
  /** Its own limit, for the few steps that take longer than STEP_TIMEOUT_MS by nature. */
  readonly timeoutMs?: number;
}

/** No step should take more than this; one that does is abandoned (and reported). */
const STEP_TIMEOUT_MS = 120_000;
const MAIN_GUEST = 'bench-guest';
const threadsGuest = (i: number) => `bench-threads-${i}`;
/** The queues-in-threads layouts plug one VBD per guest: as many guests as their largest layout has VBDs. */
const THREADS_GUESTS = Math.max(...THREADS_LAYOUTS.map((l) => l.vbds));
const THREADS_GUEST_PAGES = THREADS_BUFFER_PAGES + 1024;

class StepTimeout extends Error {}

const fmtRate = (r: Row) => (r.workload !== undefined && r.workload.blockSize < 64 * KiB ? `${Math.round(r.perf.iops).toLocaleString('en-US')} IOPS` : `${r.perf.mibps.toFixed(0)} MiB/s`);

export async function runBench(o: BenchOptions): Promise<BenchDocument> {
  const started = new Date();
  const t0 = performance.now();
  const P = parameters(o.quick);
  const results: BenchResults = {
    api: [], matrix: [], baselines: [], inflight: [], nbd: [], scaling: [], threads: [], skipped: [], micro: [],
    time: [], startup: [], serveScaling: [], inflightNbd: [],
  };
  const cleanup = new Cleanup();
  const progress = await makeProgress();
  const offSignals = cleanup.onSignals((m) => progress.note(m));
  const skip = (what: string, why: string) => {
    results.skipped.push({ what, why });
    progress.note(`skipped: ${what}: ${why}`);
  };

  const tools = {
    'qemu-nbd': await toolVersion('qemu-nbd'),
    fio: await toolVersion('fio'),
    nbdkit: await toolVersion('nbdkit'),
  };
  const machine: MachineInfo = {
    cpuModel: cpus()[0]?.model ?? 'unknown', cpus: cpus().length, totalMemoryBytes: totalmem(), node: process.version,
    os: osType(), kernel: release(), arch: arch(), loadAverageAtStart: loadavg().map((l) => Math.round(l * 100) / 100),
    tools: Object.fromEntries(Object.entries(tools).map(([k, v]) => [k, v ?? 'not installed'])),
  };

  // Shared state the steps build up.
  let dir = '';
  let image = '';
  let mem: MemoryCopy | undefined;
  let gb: GuestBench | undefined;
  const fileSpec = (io?: 'sync' | 'async'): StorageSpec => ({ kind: 'file', path: image, sectorSize: 512, ...(io !== undefined ? { io } : {}) });
  const memSpec = (): StorageSpec => ({ kind: 'memory', size: P.memoryDiskBytes, sectorSize: 512 });
  const specFor = (s: StorageKind) => (s === 'file' ? fileSpec() : memSpec());
  const spanFor = (s: StorageKind) => (s === 'file' ? P.imageBytes : P.memoryDiskBytes);
  const needGuests = () => {
    if (gb === undefined) throw new Error('the toolstack did not start');
    return gb;
  };

  const steps: Step[] = [];
  let inToolstack = false;
  let section: Step['section'] = 'setup';
  const add = (name: string, run: () => Promise<string | undefined>, timeoutMs?: number) =>
    steps.push({ name, run, toolstack: inToolstack, section, ...(timeoutMs !== undefined ? { timeoutMs } : {}) });

  const where = imageParent(P.imageBytes);
  add(`create a ${sizeLabel(P.imageBytes)} image and warm it in the page cache`, async () => {
    dir = tempDir(cleanup, 'blkif-bench-', where.dir);
    image = join(dir, 'bench.img');
    createImage(image, P.imageBytes);
    mem = new MemoryCopy(P.imageBytes);
    return image;
  });

  // ---- 4. baselines first: the machine before the stack runs on it ----
  section = 'baselines';
  const api = apiWorkloads(o.quick);
  const baseWorkloads = uniqueWorkloads([...api, ...matrixWorkloads()]);
  for (const w of baseWorkloads) {
    add(`baseline: direct ${workloadLabel(w)} on the image`, async () => {
      const r = await directBaseline(image, w, P.imageBytes, P.baselineMs);
      results.baselines.push(r);
      return fmtRate(r);
    });
  }
  const memcpyWorkloads = uniqueBy(baseWorkloads.map((w) => ({ ...w, depth: 1 })), memcpyId);
  add(`baseline: memory copy (Buffer.copy) at ${memcpyWorkloads.length} block sizes and patterns`, async () => {
    for (const w of memcpyWorkloads) results.baselines.push(memcpyBaseline(mem!, w, Math.max(100, P.baselineMs / 2)));
    const big = results.baselines.find((r) => r.id === memcpyId({ pattern: 'read', blockSize: 4 * MiB, depth: 1 }));
    return big !== undefined ? `4 MiB blocks: ${big.perf.mibps.toFixed(0)} MiB/s` : undefined;
  });

  inToolstack = true;
  section = 'toolstack';
  add(`start the toolstack: xenstored, a driver domain, ${THREADS_GUESTS + 1} guests`, async () => {
    gb = await GuestBench.start(cleanup);
    // Room for the largest page pool of the bytes-in-flight probes, which reuse this guest.
    await gb.guest(MAIN_GUEST, GRANT_POOL_CAP + 2048);
    // The queues-in-threads guests too, now: creating domains gets slower once the stack has been busy.
    await Promise.all(Array.from({ length: THREADS_GUESTS }, (_, i) => gb!.guest(threadsGuest(i), THREADS_GUEST_PAGES)));
    return `${THREADS_GUESTS + 1} guests`;
  });

  // ---- 1. the blkfront API, default protocol ----
  section = 'api';
  for (const storage of ['file', 'memory'] as const) {
    let disk: GuestDisk | undefined;
    add(`blkfront API (${storage}): plug a VBD, ${DEFAULT_CONFIG_LABEL}`, async () => {
      const g = needGuests();
      disk = await g.plug(await g.guest(MAIN_GUEST), specFor(storage), { maxIndirectSegments: 256 }, { maxIndirectSegments: 256, ringPageOrder: 0 });
      return `${disk.info.maxSegments} segments, ${disk.info.ringSize} slots`;
    });
    for (const w of api) {
      add(`blkfront API (${storage}): ${workloadLabel(w)}`, async () => {
        if (disk === undefined) throw new Error('no VBD');
        const m = await needGuests().run(disk, w, P.apiMs, spanFor(storage));
        const row: Row = { id: `api/${storage}/${workloadId(w)}`, label: workloadLabel(w), storage, config: DEFAULT_CONFIG_LABEL, workload: w, perf: m.perf, cost: m.cost };
        results.api.push(row);
        return fmtRate(row);
      });
    }
    add(`blkfront API (${storage}): unplug`, async () => {
      await disk?.unplug();
      disk = undefined;
      return undefined;
    });
  }

  // ---- 2 + 3. the protocol matrix, and what each configuration costs per request ----
  section = 'matrix';
  // A quick run keeps to the indirect x ring-order plane (the defaults for the other axes).
  const configs = matrixConfigs(o.quick ? PROTOCOL_MATRIX.slice(0, 2) : PROTOCOL_MATRIX);
  // Configurations waiting for options: one line per missing set, not one per configuration.
  const waiting = new Map<string, MatrixConfig[]>();
  for (const c of configs.filter((c) => c.missing !== undefined)) waiting.set(c.missing!, [...(waiting.get(c.missing!) ?? []), c]);
  for (const [why, cs] of waiting) {
    const extra = cs[0]!.label.split(', ').slice(2).join(', ');
    results.skipped.push({ what: `matrix: ${cs.length} configurations with ${extra}`, why });
  }
  const runnable = configs.filter((c) => c.missing === undefined);
  for (const storage of P.matrixStorages) {
    for (const c of runnable) {
      add(`matrix (${storage}): ${c.label}: ${matrixWorkloads().length} workloads`, async () => {
        const g = needGuests();
        const disk = await g.plug(await g.guest(MAIN_GUEST), specFor(storage), c.backendOptions, c.frontendOptions);
        try {
          const got: string[] = [];
          for (const w of matrixWorkloads()) {
            const m = await g.run(disk, w, P.matrixMs, spanFor(storage));
            const row: Row = { id: matrixId(storage, c.label, w), label: workloadLabel(w), storage, config: c.label, workload: w, perf: m.perf, cost: m.cost };
            results.matrix.push(row);
            got.push(fmtRate(row));
          }
          return got.join(', ');
        } finally {
          await disk.unplug();
        }
      });
    }
  }

  // ---- 3. peak bytes in flight under a deep 4 MiB sequential load ----
  section = 'inflight';
  const inflightProbes: { c: MatrixConfig; block: number }[] = runnable
    .filter((c) => P.inflightOrders.includes(c.ringPageOrder))
    .map((c) => ({ c, block: INFLIGHT_BLOCK }));
  if (P.inflight16MiB) {
    const big = runnable.find((c) => c.indirect === 4096 && c.ringPageOrder === 0);
    if (big !== undefined) inflightProbes.push({ c: big, block: 16 * MiB });
  }
  // The main guest has room for any pool the grant table allows; the 16 MiB probe gets a guest
  // of its own (its 512 MiB of I/O buffers), destroyed once it is done.
  const poolFor = (c: MatrixConfig, block: number) => poolPagesFor(c.indirect === 0 ? 11 : c.indirect, 32 << c.ringPageOrder, block, INFLIGHT_DEPTH);
  for (const { c, block } of inflightProbes) {
    add(`bytes in flight: ${c.label}, ${sizeLabel(block)} sequential reads QD${INFLIGHT_DEPTH}`, async () => {
      const g = needGuests();
      const bufferPages = poolFor(c, block);
      const own = block !== INFLIGHT_BLOCK;
      const name = own ? `bench-inflight-${sizeLabel(block).replace(' ', '')}` : MAIN_GUEST;
      const guest = await g.guest(name, bufferPages + 2048);
      const segs0 = c.indirect === 0 ? 11 : c.indirect;
      const slots0 = 32 << c.ringPageOrder;
      const row: InflightRow = {
        config: c.label, indirect: c.indirect, ringPageOrder: c.ringPageOrder, segments: segs0, slots: slots0,
        limitBytes: segs0 * slots0 * 4096, limitAtBlockBytes: Math.min(segs0, block / 4096) * slots0 * 4096,
        reachableBytes: reachableInflight(segs0, slots0, block, INFLIGHT_DEPTH, bufferPages),
        blockSize: block, depth: INFLIGHT_DEPTH, bufferPages, grantCapped: bufferPages >= GRANT_POOL_CAP, measured: {},
      };
      try {
        for (const io of P.inflightModes) {
          const disk = await g.plug(guest, fileSpec(io), c.backendOptions, { ...c.frontendOptions, bufferPages });
          try {
            row.segments = disk.info.maxSegments;
            row.slots = disk.info.ringSize;
            row.limitBytes = row.segments * row.slots * 4096;
            row.limitAtBlockBytes = Math.min(row.segments, block / 4096) * row.slots * 4096;
            row.reachableBytes = reachableInflight(row.segments, row.slots, block, INFLIGHT_DEPTH, bufferPages);
            // A fixed number of I/Os (rounds of the whole queue), not a time: the peak is what counts.
            const m = await g.run(disk, { pattern: 'read', blockSize: block, depth: INFLIGHT_DEPTH }, 60_000, P.imageBytes, INFLIGHT_DEPTH * P.inflightRounds);
            row.measured[io] = { peakBytes: m.peakInflightBytes, mibps: m.perf.mibps, ops: m.perf.ops };
          } finally {
            await disk.unplug();
          }
        }
      } finally {
        if (own) await g.dropGuest(name);
      }
      results.inflight.push(row);
      return Object.entries(row.measured).map(([io, v]) => `${io}: peak ${(v.peakBytes / MiB).toFixed(1)} MiB (${v.ops} I/Os, ${v.mibps.toFixed(0)} MiB/s)`).join(', ');
    });
  }

  // ---- 6. queues in threads of their own vs in the backend's thread, on the image file ----
  section = 'threads';
  const threadsRuns = new ThreadsRuns();
  const fmtThreads = (p: { iops: number; mibps: number }, bs: number) => (bs < 64 * KiB ? `${Math.round(p.iops).toLocaleString('en-US')} IOPS` : `${p.mibps.toFixed(0)} MiB/s`);
  for (const l of THREADS_LAYOUTS) {
    for (const threaded of [false, true]) {
      add(`queues in threads: ${l.layout}, ${threadsModeLabel(threaded)}: ${THREADS_WORKLOADS.map(workloadLabel).join(', ')}`, async () => {
        const g = needGuests();
        const guests = l.vbds === 1 ? [await g.guest(MAIN_GUEST)]
          : await Promise.all(Array.from({ length: l.vbds }, (_, i) => g.guest(threadsGuest(i), THREADS_GUEST_PAGES)));
        const perf = await measureThreads(g, guests, fileSpec(), P.imageBytes, l, threaded, P.threadsMs);
        threadsRuns.record(l.layout, threaded, perf);
        return THREADS_WORKLOADS.map((w) => fmtThreads(perf.get(workloadId(w))!, w.blockSize)).join(', ');
      });
    }
  }

  // ---- where the time goes, through the blkfront API: per ring request, by thread ----
  section = 'time';
  let timeDisk: GuestDisk | undefined;
  add(`where the time goes: plug a VBD (image file, ${DEFAULT_CONFIG_LABEL})`, async () => {
    const g = needGuests();
    timeDisk = await g.plug(await g.guest(MAIN_GUEST), fileSpec(), { maxIndirectSegments: 256 }, { maxIndirectSegments: 256, ringPageOrder: 0 });
    return undefined;
  });
  for (const w of TIME_WORKLOADS) {
    add(`where the time goes: ${workloadLabel(w)} through the blkfront API`, async () => {
      if (timeDisk === undefined) throw new Error('no VBD');
      const row = await timeInProcess(needGuests(), MAIN_GUEST, timeDisk, w, P.timeMs, P.imageBytes);
      results.time!.push(row);
      return `${sumOf(row.cpuUs).toFixed(1)} µs CPU per ring request`;
    });
  }
  add('where the time goes: unplug', async () => {
    await timeDisk?.unplug();
    timeDisk = undefined;
    return undefined;
  });

  section = 'toolstack';
  add('stop the toolstack', async () => {
    await gb?.shutdown();
    gb = undefined;
    return undefined;
  });

  inToolstack = false;

  // ---- what a user sees: blkif serve as a child, fio's nbd engine ----
  addServeSections({ add: (sec, name, run, timeoutMs) => { section = sec; add(name, run, timeoutMs); }, cleanup, results, P, image: () => image, dir: () => dir, tools, skip });

  section = 'micro';
  for (const suite of o.extraSuites ?? []) {
    add(`micro-benchmarks: ${suite.name}`, async () => {
      results.micro.push({ suite: suite.name, figures: await suite.run(o.quick) });
      return undefined;
    });
  }

  // ---- run the plan ----
  const only = o.only !== undefined ? new Set<string>(o.only) : undefined;
  const plan = only === undefined ? steps : steps.filter((s) => s.section === 'setup'
    || (s.section === 'toolstack' ? TOOLSTACK_SECTIONS.some((x) => only.has(x)) : only.has(s.section)));
  try {
    for (const [i, s] of plan.entries()) {
      progress.start(i + 1, plan.length, s.name);
      const ts = performance.now();
      let timer: NodeJS.Timeout | undefined;
      try {
        const timeout = new Promise<never>((_, reject) => {
          const limit = s.timeoutMs ?? STEP_TIMEOUT_MS;
          timer = setTimeout(() => reject(new StepTimeout(`no result after ${limit / 1000} s`)), limit);
        });
        const summary = await Promise.race([s.run(), timeout]);
        progress.end(summary, (performance.now() - ts) / 1000);
      } catch (e) {
        progress.end('failed', (performance.now() - ts) / 1000);
        skip(s.name, (e as Error).message.split('\n')[0]!);
        if (e instanceof StepTimeout && s.toolstack && gb !== undefined) {
          // Something in the stack hangs: stop it (domains are destroyed after a grace period),
          // so that the later toolstack steps fail fast and the rest of the run goes on.
          progress.note('stopping the toolstack after a hang; the remaining toolstack steps are skipped');
          const g = gb;
          gb = undefined;
          await g.shutdown().catch(() => undefined);
        }
      } finally {
        clearTimeout(timer);
      }
    }
  } finally {
    await cleanup.run((m) => progress.note(m));
    offSignals();
    progress.stop();
  }

  results.threads = threadsRuns.rows();
  machine.loadAverageAtEnd = loadavg().map((l) => Math.round(l * 100) / 100);
  linkBaselines(results);
  const targets = computeTargets(results);
  const doc: BenchDocument = {
    tool: 'blkif bench', startedAt: started.toISOString(), seconds: (performance.now() - t0) / 1000, quick: o.quick, machine,
    command: o.command ?? `npm run bench --${o.quick ? ' --quick' : ''}${o.json ? ' --json' : ''}`,
    parameters: { ...P, ...(o.only !== undefined ? { only: o.only } : {}), imageDir: where.dir, imageOnTmpfs: where.tmpfs, defaultConfig: DEFAULT_CONFIG_LABEL, classicConfig: configLabel(0, 0), inflightBlock: INFLIGHT_BLOCK, inflightDepth: INFLIGHT_DEPTH, serveScalingWorkload: SCALING_WORKLOAD, threadsBufferPages: THREADS_BUFFER_PAGES },
    results, targets, report: undefined,
  };
  try {
    doc.report = await writeReport(doc, o.outDir, o.latestDir);
  } catch (e) {
    process.stderr.write(`bench: could not write the report: ${(e as Error).message}\n`);
  }
  const out = o.out ?? process.stdout;
  if (o.json) out.write(JSON.stringify(doc, jsonNumbers, 2) + '\n');
  else out.write(renderText(doc));
  return doc;
}

export function matrixId(storage: StorageKind, config: string, w: Workload): string {
  return `matrix/${storage}/${slug(config)}/${workloadId(w)}`;
}

export function slug(s: string): string {
  return s.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '');
}

function uniqueBy<T>(xs: readonly T[], key: (x: T) => string): T[] {
  const seen = new Set<string>();
  return xs.filter((x) => (seen.has(key(x)) ? false : (seen.add(key(x)), true)));
}
function uniqueWorkloads(ws: readonly Workload[]): Workload[] {
  return uniqueBy(ws, workloadId);
}

/** NaN and infinities are not JSON: null. */
function jsonNumbers(_k: string, v: unknown): unknown {
  return typeof v === 'number' && !Number.isFinite(v) ? null : v;
}

