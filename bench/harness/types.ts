/**
 * What `blkif bench` measures and reports: plain data, so the JSON document, the terminal tables
 * and the Markdown report all come from the same values.
 */

export const KiB = 1024;
export const MiB = 1024 * 1024;

export type Pattern = 'randread' | 'randwrite' | 'read' | 'write';
export type StorageKind = 'file' | 'memory';

export interface Workload {
  readonly pattern: Pattern;
  readonly blockSize: number;
  readonly depth: number;
}

/** Throughput and latency of one run. Latencies in microseconds. */
export interface Perf {
  ops: number;
  bytes: number;
  seconds: number;
  iops: number;
  mibps: number;
  p50us: number;
  p99us: number;
}

/** What the protocol cost, per ring request, from the frontend's and backend's counters. */
export interface ProtocolCost {
  /** Ring requests (backend rd_req + wr_req) and the caller's I/Os they carried. */
  requests: number;
  requestsPerIo: number;
  /** Frontend -> backend event-channel kicks, as sent by blkfront and received by blkback. */
  feSentPerReq: number;
  beReceivedPerReq: number;
  /** Backend -> frontend kicks, as sent by blkback and received by blkfront. */
  beSentPerReq: number;
  feReceivedPerReq: number;
  /** Both directions' sends together. */
  notificationsPerReq: number;
  grantMapsPerReq: number;
  segmentsPerReq: number;
  /** Share of the requests that were BLKIF_OP_INDIRECT. */
  indirectShare: number;
  /** Ring slots used per MiB moved. */
  requestsPerMiB: number;
}

/** The figure a row is compared with, and the ratio (row / baseline, on throughput). */
export interface BaselineRef {
  id: string;
  label: string;
  mibps: number;
  iops: number;
  ratio: number;
}

/** One measured run. */
export interface Row {
  /** Stable key, e.g. `api/file/randread-4k-qd32`. */
  id: string;
  label: string;
  storage?: StorageKind;
  /** Protocol configuration (matrix rows) or server (NBD rows). */
  config?: string;
  workload?: Workload;
  perf: Perf;
  cost?: ProtocolCost;
  baseline?: BaselineRef;
  note?: string;
}

/** Peak bytes in flight under a deep 4 MiB sequential load, beside the protocol's limit. */
export interface InflightRow {
  config: string;
  indirect: number;
  ringPageOrder: number;
  /** Negotiated segments per request and ring slots. */
  segments: number;
  slots: number;
  /** segments x slots x 4 KiB: what the ring could carry at most. */
  limitBytes: number;
  /** The same, for requests no larger than the load's I/O size. */
  limitAtBlockBytes: number;
  /** What can be in flight here: also bounded by the page pool (itself by the grant table) and by depth x I/O size. */
  reachableBytes: number;
  blockSize: number;
  depth: number;
  /** Frontend buffer pages (the pool bounds bytes in flight too). */
  bufferPages: number;
  /** The pool was cut to what the guest's grant table can hold at once. */
  grantCapped: boolean;
  /** Measured peak_inflight_bytes per storage I/O mode ('sync' is the file storage's default). */
  measured: Partial<Record<'sync' | 'async', { peakBytes: number; mibps: number; ops: number }>>;
}

export interface ScalingRow {
  vbds: number;
  guests: number;
  iops: number;
  mibps: number;
  /** Mean of the VBDs' p50, worst of their p99 (µs). */
  p50us: number;
  p99us: number;
  /** Aggregate throughput over the one-VBD run. */
  ratio: number;
}

export type ThreadsLayout = '1 VBD x 2 queues' | '4 VBDs x 1 queue';

/** Throughput and latency of a run over one or more VBDs at once (sums; mean p50, worst p99, µs). */
export interface ThreadsPerf {
  iops: number;
  mibps: number;
  p50us: number;
  p99us: number;
}

/** One workload on one layout, with the queues served in blkback's own thread and in threads of their own. */
export interface ThreadsRow {
  layout: ThreadsLayout;
  workload: Workload;
  /** `queueThreads: false`: every queue served in the backend's thread. */
  inThread: ThreadsPerf;
  /** `queueThreads: true`: each queue a vCPU of the driver domain with its own storage handle. */
  threaded: ThreadsPerf;
  /** threaded / inThread, on throughput. */
  ratio: number;
}

/** Per I/O (fio through `blkif serve`) or per ring request (the blkfront API): where the time goes. */
export interface TimeRow {
  /** 'blkfront API' (in this process: guest, driver domain) or a server ('blkif serve'). */
  where: string;
  workload: Workload;
  perf: Perf;
  /** What the figures are counted per: ring requests, or the client's I/Os. */
  per: 'ring request' | 'I/O';
  count: number;
  /** CPU µs per request (or I/O), by thread role. */
  cpuUs: Record<string, number>;
  /** Sleeps (voluntary context switches: each ends in a wake-up) per request, by thread role. */
  sleeps: Record<string, number>;
  /** Event-channel kicks per request each way. */
  feToBe?: number;
  beToFe?: number;
  /** Waits in the emulated Xen that went to sleep (Atomics.waitAsync), per request: guest, driver domain. */
  xenSleeps?: { guest: number; backend: number };
  /** Grant maps per request; grant copies (GNTTABOP_copy) and the bytes they copied, per request. */
  grantMaps?: number;
  grantCopies?: number;
  copyBytes?: number;
  /** V8 scavenges per 1,000 requests: guest, driver domain. */
  scavengesPerK?: { guest: number; backend: number };
}

/** `blkif serve` with n images: time to "ready", idle CPU and resident memory. */
export interface StartupRow {
  images: number;
  readySeconds: number;
  idleSeconds: number;
  /** Whole process, % of one core. */
  idleCpuPercent: number;
  rssBytes: number | undefined;
}

/** n VBDs under `blkif serve`, one fio job each, all at once. */
export interface ServeScalingRow {
  vbds: number;
  iops: number;
  mibps: number;
  /** Each VBD's IOPS, in order. */
  perVbd: number[];
  /** Largest |VBD - mean| / mean. */
  worstDeviation: number;
  p50us: number;
  p99us: number;
  ratio: number;
}

/** vbd1 (a file) alone, and beside vbd0 on slow storage busy with its own job. */
export interface IsolationResult {
  delayMs: number;
  workload: Workload;
  slowWorkload: Workload;
  alone: Perf;
  beside: Perf;
  slow: Perf;
}

/** 1 MiB sequential reads QD32 through `blkif serve` on fixed-latency NBD storage. */
export interface InflightNbdRow {
  indirect: number;
  ringPageOrder: number;
  segments: number;
  slots: number;
  /** ring slots x segments x 4 KiB. */
  bytesInFlight: number;
  perf: Perf;
  /** blkback's peak_inflight_bytes (from --metrics). */
  peakBytes: number | undefined;
  /** CPU of all of serve's threads during the run, % of one core (absent in older documents). */
  cpuPercent?: number;
}

export interface Target {
  name: string;
  goal: string;
  /** Measured value (a ratio, or notifications per request); undefined when not measured. */
  value: number | undefined;
  threshold: number;
  /** Whether `value` must be at least (>=) or at most (<=) the threshold. */
  kind: '>=' | '<=';
  met: boolean | undefined;
  detail: string;
  /** How the value reads: a ratio (x, the default for >=), per request (the default for <=), a share (%), MiB. */
  unit?: 'x' | 'per' | '%' | 'MiB';
}

export interface Skipped {
  what: string;
  why: string;
}

export interface MicroFigure {
  name: string;
  value: number;
  unit: string;
}

export interface MicroSuite {
  suite: string;
  figures: MicroFigure[];
}

export interface MachineInfo {
  cpuModel: string;
  cpus: number;
  totalMemoryBytes: number;
  node: string;
  os: string;
  kernel: string;
  arch: string;
  loadAverageAtStart: number[];
  loadAverageAtEnd?: number[];
  tools: Record<string, string>;
}

export interface BenchResults {
  /** The default protocol, through the guest's blkfront API (no NBD). */
  api: Row[];
  /** The protocol matrix: indirect segments x ring page order (x later options). */
  matrix: Row[];
  /** Direct pread/pwrite on the image, and memory copy. */
  baselines: Row[];
  inflight: InflightRow[];
  nbd: Row[];
  /** In-process scaling of earlier documents; now measured through `blkif serve` (serveScaling). */
  scaling: ScalingRow[];
  /** Queues in threads of their own vs in the backend's thread, on the image file. Absent in older documents. */
  threads: ThreadsRow[];
  /** Where the time goes. The sections below are absent in older documents. */
  time?: TimeRow[];
  startup?: StartupRow[];
  serveScaling?: ServeScalingRow[];
  isolation?: IsolationResult;
  inflightNbd?: InflightNbdRow[];
  /** fio straight at the fixed-latency storage, same workload: its own ceiling (absent in older documents). */
  inflightNbdStorage?: { threads: number; perf: Perf };
  skipped: Skipped[];
  micro: MicroSuite[];
}

export interface BenchDocument {
  tool: 'blkif bench';
  startedAt: string;
  seconds: number;
  quick: boolean;
  command: string;
  machine: MachineInfo;
  parameters: Record<string, unknown>;
  results: BenchResults;
  targets: Target[];
  report: string | undefined;
}

/** A suite of figures contributed from outside src (bench/'s micro-benchmarks). */
export interface ExtraSuite {
  readonly name: string;
  readonly run: (quick: boolean) => Promise<MicroFigure[]>;
}

export function perfOf(ops: number, bytes: number, seconds: number, p50us: number, p99us: number): Perf {
  const s = seconds > 0 ? seconds : Number.NaN;
  return { ops, bytes, seconds, iops: ops / s, mibps: bytes / MiB / s, p50us, p99us };
}

/** 4096 -> "4k", 1048576 -> "1m" (ids); "4 KiB", "1 MiB" (labels). */
export function sizeId(n: number): string {
  return n % MiB === 0 ? `${n / MiB}m` : `${n / KiB}k`;
}
export function sizeLabel(n: number): string {
  if (n >= MiB && n % MiB === 0) return `${n / MiB} MiB`;
  if (n >= KiB && n % KiB === 0) return `${n / KiB} KiB`;
  return `${n} B`;
}

export function workloadId(w: Workload): string {
  return `${w.pattern}-${sizeId(w.blockSize)}-qd${w.depth}`;
}
export function workloadLabel(w: Workload): string {
  const what = w.pattern === 'randread' ? 'random read' : w.pattern === 'randwrite' ? 'random write' : w.pattern === 'read' ? 'seq read' : 'seq write';
  return `${sizeLabel(w.blockSize)} ${what} QD${w.depth}`;
}

/** Latency percentiles (µs) of a list of latencies in ms; sorts it. */
export function percentiles(latMs: number[]): { p50us: number; p99us: number } {
  latMs.sort((a, b) => a - b);
  const pct = (p: number) => (latMs.length === 0 ? 0 : latMs[Math.min(latMs.length - 1, Math.floor(p * latMs.length))]! * 1000);
  return { p50us: pct(0.5), p99us: pct(0.99) };
}

/** The xorshift32 of the in-guest workload, so baselines walk the disk the same way. */
export function xorshift(seed = 0x9e3779b9): () => number {
  let s = seed >>> 0;
  return () => {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
    return s;
  };
}

/** Sections of a run, as `--only` names them. */
export const SECTIONS = ['baselines', 'api', 'matrix', 'inflight', 'threads', 'time', 'startup', 'scaling', 'isolation', 'nbd', 'inflight-nbd', 'micro'] as const;
export type Section = typeof SECTIONS[number];
