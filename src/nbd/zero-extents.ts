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

/** Most known runs kept (a few MiB): a disk zeroed in more pieces reports the rest as data. */
const MAX_RUNS = 65536;

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
  /** A zero's: the ranges of other changes that overlapped it while it was in flight. */
  overlaps: [number, number][] | undefined;
}

/** A change in flight: `done` it, with the flags the range now has if it was a zero. */
export interface ExtentChange {
  done(flags?: number): void;
}

export class ZeroExtents {
  /** Known ranges, sorted and disjoint, never flags 0. */
  private readonly runs: Run[] = [];
  private readonly pending = new Set<Pending>();
  /** Zeroes among `pending`. */
  private pendingZeroes = 0;

  /**
   * A write, trim or zero (`zero`) of [offset, offset + length) starts: what was known there is
   * forgotten. Call `done` when it ends; a zero that succeeded passes NBD_STATE_ZERO, with
   * NBD_STATE_HOLE if the device deallocated.
   */
  begin(offset: number, length: number, zero = false): ExtentChange {
    const p: Pending = { start: offset, end: offset + length, overlaps: zero ? [] : undefined };
    // Only a zero records overlaps: a write or trim among writes and trims has nothing to scan.
    if (zero || this.pendingZeroes > 0) {
      for (const q of this.pending) {
        if (q.end <= p.start || q.start >= p.end) continue;
        q.overlaps?.push([p.start, p.end]);
        p.overlaps?.push([q.start, q.end]);
      }
    }
    this.pending.add(p);
    if (zero) this.pendingZeroes++;
    if (this.runs.length > 0) this.set(p.start, p.end, 0);
    return {
      done: (flags = 0) => {
        if (!this.pending.delete(p)) return;
        if (zero) this.pendingZeroes--;
        if (flags === 0 || p.overlaps === undefined) return;
        // Only what no other change touched while this one was in flight.
        let pieces: [number, number][] = [[p.start, p.end]];
        for (const [s, e] of p.overlaps) {
          pieces = pieces.flatMap(([a, b]): [number, number][] => (e <= a || s >= b ? [[a, b]] : [...(s > a ? [[a, s] as [number, number]] : []), ...(e < b ? [[e, b] as [number, number]] : [])]));
        }
        for (const [a, b] of pieces) this.set(a, b, flags);
      },
    };
  }

  /** Index of the first run ending after `at` (binary search: the runs are sorted). */
  private firstEndingAfter(at: number): number {
    let lo = 0;
    let hi = this.runs.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.runs[mid]!.end <= at) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /**
   * Sets [start, end) to `flags` (0: unknown, i.e. data), splicing only the runs it touches. Past
   * MAX_RUNS nothing new is learnt (forgetting is always allowed: what is not known is data).
   */
  private set(start: number, end: number, flags: number): void {
    if (end <= start || (flags !== 0 && this.runs.length >= MAX_RUNS)) return;
    const runs = this.runs;
    const i = this.firstEndingAfter(start);
    let j = i;
    while (j < runs.length && runs[j]!.start < end) j++;
    const pieces: Run[] = [];
    if (i < j && runs[i]!.start < start) pieces.push({ start: runs[i]!.start, end: start, flags: runs[i]!.flags });
    if (flags !== 0) pieces.push({ start, end, flags });
    if (i < j && runs[j - 1]!.end > end) pieces.push({ start: end, end: runs[j - 1]!.end, flags: runs[j - 1]!.flags });
    // Neighbours with the same flags become one.
    let from = i;
    let to = j;
    const prev = runs[i - 1];
    if (prev !== undefined && pieces.length > 0 && prev.end === pieces[0]!.start && prev.flags === pieces[0]!.flags) {
      pieces.unshift(prev);
      from--;
    }
    const next = runs[j];
    const last = pieces[pieces.length - 1];
    if (next !== undefined && last !== undefined && next.start === last.end && next.flags === last.flags) {
      pieces.push(next);
      to++;
    }
    const merged: Run[] = [];
    for (const r of pieces) {
      const m = merged[merged.length - 1];
      if (m !== undefined && m.end === r.start && m.flags === r.flags) m.end = r.end;
      else merged.push({ ...r });
    }
    runs.splice(from, to - from, ...merged);
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
    for (let i = this.firstEndingAfter(offset); i < this.runs.length; i++) {
      const r = this.runs[i]!;
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
