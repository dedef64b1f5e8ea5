/**
 * The protocol matrix and the workloads run through it. Each axis lists values with the backend
 * and frontend options they set; a configuration is one value of every axis. A value whose
 * options blkback or blkfront do not have (yet) makes its configurations skipped, with a note in
 * the report, so axes for future features can be declared before the features exist.
 */
import { DEFAULT_BLKBACK_OPTIONS, type BlkbackOptions } from '../../src/blkback/index.js';
import { DEFAULT_BLKFRONT_OPTIONS, type BlkfrontOptions } from '../../src/blkfront/index.js';
import { KiB, MiB, type Workload } from './types.js';

export interface AxisValue {
  /** Part of the configuration's label ('' for a value that changes nothing: left out). */
  readonly tag: string;
  readonly backend?: Readonly<Record<string, unknown>>;
  readonly frontend?: Readonly<Record<string, unknown>>;
}

export interface MatrixAxis {
  readonly name: string;
  readonly values: readonly AxisValue[];
}

export const INDIRECT_SEGMENTS = [0, 32, 256, 4096] as const;
export const RING_PAGE_ORDERS = [0, 4] as const;

/** Linux blkback's and our default: indirect 256, a one-page ring. */
export const DEFAULT_CONFIG_LABEL = configLabel(256, 0);

export function configLabel(indirect: number, order: number): string {
  return `${indirect === 0 ? 'classic' : `indirect ${indirect}`}, ring order ${order}`;
}

export const PROTOCOL_MATRIX: readonly MatrixAxis[] = [
  {
    // The backend's feature-max-indirect-segments (0: classic requests only, 11 segments); the
    // frontend's own cap is set equal so that the value is what gets negotiated.
    name: 'indirect segments',
    values: INDIRECT_SEGMENTS.map((n) => ({
      tag: n === 0 ? 'classic' : `indirect ${n}`,
      backend: { maxIndirectSegments: n },
      frontend: { maxIndirectSegments: n },
    })),
  },
  {
    // The backend offers up to order 4 (16 pages, 512 slots); the frontend asks for this order.
    name: 'ring page order',
    values: RING_PAGE_ORDERS.map((o) => ({ tag: `ring order ${o}`, backend: { maxRingPageOrder: 4 }, frontend: { ringPageOrder: o } })),
  },
  {
    // Persistent grants are on by default at both ends; off, every page is granted and mapped per request.
    name: 'persistent grants',
    values: [
      { tag: '' },
      { tag: 'no persistent grants', backend: { persistent: false }, frontend: { persistent: false } },
    ],
  },
  {
    name: 'queues',
    values: [
      { tag: '' },
      { tag: '2 queues', backend: { maxQueues: 2 }, frontend: { queues: 2 } },
    ],
  },
];

export interface MatrixConfig {
  readonly label: string;
  readonly indirect: number;
  readonly ringPageOrder: number;
  readonly backendOptions: Partial<BlkbackOptions>;
  readonly frontendOptions: Partial<BlkfrontOptions>;
  /** Why it cannot run here (options missing), if so. */
  readonly missing: string | undefined;
}

/** Every combination of the axes' values, with what is missing for it to run. */
export function matrixConfigs(axes: readonly MatrixAxis[] = PROTOCOL_MATRIX): MatrixConfig[] {
  let combos: AxisValue[][] = [[]];
  for (const a of axes) combos = combos.flatMap((c) => a.values.map((v) => [...c, v]));
  return combos.map((values) => {
    const backend: Record<string, unknown> = {};
    const frontend: Record<string, unknown> = {};
    for (const v of values) {
      Object.assign(backend, v.backend ?? {});
      Object.assign(frontend, v.frontend ?? {});
    }
    const absentBack = Object.keys(backend).filter((k) => !(k in DEFAULT_BLKBACK_OPTIONS));
    const absentFront = Object.keys(frontend).filter((k) => !(k in DEFAULT_BLKFRONT_OPTIONS));
    const missing = [...absentBack.map((k) => `blkback option ${k}`), ...absentFront.map((k) => `blkfront option ${k}`)];
    return {
      label: values.map((v) => v.tag).filter((t) => t !== '').join(', '),
      indirect: Number(backend['maxIndirectSegments'] ?? DEFAULT_BLKBACK_OPTIONS.maxIndirectSegments),
      ringPageOrder: Number(frontend['ringPageOrder'] ?? DEFAULT_BLKFRONT_OPTIONS.ringPageOrder),
      backendOptions: backend as Partial<BlkbackOptions>,
      frontendOptions: frontend as Partial<BlkfrontOptions>,
      missing: missing.length > 0 ? `not implemented yet: ${missing.join(', ')}` : undefined,
    };
  });
}

const w = (pattern: Workload['pattern'], blockSize: number, depth: number): Workload => ({ pattern, blockSize, depth });

/** Section 1: the default protocol through blkfront's API. */
export function apiWorkloads(quick: boolean): Workload[] {
  const seqDepths = quick ? [1] : [1, 8];
  const out = [w('randread', 4 * KiB, 1), w('randread', 4 * KiB, 32), w('randwrite', 4 * KiB, 1), w('randwrite', 4 * KiB, 32)];
  for (const depth of seqDepths) for (const bs of [64 * KiB, MiB, 4 * MiB]) out.push(w('read', bs, depth), w('write', bs, depth));
  // A target is measured on 1 MiB reads at QD8: a quick run keeps that one.
  if (quick) out.push(w('read', MiB, 8));
  return out;
}

/** Section 2: what each protocol configuration runs (sequential at QD 8 so the ring has work). */
export const MATRIX_SEQ_DEPTH = 8;
export function matrixWorkloads(): Workload[] {
  return [
    w('randread', 4 * KiB, 32),
    w('read', 64 * KiB, MATRIX_SEQ_DEPTH),
    w('read', MiB, MATRIX_SEQ_DEPTH),
    w('read', 4 * MiB, MATRIX_SEQ_DEPTH),
    w('write', MiB, MATRIX_SEQ_DEPTH),
  ];
}

/** Section 3: the deep load under which peak bytes in flight are read. */
export const INFLIGHT_BLOCK = 4 * MiB;
export const INFLIGHT_DEPTH = 32;

/** Scaling and isolation under `blkif serve`: each VBD's fio job. */
export const SCALING_WORKLOAD: Workload = w('randread', 4 * KiB, 8);

/** Where the time goes: small random reads and writes deep, and big sequential reads. */
export const TIME_WORKLOADS: readonly Workload[] = [w('randread', 4 * KiB, 32), w('read', MiB, 8), w('randwrite', 4 * KiB, 32)];

/** The NBD servers' comparison: the same fio workloads against each (QD1: a single request's latency). */
export const NBD_WORKLOADS: readonly Workload[] = [w('randread', 4 * KiB, 32), w('randread', 4 * KiB, 1), w('read', MiB, 32), w('randwrite', 4 * KiB, 32)];
