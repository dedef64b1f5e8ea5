/**
 * From results to what people read: every figure beside its baseline as a ratio, the targets
 * with their measured values, terminal tables, and a Markdown report with SVG charts.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { memcpyId } from './baselines.js';
import { renderChart, type BarChart, type ChartRenderer } from './charts.js';
import { configLabel, DEFAULT_CONFIG_LABEL, INDIRECT_SEGMENTS, MATRIX_SEQ_DEPTH, matrixWorkloads } from './matrix.js';
import {
  KiB, MiB, sizeLabel, workloadId, workloadLabel, type BenchDocument, type BenchResults, type InflightNbdRow, type InflightRow, type Row,
  type ServeScalingRow, type StorageKind, type Target, type ThreadsPerf, type ThreadsRow, type TimeRow, type Workload,
} from './types.js';
import { THREAD_ROLES } from './procstat.js';
import { threadsModeLabel, THREADS_LAYOUTS, THREADS_WORKLOADS } from './threads.js';

// ---------------------------------------------------------------------------------------------
// Baselines and targets
// ---------------------------------------------------------------------------------------------

const matrixKey = (storage: StorageKind | undefined, config: string, w: Workload) => `${storage}|${config}|${workloadId(w)}`;

/** Sets every row's `baseline` (and ratio): direct I/O or memory copy, classic, qemu-nbd. */
export function linkBaselines(r: BenchResults): void {
  const byId = new Map(r.baselines.map((b) => [b.id, b]));
  const ref = (row: Row, base: Row | undefined) => {
    if (base === undefined) return;
    row.baseline = { id: base.id, label: base.label, mibps: base.perf.mibps, iops: base.perf.iops, ratio: row.perf.mibps / base.perf.mibps };
  };
  for (const row of r.api) {
    const w = row.workload!;
    ref(row, byId.get(row.storage === 'file' ? `base/file/${workloadId(w)}` : memcpyId(w)));
  }
  const matrix = new Map(r.matrix.map((m) => [matrixKey(m.storage, m.config!, m.workload!), m]));
  for (const row of r.matrix) {
    const order = /ring order (\d+)/.exec(row.config!)?.[1] ?? '0';
    const classic = configLabel(0, Number(order));
    if (row.config !== classic) ref(row, matrix.get(matrixKey(row.storage, classic, row.workload!)));
  }
  for (const row of r.nbd) {
    if (row.config === 'qemu-nbd') continue;
    ref(row, r.nbd.find((q) => q.config === 'qemu-nbd' && q.label === row.label));
  }
}

/** NBD rows of one server for one fio workload. */
const nbdRow = (r: BenchResults, server: string, id: string) => r.nbd.find((n) => n.config === server && n.id.endsWith(`/fio-${id}`));

/** Issue 17's targets, each with its measured value; nothing measured is "not measured", never met. */
export function computeTargets(r: BenchResults): Target[] {
  const api = (id: string) => r.api.find((x) => x.id === id);
  const target = (name: string, goal: string, threshold: number, kind: '>=' | '<=', value: number | undefined, detail: string, unit: Target['unit'] = 'x'): Target => {
    const ok = value !== undefined && Number.isFinite(value);
    return { name, goal, value: ok ? value : undefined, threshold, kind, met: ok ? (kind === '>=' ? value >= threshold : value <= threshold) : undefined, detail, unit };
  };
  const ratioTarget = (name: string, goal: string, threshold: number, row: Row | undefined, what: string): Target =>
    target(name, goal, threshold, '>=', row?.baseline?.ratio,
      row === undefined ? `${what}: not measured` : row.baseline === undefined ? `${what}: baseline not measured`
        : `${what}: ${fmtMiBps(row.perf.mibps)} MiB/s vs ${row.baseline.label} ${fmtMiBps(row.baseline.mibps)} MiB/s`);
  const seq1m8 = api('api/file/read-1m-qd8');
  const rand32 = api('api/file/randread-4k-qd32');
  const kicks = (dir: 'fe' | 'be') => {
    const v = dir === 'fe' ? rand32?.cost?.feSentPerReq : rand32?.cost?.beSentPerReq;
    return target(`notifications per request at QD32, ${dir === 'fe' ? 'frontend -> backend' : 'backend -> frontend'}`, '<= 0.05', 0.05, '<=', v,
      rand32?.cost === undefined ? 'not measured' : `blkfront API, 4 KiB random read QD32, image file: ${fmtPer(v)} kicks per ring request`, 'per');
  };
  const nbdVs = (id: string, label: string, vs: 'qemu-nbd' | 'nbdkit file', threshold: number): Target => {
    const a = nbdRow(r, 'blkif serve', id);
    const b = nbdRow(r, vs, id);
    const v = a !== undefined && b !== undefined ? a.perf.mibps / b.perf.mibps : undefined;
    return target(`NBD: blkif serve vs ${vs}, ${label}`, `>= ${threshold.toFixed(1)}x`, threshold, '>=', v,
      a === undefined || b === undefined ? 'fio nbd engine: not measured' : `fio nbd engine, same image: ${fmtMiBps(a.perf.mibps)} vs ${fmtMiBps(b.perf.mibps)} MiB/s`);
  };
  const qd1 = (vs: 'nbdkit file' | 'qemu-nbd'): Target => {
    const a = nbdRow(r, 'blkif serve', 'randread-4k-qd1');
    const b = nbdRow(r, vs, 'randread-4k-qd1');
    const v = a !== undefined && b !== undefined ? a.perf.p50us / b.perf.p50us : undefined;
    return target(`NBD: blkif serve vs ${vs}, 4 KiB random read QD1, p50 latency`, '<= 1.0x', 1.0, '<=', v,
      a === undefined || b === undefined ? 'fio nbd engine: not measured' : `fio nbd engine, same image: p50 ${fmtUs(a.perf.p50us)} vs ${fmtUs(b.perf.p50us)} µs, p99 ${fmtUs(a.perf.p99us)} vs ${fmtUs(b.perf.p99us)} µs`);
  };
  const sc = r.serveScaling ?? [];
  const s1 = sc.find((s) => s.vbds === 1);
  const s16 = sc.find((s) => s.vbds === 16);
  const worst = sc.filter((s) => s.vbds > 1).reduce<ServeScalingRow | undefined>((a, b) => (a === undefined || b.worstDeviation > a.worstDeviation ? b : a), undefined);
  const perVbd = rssPerVbd(r);
  const classic = (r.inflightNbd ?? []).find((x) => x.indirect === 0 && x.ringPageOrder === 0);
  const ind256 = (r.inflightNbd ?? []).find((x) => x.indirect === 256 && x.ringPageOrder === 0);
  return [
    ratioTarget('blkfront API: 1 MiB sequential read QD8 vs direct pread', '>= 0.6x', 0.6, seq1m8, 'image file, QD8'),
    kicks('fe'),
    kicks('be'),
    nbdVs('randread-4k-qd32', '4 KiB random read QD32', 'nbdkit file', 1.0),
    nbdVs('read-1m-qd32', '1 MiB sequential read QD32', 'nbdkit file', 1.0),
    nbdVs('randread-4k-qd32', '4 KiB random read QD32', 'qemu-nbd', 1.2),
    nbdVs('read-1m-qd32', '1 MiB sequential read QD32', 'qemu-nbd', 1.2),
    nbdVs('randwrite-4k-qd32', '4 KiB random write QD32', 'qemu-nbd', 1.0),
    qd1('nbdkit file'),
    target('scaling: 16 VBDs aggregate vs one VBD', '>= 1.0x', 1.0, '>=', s16 !== undefined && s1 !== undefined ? s16.iops / s1.iops : undefined,
      s16 === undefined || s1 === undefined ? 'not measured' : `blkif serve, fio ${workloadLabel(SCALING_WORKLOAD_REF)} per VBD: ${fmtInt(s16.iops)} vs ${fmtInt(s1.iops)} IOPS`),
    target('scaling fairness: every VBD within 25% of the mean', '<= 25%', 0.25, '<=', worst?.worstDeviation,
      worst === undefined ? 'not measured' : `worst at ${worst.vbds} VBDs: ${fmtInt(Math.min(...worst.perVbd))}..${fmtInt(Math.max(...worst.perVbd))} IOPS, mean ${fmtInt(worst.iops / worst.vbds)}`, '%'),
    target('resident memory per VBD beyond the first', '<= 32 MiB', 32, '<=', perVbd?.mib,
      perVbd === undefined ? 'not measured' : `blkif serve VmRSS: ${fmtBytes(perVbd.one)} with 1 image, ${fmtBytes(perVbd.many)} with ${perVbd.n}`, 'MiB'),
    target('bytes in flight: indirect 256 vs classic', '>= 5x', 5, '>=', classic !== undefined && ind256 !== undefined ? ind256.perf.mibps / classic.perf.mibps : undefined,
      classic === undefined || ind256 === undefined ? 'not measured' : `blkif serve on NBD storage with a fixed latency, fio 1 MiB seq read QD32, ring order 0: ${fmtMiBps(ind256.perf.mibps)} vs ${fmtMiBps(classic.perf.mibps)} MiB/s`),
  ];
}

/** The scaling and isolation workload, for the targets' wording. */
const SCALING_WORKLOAD_REF: Workload = { pattern: 'randread', blockSize: 4 * KiB, depth: 8 };

/** VmRSS growth per image from 1 to the most images measured up to 16. */
export function rssPerVbd(r: BenchResults): { mib: number; one: number; many: number; n: number } | undefined {
  const st = (r.startup ?? []).filter((x) => x.rssBytes !== undefined);
  const one = st.find((x) => x.images === 1);
  const many = st.filter((x) => x.images > 1 && x.images <= 16).sort((a, b) => b.images - a.images)[0];
  if (one === undefined || many === undefined) return undefined;
  return { mib: (many.rssBytes! - one.rssBytes!) / MiB / (many.images - 1), one: one.rssBytes!, many: many.rssBytes!, n: many.images };
}

// ---------------------------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------------------------

const DASH = '–';
const fin = (v: number | undefined): v is number => v !== undefined && Number.isFinite(v);
export const fmtInt = (v: number | undefined) => (fin(v) ? Math.round(v).toLocaleString('en-US') : DASH);
export const fmtMiBps = (v: number | undefined) => (!fin(v) ? DASH : v >= 100 ? fmtInt(v) : v.toPrecision(3));
const fmtUs = (v: number | undefined) => (!fin(v) ? DASH : v >= 100 ? fmtInt(v) : v.toFixed(1));
export const fmtRatio = (v: number | undefined) => (fin(v) ? `${v >= 10 ? v.toFixed(1) : v.toFixed(2)}x` : DASH);
const fmtPer = (v: number | undefined) => (!fin(v) ? DASH : v === 0 ? '0' : v >= 10 ? v.toFixed(1) : v >= 0.01 ? v.toFixed(3) : v.toExponential(1));
export function fmtBytes(n: number | undefined): string {
  if (!fin(n)) return DASH;
  if (n >= MiB) return `${+(n / MiB).toFixed(n >= 10 * MiB ? 1 : 2)} MiB`;
  if (n >= KiB) return `${+(n / KiB).toFixed(1)} KiB`;
  return `${n} B`;
}
const small = (w: Workload | undefined) => w !== undefined && w.blockSize < 64 * KiB;

interface Table {
  headers: string[];
  rows: string[][];
  /** Columns aligned left (the others right). */
  left?: number[];
}

function mdTable(t: Table): string {
  const left = new Set(t.left ?? [0]);
  const esc = (s: string) => s.replace(/\|/g, '\\|');
  return [
    `| ${t.headers.map(esc).join(' | ')} |`,
    `|${t.headers.map((_, i) => (left.has(i) ? ':---' : '---:')).join('|')}|`,
    ...t.rows.map((r) => `| ${r.map(esc).join(' | ')} |`),
  ].join('\n') + '\n';
}

function textTable(t: Table, indent = '  '): string {
  const left = new Set(t.left ?? [0]);
  const w = t.headers.map((h, i) => Math.max(h.length, ...t.rows.map((r) => (r[i] ?? '').length)));
  const line = (r: string[]) => indent + r.map((c, i) => (left.has(i) ? c.padEnd(w[i]!) : c.padStart(w[i]!))).join('  ').trimEnd();
  return [line(t.headers), indent + w.map((n) => '-'.repeat(n)).join('  '), ...t.rows.map(line)].join('\n') + '\n';
}

// ---------------------------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------------------------

function fmtTarget(t: Target): string {
  switch (t.unit ?? (t.kind === '<=' ? 'per' : 'x')) {
    case '%': return fin(t.value) ? `${(t.value * 100).toFixed(0)}%` : DASH;
    case 'MiB': return fin(t.value) ? `${t.value.toFixed(1)} MiB` : DASH;
    case 'per': return fmtPer(t.value);
    default: return fmtRatio(t.value);
  }
}

function targetsTable(ts: Target[]): Table {
  return {
    headers: ['target', 'goal', 'measured', 'result', 'what was compared'],
    rows: ts.map((t) => [t.name, t.goal, fmtTarget(t), t.met === undefined ? 'not measured' : t.met ? 'met' : 'not met', t.detail]),
    left: [0, 1, 3, 4],
  };
}

function perfTable(rows: Row[], baselineHeader: string): Table {
  return {
    headers: ['workload', 'IOPS', 'MiB/s', 'p50 µs', 'p99 µs', baselineHeader, 'baseline IOPS', 'baseline MiB/s', 'ratio'],
    rows: rows.map((r) => [
      r.label, fmtInt(r.perf.iops), fmtMiBps(r.perf.mibps), fmtUs(r.perf.p50us), fmtUs(r.perf.p99us),
      r.baseline?.label ?? DASH, fmtInt(r.baseline?.iops), fmtMiBps(r.baseline?.mibps), fmtRatio(r.baseline?.ratio),
    ]),
    left: [0, 5],
  };
}

function matrixTable(rows: Row[], storage: StorageKind): Table | undefined {
  const mine = rows.filter((r) => r.storage === storage);
  if (mine.length === 0) return undefined;
  const ws = matrixWorkloads();
  const configs = [...new Set(mine.map((r) => r.config!))];
  const cell = (c: string, w: Workload) => {
    const r = mine.find((x) => x.config === c && workloadId(x.workload!) === workloadId(w));
    if (r === undefined) return DASH;
    const v = small(w) ? fmtInt(r.perf.iops) : fmtMiBps(r.perf.mibps);
    return r.baseline === undefined ? v : `${v} (${fmtRatio(r.baseline.ratio)})`;
  };
  return {
    headers: ['configuration', ...ws.map((w) => `${workloadLabel(w)} ${small(w) ? 'IOPS' : 'MiB/s'}`)],
    rows: configs.map((c) => [c, ...ws.map((w) => cell(c, w))]),
  };
}

function costTable(rows: Row[], withConfig: boolean): Table {
  return {
    headers: [...(withConfig ? ['configuration'] : []), 'workload', 'requests/I/O', 'fe->be kicks/req sent / recv', 'be->fe kicks/req sent / recv', 'notifications/req', 'grant maps/req', 'segments/req', 'indirect', 'requests/MiB'],
    rows: rows.filter((r) => r.cost !== undefined).map((r) => {
      const c = r.cost!;
      return [
        ...(withConfig ? [r.config ?? DASH] : []), r.label, fmtPer(c.requestsPerIo), `${fmtPer(c.feSentPerReq)} / ${fmtPer(c.beReceivedPerReq)}`,
        `${fmtPer(c.beSentPerReq)} / ${fmtPer(c.feReceivedPerReq)}`, fmtPer(c.notificationsPerReq), fmtPer(c.grantMapsPerReq), fmtPer(c.segmentsPerReq),
        fin(c.indirectShare) ? `${Math.round(c.indirectShare * 100)}%` : DASH, fmtPer(c.requestsPerMiB),
      ];
    }),
    left: withConfig ? [0, 1] : [0],
  };
}

/** The seed's in-flight arithmetic, for the configurations it names. */
function seedClaim(r: InflightRow): string {
  if (r.indirect === 0 && r.ringPageOrder === 0) return '11 x 32 = 1.4 MiB';
  if (r.indirect === 256 && r.ringPageOrder === 0) return '256 x 32 = 32 MiB';
  if (r.indirect === 4096 && r.ringPageOrder === 0) return '8 x 512 x 32 = 512 MiB';
  return '';
}

function inflightTable(rows: InflightRow[]): Table {
  const modes = (['sync', 'async'] as const).filter((m) => rows.some((r) => r.measured[m] !== undefined));
  return {
    headers: ['configuration', 'I/O size', 'segments x slots', 'limit (x 4 KiB)', "seed's figure", 'at this I/O size', 'pool pages', 'reachable here',
      ...modes.flatMap((m) => [`peak, ${m} file I/O`, 'vs reachable', `MiB/s (${m})`])],
    rows: rows.map((r) => [
      r.config, sizeLabel(r.blockSize), `${r.segments} x ${r.slots}`, fmtBytes(r.limitBytes), seedClaim(r), fmtBytes(r.limitAtBlockBytes),
      `${fmtInt(r.bufferPages)}${r.grantCapped ? ' (grant table cap)' : ''}`, fmtBytes(r.reachableBytes),
      ...modes.flatMap((m) => {
        const v = r.measured[m];
        return v === undefined ? [DASH, DASH, DASH] : [fmtBytes(v.peakBytes), fmtRatio(v.peakBytes / r.reachableBytes), fmtMiBps(v.mibps)];
      }),
    ]),
    left: [0, 4],
  };
}

function baselinesTable(rows: Row[]): Table {
  return {
    headers: ['baseline', 'IOPS', 'MiB/s', 'p50 µs', 'p99 µs'],
    rows: rows.map((r) => [r.label, fmtInt(r.perf.iops), fmtMiBps(r.perf.mibps), fmtUs(r.perf.p50us), fmtUs(r.perf.p99us)]),
  };
}

const NBD_SERVERS = ['blkif serve', 'qemu-nbd', 'nbdkit file'];

function nbdTable(rows: Row[]): Table {
  const vs = (r: Row, server: string) => {
    const b = rows.find((x) => x.config === server && x.label === r.label);
    return r.config === server ? '1.00x (baseline)' : b === undefined ? DASH : fmtRatio(r.perf.mibps / b.perf.mibps);
  };
  const order = (r: Row) => NBD_SERVERS.indexOf(r.config ?? '');
  return {
    headers: ['client', 'server', 'IOPS', 'MiB/s', 'p50 µs', 'p99 µs', 'seconds', 'vs qemu-nbd', 'vs nbdkit file'],
    rows: [...rows].sort((a, b) => a.label.localeCompare(b.label) || order(a) - order(b)).map((r) => [
      r.label, r.config ?? DASH, r.label.startsWith('nbdcopy') ? DASH : fmtInt(r.perf.iops), fmtMiBps(r.perf.mibps), fmtUs(r.perf.p50us), fmtUs(r.perf.p99us),
      r.perf.seconds.toFixed(2), vs(r, 'qemu-nbd'), vs(r, 'nbdkit file'),
    ]),
    left: [0, 1],
  };
}

/** A single request's latency (fio QD1): each server's p50 and p99, and blkif serve's against each (lower is better). */
function qd1Table(rows: Row[]): Table | undefined {
  const at = rows.filter((r) => r.workload?.depth === 1);
  if (at.length === 0) return undefined;
  const base = (server: string, label: string) => at.find((x) => x.config === server && x.label === label);
  const vs = (r: Row, server: string, k: 'p50us' | 'p99us') => {
    const b = base(server, r.label);
    return r.config === server ? '1.00x (baseline)' : b === undefined ? DASH : fmtRatio(r.perf[k] / b.perf[k]);
  };
  const order = (r: Row) => NBD_SERVERS.indexOf(r.config ?? '');
  return {
    headers: ['client', 'server', 'p50 µs', 'p99 µs', 'p50 vs nbdkit file', 'p99 vs nbdkit file', 'p50 vs qemu-nbd', 'p99 vs qemu-nbd'],
    rows: [...at].sort((a, b) => a.label.localeCompare(b.label) || order(a) - order(b)).map((r) => [
      r.label, r.config ?? DASH, fmtUs(r.perf.p50us), fmtUs(r.perf.p99us), vs(r, 'nbdkit file', 'p50us'), vs(r, 'nbdkit file', 'p99us'), vs(r, 'qemu-nbd', 'p50us'), vs(r, 'qemu-nbd', 'p99us'),
    ]),
    left: [0, 1],
  };
}

const rate = (w: Workload, p: { iops: number; mibps: number }) => (small(w) ? `${fmtInt(p.iops)} IOPS` : `${fmtMiBps(p.mibps)} MiB/s`);
const roleShort: Record<string, string> = {
  'guests (blkfront, NBD)': 'guests', 'driver domain': 'driver domain', 'queue threads': 'queue threads', 'main thread': 'main thread', 'V8 and libuv helpers': 'V8/libuv helpers',
};
const sumRec = (r: Record<string, number>) => Object.values(r).filter(fin).reduce((a, b) => a + b, 0);

/** CPU µs per request (or I/O) of each thread role, and the sleeps (wake-ups) of all threads. */
function timeCpuTable(rows: TimeRow[]): Table {
  return {
    headers: ['where', 'workload', 'rate', 'per', ...THREAD_ROLES.map((r) => `${roleShort[r]} µs`), 'CPU µs in all', 'thread sleeps'],
    rows: rows.map((t) => [
      t.where, workloadLabel(t.workload), rate(t.workload, t.perf), t.per, ...THREAD_ROLES.map((r) => fmtUs(t.cpuUs[r])), fmtUs(sumRec(t.cpuUs)), fmtPer(sumRec(t.sleeps)),
    ]),
    left: [0, 1, 3],
  };
}

/** Kicks, Xen sleeps, grant operations, copies and allocation per request (or I/O). */
function timeEventsTable(rows: TimeRow[]): Table {
  const pair = (v: { guest: number; backend: number } | undefined) => (v === undefined ? DASH : `${fmtPer(v.guest)} / ${fmtPer(v.backend)}`);
  return {
    headers: ['where', 'workload', 'per', 'fe->be kicks', 'be->fe kicks', 'Xen sleeps guest / driver', 'grant maps', 'grant copies', 'bytes copied', 'scavenges per 1,000 guest / driver'],
    rows: rows.map((t) => [
      t.where, workloadLabel(t.workload), t.per, fmtPer(t.feToBe), fmtPer(t.beToFe), pair(t.xenSleeps), fmtPer(t.grantMaps), fmtPer(t.grantCopies),
      t.copyBytes === undefined ? DASH : fmtBytes(t.copyBytes), pair(t.scavengesPerK),
    ]),
    left: [0, 1, 2],
  };
}

/** One line per row: the role that spends the most CPU per request, and its share. */
export function timeReading(rows: TimeRow[]): string[] {
  return rows.filter((t) => sumRec(t.cpuUs) > 0).map((t) => {
    const all = sumRec(t.cpuUs);
    const [role, us] = Object.entries(t.cpuUs).filter(([, v]) => fin(v)).sort((a, b) => b[1] - a[1])[0]!;
    return `- ${t.where}, ${workloadLabel(t.workload)}: ${fmtUs(all)} µs of CPU per ${t.per}, ${Math.round((us / all) * 100)}% of it in the ${roleShort[role] ?? role} (${fmtUs(us)} µs).`;
  });
}

/**
 * The speed targets not met, each read against the profile of the same run ("where the time
 * goes"): the row of the same path and workload, and what its figures point at.
 */
export function missedReading(targets: readonly Target[], rows: readonly TimeRow[]): string[] {
  const out: string[] = [];
  for (const t of targets) {
    if (t.met !== false) continue;
    const api = t.name.startsWith('blkfront API');
    const big = /1 MiB/.test(t.name);
    const pattern = /random write/.test(t.name) ? 'randwrite' : /random read/.test(t.name) ? 'randread' : 'read';
    const depth = Number(/QD(\d+)/.exec(t.name)?.[1]);
    const row = rows.find((r) => r.where === (api ? 'blkfront API' : 'blkif serve') && r.workload.pattern === pattern && (r.workload.blockSize >= MiB) === big && (api || r.workload.depth === depth));
    if (row === undefined) continue;
    const all = sumRec(row.cpuUs);
    const roles = Object.entries(row.cpuUs).filter(([, v]) => fin(v) && v > 0).sort((a, b) => b[1] - a[1]).map(([r, v]) => `${roleShort[r] ?? r} ${fmtUs(v)}`).join(', ');
    const maps = row.grantMaps !== undefined && row.grantMaps >= 1 ? `, ${fmtUs(row.grantMaps)} grant maps` : '';
    const why = big
      ? 'a 1 MiB request is 257 pages; past 1,056 in flight the backend\'s persistent-grant cache (Linux\'s max_persistent_grants) is full, so most pages are mapped and unmapped per request, and the file\'s preadv scatters into 256 separate pages'
      : depth === 1
        ? 'at QD1 every hop finds its thread asleep: fio -> the guest\'s thread (socket) -> the driver domain\'s (event channel) -> the guest\'s -> fio, each wake-up ~60 µs here, where the other servers answer from the thread that read the request (two wake-ups); the threads poll 50 µs before sleeping, shorter than the round trip, so at QD1 the polling is spent and they sleep anyway'
        : 'each I/O crosses two threads (the guest\'s: NBD and blkfront; the driver domain\'s, which reads the file in place when it serves one VBD), each hop a possible wake-up, on 2 cores shared with fio, where the other servers answer from the thread that read the request';
    out.push(`- ${t.name} (${t.kind} ${t.threshold}${t.kind === '>=' ? 'x' : ''}, measured ${t.value === undefined ? DASH : t.value.toFixed(2)}): ${fmtUs(all)} µs of CPU per ${row.per} (${roles}), ${fmtUs(sumRec(row.sleeps))} thread sleeps${maps} per ${row.per}: ${why}. docs/architecture.md ("Performance") says what would change it.`);
  }
  return out;
}

function startupTable(r: BenchResults): Table {
  const st = r.startup ?? [];
  const one = st.find((x) => x.images === 1)?.rssBytes;
  return {
    headers: ['images', 'time to ready s', 'idle CPU %', 'idle over s', 'VmRSS', 'MiB per image beyond the first'],
    rows: st.map((x) => [
      String(x.images), x.readySeconds.toFixed(1), x.idleCpuPercent.toFixed(1), String(x.idleSeconds), fmtBytes(x.rssBytes),
      x.images > 1 && one !== undefined && x.rssBytes !== undefined ? ((x.rssBytes - one) / MiB / (x.images - 1)).toFixed(1) : DASH,
    ]),
  };
}

function serveScalingTable(rows: ServeScalingRow[]): Table {
  return {
    headers: ['VBDs', 'aggregate IOPS', 'MiB/s', 'vs 1 VBD', 'slowest VBD vs mean', 'fastest VBD vs mean', 'worst deviation', 'mean p50 µs', 'worst p99 µs'],
    rows: rows.map((s) => {
      const mean = s.iops / s.vbds;
      return [String(s.vbds), fmtInt(s.iops), fmtMiBps(s.mibps), fmtRatio(s.ratio), fmtRatio(Math.min(...s.perVbd) / mean), fmtRatio(Math.max(...s.perVbd) / mean),
        `${(s.worstDeviation * 100).toFixed(0)}%`, fmtUs(s.p50us), fmtUs(s.p99us)];
    }),
  };
}

function isolationTable(r: BenchResults): Table | undefined {
  const x = r.isolation;
  if (x === undefined) return undefined;
  const line = (what: string, p: typeof x.alone, base: typeof x.alone | undefined) => [what, fmtInt(p.iops), fmtMiBps(p.mibps), fmtUs(p.p50us), fmtUs(p.p99us), base === undefined ? DASH : fmtRatio(p.iops / base.iops)];
  return {
    headers: ['VBD', 'IOPS', 'MiB/s', 'p50 µs', 'p99 µs', 'vs alone'],
    rows: [
      line('vbd1 (image file) alone', x.alone, undefined),
      line('vbd1 (image file) beside busy vbd0', x.beside, x.alone),
      line(`vbd0 (nbdkit memory, ${x.delayMs} ms per request), at the same time`, x.slow, undefined),
    ],
  };
}

const inflightLabel = (x: InflightNbdRow) => `${x.indirect === 0 ? 'classic' : `indirect ${x.indirect}`}, ring order ${x.ringPageOrder}`;
/** Ring slots x segments x 4 KiB, for requests no larger than fio's 1 MiB I/Os. */
const atOneMiB = (x: InflightNbdRow) => Math.min(x.segments, 256) * x.slots * 4096;

/** nbdkit serves at most --threads requests at once (16 by default, what documents without the parameter ran). */
const nbdkitThreads = (doc: BenchDocument) => Number(doc.parameters['inflightNbdThreads'] ?? 16);
/** MiB/s nbdkit's threads allow at a fixed latency, for requests of this configuration's size (at most 1 MiB, fio's). */
const storageCeiling = (x: InflightNbdRow, delayMs: number, threads: number) => (Math.min(threads, x.slots) * Math.min(x.segments, 256) * 4096) / MiB / (delayMs / 1000);

function inflightNbdTable(doc: BenchDocument): Table {
  const rows = doc.results.inflightNbd ?? [];
  const delayMs = Number(doc.parameters['inflightDelayMs']);
  const threads = nbdkitThreads(doc);
  const classic = (o: number) => rows.find((x) => x.indirect === 0 && x.ringPageOrder === o);
  const alone = doc.results.inflightNbdStorage;
  return {
    headers: ['configuration', 'segments x slots', 'bytes in flight (x 4 KiB)', 'at 1 MiB I/Os', 'MiB/s', 'vs classic', 'peak in flight (blkback)', `ceiling of ${threads} nbdkit threads, MiB/s`, 'serve CPU %', 'p50 µs', 'p99 µs'],
    rows: [
      ...[...rows].sort((a, b) => a.bytesInFlight - b.bytesInFlight).map((x) => {
        const c = classic(x.ringPageOrder);
        return [inflightLabel(x), `${x.segments} x ${x.slots}`, fmtBytes(x.bytesInFlight), fmtBytes(atOneMiB(x)), fmtMiBps(x.perf.mibps),
          c === undefined ? DASH : c === x ? '1.00x (baseline)' : fmtRatio(x.perf.mibps / c.perf.mibps), fmtBytes(x.peakBytes), fmtMiBps(storageCeiling(x, delayMs, threads)), fin(x.cpuPercent) ? x.cpuPercent.toFixed(0) : DASH, fmtUs(x.perf.p50us), fmtUs(x.perf.p99us)];
      }),
      // The storage's own ceiling: the same fio job straight at nbdkit, no blkif in between.
      ...(alone === undefined ? [] : [['the storage alone (fio straight at nbdkit)', DASH, DASH, fmtBytes(32 * MiB), fmtMiBps(alone.perf.mibps),
        classic(0) === undefined ? DASH : fmtRatio(alone.perf.mibps / classic(0)!.perf.mibps), DASH, fmtMiBps((Math.min(threads, 32) * MiB) / MiB / (delayMs / 1000)), DASH, fmtUs(alone.perf.p50us), fmtUs(alone.perf.p99us)]]),
    ],
    left: [0],
  };
}

/** Why bytes in flight stop helping: what reached the storage, beside the limits on the way. */
export function inflightReading(doc: BenchDocument): string {
  const rows = doc.results.inflightNbd ?? [];
  if (rows.length === 0) return '';
  const delay = Number(doc.parameters['inflightDelayMs']);
  const threads = nbdkitThreads(doc);
  const alone = doc.results.inflightNbdStorage;
  const best = rows.reduce((a, b) => (b.perf.mibps > a.perf.mibps ? b : a));
  // With a fixed latency, throughput is the bytes in service at the storage over that latency.
  const atStorage = (best.perf.mibps * MiB * delay) / 1000;
  return `With ${delay} ms per request at the storage, throughput is what is in service there over ${delay} ms: the best configuration here (${inflightLabel(best)}, ${fmtMiBps(best.perf.mibps)} MiB/s) kept about ${fmtBytes(atStorage)} in service on average, `
    + `beside blkback's measured peak of ${fmtBytes(best.peakBytes)} in flight and a ring limit of ${fmtBytes(atOneMiB(best))} at 1 MiB I/Os. `
    + `Other limits on the way: fio's queue (32 x 1 MiB = 32 MiB), nbdkit's --threads (${threads}: at most ${threads} requests in service, ${fmtBytes(threads * Math.min(best.segments, 256) * 4096)} at this request size)`
    + (() => {
      const c = rows.find((x) => x.indirect === 0 && x.ringPageOrder === 0);
      return c === undefined ? '' : ` — which would hold classic (${c.segments}-segment requests) to ${fmtMiBps(storageCeiling(c, delay, threads))} MiB/s, so indirect 256 meets 5x classic at ${fmtMiBps(5 * c.perf.mibps)} MiB/s or more`;
    })()
    + (alone === undefined ? '' : `; the storage alone, the same fio job straight at it, gave ${fmtMiBps(alone.perf.mibps)} MiB/s (its own ceiling: nbdkit's CPU and socket, not its threads)`)
    + (fin(best.cpuPercent) ? `, and the CPU: blkif serve's threads used ${best.cpuPercent.toFixed(0)}% of one core meanwhile, on a machine of ${doc.machine.cpus} (${doc.machine.cpus * 100}%), where fio and nbdkit run too.` : '.');
}

/** "4 KiB randread QD32": short enough for a chart's legend. */
const shortWorkload = (w: Workload) => `${sizeLabel(w.blockSize)} ${w.pattern} QD${w.depth}`;

/** Documents written before the section existed have no `threads`. */
const threadsOf = (r: BenchResults): ThreadsRow[] => r.threads ?? [];

function threadsTable(rows: ThreadsRow[]): Table {
  const rate = (p: ThreadsPerf, w: Workload) => (small(w) ? `${fmtInt(p.iops)} IOPS` : `${fmtMiBps(p.mibps)} MiB/s`);
  return {
    headers: ['layout', 'workload', `${threadsModeLabel(false)}`, 'p50 µs', 'p99 µs', `${threadsModeLabel(true)}`, 'p50 µs', 'p99 µs', 'threaded / in thread'],
    rows: rows.map((t) => [
      t.layout, workloadLabel(t.workload),
      rate(t.inThread, t.workload), fmtUs(t.inThread.p50us), fmtUs(t.inThread.p99us),
      rate(t.threaded, t.workload), fmtUs(t.threaded.p50us), fmtUs(t.threaded.p99us), fmtRatio(t.ratio),
    ]),
    left: [0, 1],
  };
}

/** One sentence: what threads bought or cost on this run, and why. */
export function threadsReading(doc: BenchDocument): string {
  const rows = threadsOf(doc.results).filter((t) => fin(t.ratio));
  if (rows.length === 0) return '';
  const cpus = doc.machine.cpus;
  const lo = Math.min(...rows.map((t) => t.ratio));
  const hi = Math.max(...rows.map((t) => t.ratio));
  const range = lo === hi ? fmtRatio(lo) : `${fmtRatio(lo)} to ${fmtRatio(hi)}`;
  const best = rows.reduce((a, b) => (b.ratio > a.ratio ? b : a));
  const worst = rows.reduce((a, b) => (b.ratio < a.ratio ? b : a));
  const verdict = lo >= 1.05 ? `buys throughput everywhere (${range})`
    : hi <= 0.95 ? `costs throughput everywhere (${range})`
    : hi < 1.05 && lo > 0.95 ? `changes little (${range})`
    : `buys ${fmtRatio(best.ratio)} on ${best.layout}, ${workloadLabel(best.workload)} but gives ${fmtRatio(worst.ratio)} on ${worst.layout}, ${workloadLabel(worst.workload)}`;
  // The busiest layout: its queue threads, the backend's own thread and one thread per guest.
  const busiest = Math.max(...THREADS_LAYOUTS.map((l) => l.vbds * l.queues + 1 + l.vbds));
  const cores = busiest > cpus
    ? `but with up to ${busiest} threads busy at once (queue threads, the backend's own, the guests') on ${cpus} cores, more threads than cores contend for them, `
    : `and there are cores enough for the up to ${busiest} threads busy at once, `;
  return `On this ${cpus}-CPU machine a thread per queue ${verdict}: each queue thread reads the image through its own handle, so queues overlap their reads, `
    + cores + 'and every answer that finds a queue thread asleep pays for waking it (about 60 µs), which one thread kept busy by every queue pays less often.';
}

function microTables(doc: BenchDocument): { title: string; table: Table }[] {
  const fmt = (v: number) => (v >= 100 ? fmtInt(v) : v.toPrecision(3));
  return doc.results.micro.map((m) => ({
    title: m.suite,
    table: { headers: ['figure', 'value', 'unit'], rows: m.figures.map((f) => [f.name, fmt(f.value), f.unit]), left: [0, 2] },
  }));
}

function machineLines(doc: BenchDocument): string[] {
  const m = doc.machine;
  return [
    `CPU: ${m.cpuModel} x ${m.cpus}`,
    `memory: ${(m.totalMemoryBytes / 1024 ** 3).toFixed(1)} GiB`,
    `OS: ${m.os} ${m.kernel} (${m.arch}), Node ${m.node}`,
    `load average at start: ${m.loadAverageAtStart.join(', ')}`,
    `tools: ${Object.entries(m.tools).map(([k, v]) => `${k}: ${v}`).join('; ')}`,
  ];
}

// ---------------------------------------------------------------------------------------------
// Terminal
// ---------------------------------------------------------------------------------------------

export function renderText(doc: BenchDocument): string {
  const r = doc.results;
  const out: string[] = [];
  const section = (title: string, t: Table | undefined) => {
    if (t === undefined || t.rows.length === 0) return;
    out.push(`\n${title}\n${textTable(t)}`);
  };
  out.push(`\nblkif bench (${doc.quick ? 'quick' : 'full'} run, ${doc.seconds.toFixed(0)} s) on ${doc.machine.cpuModel} x ${doc.machine.cpus}, Node ${doc.machine.node}`);
  section('targets', targetsTable(doc.targets));
  for (const s of ['file', 'memory'] as const) section(`blkfront API, ${DEFAULT_CONFIG_LABEL}, ${storageName(s)}`, perfTable(r.api.filter((x) => x.storage === s), 'baseline'));
  for (const s of ['file', 'memory'] as const) section(`protocol matrix, ${storageName(s)} (ratio vs classic at the same ring order)`, matrixTable(r.matrix, s));
  section('protocol cost per request, default configuration, image file', costTable(r.api.filter((x) => x.storage === 'file'), false));
  section('protocol cost per request, matrix, image file', costTable(r.matrix.filter((x) => x.storage === 'file'), true));
  section(`bytes in flight`, inflightTable(r.inflight));
  section('baselines', baselinesTable(r.baselines));
  section('where the time goes: CPU µs per request (or I/O) by thread, and sleeps', timeCpuTable(r.time ?? []));
  section('where the time goes: events per request (or I/O)', timeEventsTable(r.time ?? []));
  section('NBD servers side by side (fio nbd engine, same image)', nbdTable(r.nbd));
  section('NBD servers: latency of a single request (QD1; ratios of latency, lower is better)', qd1Table(r.nbd));
  section('blkif serve: start-up and idle', startupTable(r));
  section('blkif serve: scaling by VBD count (a fio job per VBD)', serveScalingTable(r.serveScaling ?? []));
  section('blkif serve: isolation', isolationTable(r));
  section('blkif serve: bytes in flight on fixed-latency storage', inflightNbdTable(doc));
  section("queues in threads, image file (queueThreads: false vs true; ratio on throughput)", threadsTable(threadsOf(r)));
  for (const m of microTables(doc)) section(m.title, m.table);
  if (r.skipped.length > 0) out.push(`\nskipped:\n${r.skipped.map((s) => `  ${s.what}: ${s.why}`).join('\n')}\n`);
  if (doc.report !== undefined) out.push(`\nreport: ${doc.report}\n`);
  return out.join('');
}

const storageName = (s: StorageKind) => (s === 'file' ? 'image file (warm in the page cache)' : 'memory disk');

// ---------------------------------------------------------------------------------------------
// Markdown report and charts
// ---------------------------------------------------------------------------------------------

interface ChartFile { file: string; title: string; chart: BarChart }

function charts(doc: BenchDocument): ChartFile[] {
  const r = doc.results;
  const out: ChartFile[] = [];
  // Throughput vs request size, classic vs indirect (ring order 0, image file).
  const sizes = [...new Set(matrixWorkloads().filter((w) => w.pattern === 'read').map((w) => w.blockSize))];
  const series = INDIRECT_SEGMENTS.map((n) => configLabel(n, 0)).filter((c) => r.matrix.some((m) => m.config === c && m.storage === 'file'));
  if (series.length > 0) {
    out.push({
      file: 'throughput-vs-request-size.svg',
      title: 'Throughput vs request size, classic vs indirect',
      chart: {
        title: `Sequential read QD${MATRIX_SEQ_DEPTH} through blkfront, image file, ring order 0`, unit: 'MiB/s', xTitle: 'request size',
        groups: sizes.map(sizeLabel), series: series.map((s) => s.replace(', ring order 0', '')),
        values: sizes.map((bs) => series.map((c) => r.matrix.find((m) => m.storage === 'file' && m.config === c && m.workload?.pattern === 'read' && m.workload.blockSize === bs)?.perf.mibps)),
      },
    });
  }
  const servers = NBD_SERVERS.filter((sv) => r.nbd.some((n) => n.config === sv));
  const tests = [...new Set(r.nbd.map((n) => n.label))];
  if (servers.length > 0) {
    out.push({
      file: 'nbd-servers.svg',
      title: 'NBD servers side by side',
      chart: {
        title: 'blkif serve, qemu-nbd and nbdkit file on the same image, fio nbd engine', unit: 'MiB/s', format: fmtMiBps,
        groups: tests, series: servers,
        values: tests.map((t) => servers.map((sv) => r.nbd.find((n) => n.label === t && n.config === sv)?.perf.mibps)),
      },
    });
  }
  const sc = r.serveScaling ?? [];
  if (sc.length > 0) {
    out.push({
      file: 'scaling.svg',
      title: 'Scaling by VBD count',
      chart: {
        title: 'blkif serve: aggregate 4 KiB random read (fio QD8 per VBD)', unit: 'IOPS', xTitle: 'VBDs', format: fmtInt,
        groups: sc.map((x) => String(x.vbds)), series: ['aggregate IOPS', 'slowest VBD x VBDs'],
        values: sc.map((x) => [x.iops, Math.min(...x.perVbd) * x.vbds]),
      },
    });
  }
  const inf = [...(r.inflightNbd ?? [])].sort((a, b) => a.bytesInFlight - b.bytesInFlight);
  if (inf.length > 0) {
    const orders = [...new Set(inf.map((x) => x.ringPageOrder))].sort((a, b) => a - b);
    const groups = [...new Map(inf.map((x) => [x.indirect, x])).values()];
    out.push({
      file: 'bytes-in-flight.svg',
      title: 'Throughput against bytes in flight',
      chart: {
        title: `blkif serve on NBD storage with ${String(doc.parameters['inflightDelayMs'])} ms per request: fio 1 MiB seq read QD32`, unit: 'MiB/s', format: fmtMiBps,
        xTitle: 'segments per request (bytes in flight = ring slots x segments x 4 KiB)',
        groups: groups.map((g) => (g.indirect === 0 ? 'classic (11)' : `indirect ${g.indirect}`)),
        series: orders.map((o) => `ring order ${o} (${32 << o} slots)`),
        values: groups.map((g) => orders.map((o) => inf.find((x) => x.indirect === g.indirect && x.ringPageOrder === o)?.perf.mibps)),
      },
    });
  }
  const threads = threadsOf(r);
  if (threads.length > 0) {
    const layouts = THREADS_LAYOUTS.filter((l) => threads.some((t) => t.layout === l.layout));
    const ws = THREADS_WORKLOADS.filter((w) => threads.some((t) => workloadId(t.workload) === workloadId(w)));
    out.push({
      file: 'queues-in-threads.svg',
      title: 'Queues in threads',
      chart: {
        title: 'A thread per queue vs the backend\'s thread: throughput ratio (1 = no change), image file', unit: 'threaded / in thread', xTitle: 'layout',
        groups: layouts.map((l) => l.layout), series: ws.map(shortWorkload), valueFormat: '.2f',
        values: layouts.map((l) => ws.map((w) => threads.find((t) => t.layout === l.layout && workloadId(t.workload) === workloadId(w))?.ratio)),
      },
    });
  }
  return out;
}

function markdown(doc: BenchDocument, chartDir: string, rendered: Map<string, ChartRenderer>): string {
  const r = doc.results;
  const L: string[] = [];
  const img = (file: string, alt: string) => (rendered.has(file) ? `![${alt}](${chartDir}${file})\n` : '');
  const chartsByFile = new Map(charts(doc).map((c) => [c.file, c]));
  const chartImg = (file: string) => { const c = chartsByFile.get(file); return c === undefined ? '' : img(file, c.title); };
  L.push('# blkif benchmarks: what indirect descriptors buy', '');
  L.push(`Generated by \`${doc.command}\` on ${doc.startedAt}, ${doc.quick ? 'quick' : 'full'} run, ${doc.seconds.toFixed(0)} s.`,
    'Benchmarks assert nothing about speed: every figure stands beside its baseline as a ratio (figure / baseline, on throughput).', '');
  L.push('## Machine', '', ...machineLines(doc).map((l) => `- ${l}`), '');
  L.push('## Targets', '', mdTable(targetsTable(doc.targets)));
  const time = r.time ?? [];
  const missed = missedReading(doc.targets, time);
  if (missed.length > 0) L.push('Speed targets not met, read against this run\'s profile (next section):', '', ...missed, '');
  if (time.length > 0) {
    L.push('## Where the time goes', '',
      'Per ring request through the blkfront API (the guest and driver domain are threads of the bench), and per client I/O through `blkif serve` (a child: its threads read from /proc). '
      + 'CPU time is each thread\'s utime + stime (/proc/PID/task/TID/stat), by role: domain threads carry their domain\'s name (vCPU N: name/N), so guests (blkfront, and under serve the NBD server), the driver domain, its queue threads, the main thread (toolstack, xenstored) and the rest (V8\'s and libuv\'s threads) are told apart. '
      + 'Thread sleeps are voluntary context switches (each ends in a wake-up). Kicks are blkback\'s event-channel counters; Xen sleeps are waits in the emulated Xen that went to sleep in Atomics.waitAsync; grant copies and bytes copied are GNTTABOP_copy operations (blkfront\'s and blkback\'s own Buffer copies are not counted); '
      + 'allocation is V8 scavenges per 1,000 requests (each one a young generation filled) in each domain\'s threads. Use it to pick what to change, and judge the change by it.', '',
      mdTable(timeCpuTable(time)), mdTable(timeEventsTable(time)), ...timeReading(time), '');
  }

  L.push(`## 1. Through the blkfront API (${DEFAULT_CONFIG_LABEL})`, '',
    'The workload runs inside the guest\'s thread against its blkfront (no NBD, no control-channel hop per I/O); blkback in the driver domain serves it.',
    'Baselines: on the image file, the same I/O issued directly by this process (pread/pwrite on one thread at QD1, fs.read/fs.write on the libuv pool at higher depths);',
    'on the memory disk, Buffer.copy of the same blocks (the memory disk\'s ceiling).', '');
  for (const s of ['file', 'memory'] as const) {
    const rows = r.api.filter((x) => x.storage === s);
    if (rows.length > 0) L.push(`### ${storageName(s)}`, '', mdTable(perfTable(rows, 'baseline')));
  }

  L.push('## 2. Protocol matrix', '',
    `Backend \`maxIndirectSegments\` 0 (classic: 11 segments per request), 32, 256, 4096 with the frontend's cap set equal; ring page order 0 (32 slots) and 4 (512 slots). Cells: throughput (ratio vs classic at the same ring order). Sequential workloads at QD${MATRIX_SEQ_DEPTH}.`, '');
  for (const s of ['file', 'memory'] as const) {
    const t = matrixTable(r.matrix, s);
    if (t !== undefined) L.push(`### ${storageName(s)}`, '', mdTable(t));
  }
  L.push(chartImg('throughput-vs-request-size.svg'));
  const skippedMatrix = r.skipped.filter((x) => x.what.startsWith('matrix: '));
  if (skippedMatrix.length > 0) L.push(`Declared in the matrix but skipped until blkback and blkfront have the options: ${skippedMatrix.map((x) => x.what.replace(/^matrix: /, '')).join('; ')} (see "Skipped").`, '');

  L.push('## 3. Protocol cost per request', '',
    'From the counters of both ends, before and after each run: event-channel kicks each way (sent by one end / received by the other), grant map operations by the backend (data pages and indirect pages), segments, and ring slots (requests) per MiB moved.', '');
  L.push('### Default configuration, image file', '', mdTable(costTable(r.api.filter((x) => x.storage === 'file'), false)));
  const mf = r.matrix.filter((x) => x.storage === 'file');
  if (mf.length > 0) L.push('### Matrix, image file', '', mdTable(costTable(mf, true)));
  if (r.inflight.length > 0) {
    L.push('### Bytes in flight', '',
      'peak_inflight_bytes of blkback under a deep sequential read load (QD32) on a fresh VBD per configuration, with the frontend\'s page pool sized so that only the protocol limits it.',
      '"async" is the file storage\'s default (preadv through libuv\'s pool, a few at a time per image, the rest waiting in blkback: the ring itself is the limit); "sync" runs preadv on the driver domain\'s thread (blkback lets answers out every 8 requests, so at most about 8 are in flight).',
      'The limit at this I/O size counts requests no larger than the I/O: a 4 MiB read is 1024 segments, so 4096-segment requests need 16 MiB I/Os to reach the seed\'s 8 x 512 x 32.',
      '"Reachable here" also counts the frontend\'s page pool (sized to fill the ring, but never beyond the 32768-entry grant table: 127 MiB) and the 32 I/Os of the load; the peak is compared with it.', '',
      mdTable(inflightTable(r.inflight)));
  }

  L.push('## 4. Baselines', '', mdTable(baselinesTable(r.baselines)));

  L.push('## 5. What a user sees: `blkif serve`', '',
    '`blkif serve` run as a child, at its defaults unless a table says otherwise, driven by fio\'s nbd engine (time based, one job per VBD, all jobs in one fio run). '
    + `Each server is first warmed for ${String(doc.parameters['warmSeconds'] ?? 1)} s, unmeasured (1 MiB reads at QD32, or the section\'s own load): a new server\'s first requests pay for what later ones reuse, as blkback mapping each persistent grant on first use.`, '');
  if (r.nbd.length > 0) {
    L.push('### NBD servers side by side', '',
      '`blkif serve IMAGE`, `qemu-nbd -f raw -t IMAGE` and `nbdkit file IMAGE` (each at its defaults, on 127.0.0.1), one after the other on the same image, the same fio job against each.', '',
      mdTable(nbdTable(r.nbd)), chartImg('nbd-servers.svg'));
    const lat = qd1Table(r.nbd);
    if (lat !== undefined) L.push('', 'A single request\'s latency, from the QD1 rows above (ratios of latency: lower is better):', '', mdTable(lat));
  }
  if ((r.startup ?? []).length > 0) {
    L.push('### Start-up and idle', '',
      'Time from spawning `blkif serve IMAGE...` to its "ready" line; then, with no client, the CPU time of all its threads over the idle seconds (100% = one core) and its VmRSS. Sparse images of 64 MiB.', '',
      mdTable(startupTable(r)));
  }
  const sc = r.serveScaling ?? [];
  if (sc.length > 0) {
    L.push('### Scaling by VBD count', '',
      `\`blkif serve\` with n images (${sizeLabel(Number(doc.parameters['serveImageBytes']))} each, written and warm in the page cache), a fio job of 4 KiB random reads at QD8 on each VBD, all at once. Fairness: each VBD's IOPS against the mean of all.`, '',
      mdTable(serveScalingTable(sc)), chartImg('scaling.svg'));
  }
  const iso = isolationTable(r);
  if (iso !== undefined) {
    L.push('### Isolation', '',
      `vbd0 on slow storage (nbdkit's memory plugin behind its delay filter, ${r.isolation!.delayMs} ms per request, served over NBD as \`blkif serve\`'s image), vbd1 on the image file; both with a fio job of ${workloadLabel(r.isolation!.workload)}. vbd1 first alone, then beside vbd0 busy with its own job.`, '',
      mdTable(iso));
  }
  const inf = r.inflightNbd ?? [];
  if (inf.length > 0) {
    L.push('### Bytes in flight on fixed-latency storage', '',
      `\`blkif serve nbd+unix:///?socket=...\` in front of nbdkit's memory plugin with a delay of ${String(doc.parameters['inflightDelayMs'])} ms per request (\`--threads ${nbdkitThreads(doc)}\`, so that the storage never caps the ring; its own ceiling, fio straight at it, in the last row), with \`--max-indirect-segments\` and \`--ring-page-order\` as named; fio 1 MiB sequential reads at QD32. With a fixed latency, throughput follows the bytes in flight.`, '',
      mdTable(inflightNbdTable(doc)), chartImg('bytes-in-flight.svg'), inflightReading(doc), '');
  }

  const threads = threadsOf(r);
  if (threads.length > 0) {
    L.push('## 6. Queues in threads', '',
      'blkback\'s `queueThreads`: each queue of a VBD served in a thread of its own (a vCPU of the driver domain, with its own handle on the image) instead of every queue in the backend\'s thread.',
      `The image file, read-only, with ${THREADS_LAYOUTS.map((l) => `${l.layout}${l.vbds > 1 ? ` (one per guest, the same image, run at once; figures summed, mean p50, worst p99)` : ''}`).join(' and ')};`,
      `each frontend ${fmtInt(Number(doc.parameters['threadsBufferPages']))} pool pages, indirect 256, ring order 0; each workload run untimed for a while first (new queue threads start with cold code), then measured for ${String(doc.parameters['threadsMs'])} ms; every run checks the backend's queue vCPUs (the queue count with threads, none without).`, '',
      mdTable(threadsTable(threads)), chartImg('queues-in-threads.svg'), threadsReading(doc), '');
  }

  const micro = microTables(doc);
  if (micro.length > 0) {
    L.push('## Micro-benchmarks', '');
    for (const m of micro) L.push(`### ${m.title}`, '', mdTable(m.table));
  }
  if (r.skipped.length > 0) L.push('## Skipped', '', ...r.skipped.map((s) => `- ${s.what}: ${s.why}`), '');
  L.push('## Method', '',
    `- Run parameters: ${Object.entries(doc.parameters).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(', ')}.`,
    '- The image is written with random data (no holes) and read once before any measurement, so it is warm in the page cache; writes land in the page cache too.',
    '- Latencies are per I/O as the caller saw them (p50/p99, µs; fio\'s completion latency through `blkif serve` and the other NBD servers); memory-copy baselines are timed in batches (no per-copy latency).',
    `- The image lives in ${String(doc.parameters['imageDir'])}${doc.parameters['imageOnTmpfs'] === true ? ' (tmpfs: page cache only, so writes never start writeback to a disk mid-run)' : ''}.`,
    '- A guest can have at most NR_GRANT_ENTRIES (32768, Xen\'s default 64 grant frames) pages granted at once, and blkfront grants every page in flight: 128 MiB per guest, whatever the ring could carry. The seed\'s 8 x 512 x 32 = 512 MiB is therefore out of reach; the bytes-in-flight probes size the pool up to that cap.',
    '- CPU time per thread comes from /proc in clock ticks (10 ms at the usual 100 Hz): figures per request are averages over a run of many thousands of requests, not per-request timings.',
    '- fio, nbdkit and qemu-nbd run on the same cores as `blkif serve` (2 here): every serve figure includes that contention, and so do those of the other servers.',
    `- Load average at start ${doc.machine.loadAverageAtStart.join(', ')}, at the end ${(doc.machine.loadAverageAtEnd ?? []).join(', ')}: other work on this machine shows up in every figure.`,
    `- Charts drawn by: ${[...new Set(rendered.values())].join(', ') || 'none'}.`, '');
  return L.join('\n');
}

/** Writes `<outDir>/<timestamp>/report.md` (+ charts, results.json); copies it to `<latestDir>/REPORT.md`. */
export async function writeReport(doc: BenchDocument, outDir: string, latestDir: string | undefined): Promise<string> {
  const stamp = doc.startedAt.replace(/[:]/g, '-').replace(/\.\d+Z$/, 'Z');
  const dir = resolve(outDir, stamp);
  mkdirSync(dir, { recursive: true });
  const rendered = new Map<string, ChartRenderer>();
  const svgs = new Map<string, string>();
  for (const c of charts(doc)) {
    const { svg, renderer } = await renderChart(c.chart);
    rendered.set(c.file, renderer);
    svgs.set(c.file, svg);
    writeFileSync(join(dir, c.file), svg);
  }
  const path = join(dir, 'report.md');
  doc.report = path;
  writeFileSync(path, markdown(doc, './', rendered));
  writeFileSync(join(dir, 'results.json'), JSON.stringify(doc, (_k, v: unknown) => (typeof v === 'number' && !Number.isFinite(v) ? null : v), 2) + '\n');
  if (latestDir !== undefined) {
    const chartDir = join(latestDir, 'report');
    mkdirSync(chartDir, { recursive: true });
    for (const [file, svg] of svgs) writeFileSync(join(chartDir, file), svg);
    writeFileSync(join(latestDir, 'REPORT.md'), markdown(doc, 'report/', rendered));
  }
  return path;
}
