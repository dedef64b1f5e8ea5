/**
 * What an export truthfully knows of its allocation, for NBD_CMD_BLOCK_STATUS in the
 * `base:allocation` context: only the ranges this server itself zeroed since the export was
 * added (a hole and zeroes where the device deallocated them, zeroes where it wrote them),
 * each forgotten as soon as anything writes or trims over it. Everything else is reported as
 * data (flags 0), which is always true. A zero that overlapped a write in flight (either order is
 * allowed to land last, proto.md "Ordering of messages and writes") marks nothing of the overlap.
 * True only while this server is the device's only writer (NbdExport.ownsWrites).
 */
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from './constants.js';

/** One extent of a block status reply: `length` bytes with `flags` (NBD_STATE_*). */
export interface Extent {
  length: number;
  flags: number;
}

interface Run {
  start: number;
  end: number;
  flags: number;
}

interface Pending {
  start: number;
  end: number;
  /** Ranges of other changes in flight at some time during this one. */
  overlaps: [number, number][];
}

/** A change in flight: `done` it, with the flags the range now has if it was a zero. */
export interface ExtentChange {
  done(flags?: number): void;
}

export class ZeroExtents {
  /** Known ranges, sorted and disjoint, never flags 0. */
  private runs: Run[] = [];
  private readonly pending = new Set<Pending>();

  /**
   * A write, trim or zero of [offset, offset + length) starts: what was known there is forgotten.
   * Call `done` when it ends, with NBD_STATE_ZERO (| NBD_STATE_HOLE) for a successful zero.
   */
  begin(offset: number, length: number): ExtentChange {
    const p: Pending = { start: offset, end: offset + length, overlaps: [] };
    for (const q of this.pending) {
      q.overlaps.push([p.start, p.end]);
      p.overlaps.push([q.start, q.end]);
    }
    this.pending.add(p);
    this.set(p.start, p.end, 0);
    return {
      done: (flags = 0) => {
        if (!this.pending.delete(p)) return;
        if (flags === 0) return;
        // Only what no other change touched while this one was in flight.
        let pieces: [number, number][] = [[p.start, p.end]];
        for (const [s, e] of p.overlaps) pieces = pieces.flatMap(([a, b]) => (e <= a || s >= b ? [[a, b]] : [...(s > a ? [[a, s]] : []), ...(e < b ? [[e, b]] : [])]) as [number, number][]);
        for (const [a, b] of pieces) this.set(a, b, flags);
      },
    };
  }

  /** Sets [start, end) to `flags` (0: unknown, i.e. data). */
  private set(start: number, end: number, flags: number): void {
    if (end <= start) return;
    const out: Run[] = [];
    for (const r of this.runs) {
      if (r.end <= start || r.start >= end) out.push(r);
      else {
        if (r.start < start) out.push({ start: r.start, end: start, flags: r.flags });
        if (r.end > end) out.push({ start: end, end: r.end, flags: r.flags });
      }
    }
    if (flags !== 0) out.push({ start, end, flags });
    out.sort((a, b) => a.start - b.start);
    // Neighbours with the same flags become one.
    this.runs = [];
    for (const r of out) {
      const last = this.runs[this.runs.length - 1];
      if (last !== undefined && last.end === r.start && last.flags === r.flags) last.end = r.end;
      else this.runs.push({ ...r });
    }
  }

  /**
   * Extents covering [offset, offset + length) in order, adjacent ones with the same flags
   * merged; at most `max` of them (the reply then covers less, as the spec allows).
   */
  query(offset: number, length: number, max: number): Extent[] {
    const end = offset + length;
    const out: Extent[] = [];
    const push = (len: number, flags: number) => {
      const last = out[out.length - 1];
      if (last !== undefined && last.flags === flags) last.length += len;
      else out.push({ length: len, flags });
    };
    let at = offset;
    for (const r of this.runs) {
      if (r.end <= at) continue;
      if (r.start >= end) break;
      if (r.start > at) push(r.start - at, 0);
      const to = Math.min(r.end, end);
      push(to - Math.max(at, r.start), r.flags);
      at = to;
      if (out.length > max) break;
    }
    if (at < end && out.length <= max) push(end - at, 0);
    return out.slice(0, max);
  }
}

export const HOLE_AND_ZERO = NBD_STATE_HOLE | NBD_STATE_ZERO;
