/**
 * Hole punching for one file, by util-linux `fallocate --punch-hole`: one child at a time, each
 * covering as much of what is waiting as one range can.
 *
 * Why a child at all: Node has no fallocate(2), and nothing else it offers frees blocks (writing
 * zeroes allocates them). The ways to call it without a process per request were weighed:
 * - a native addon: a C toolchain and node-gyp at install time for one system call, and a second
 *   path for when it cannot build;
 * - a long-lived helper that punches ranges read from a pipe: Debian has no such program but
 *   xfs_io (xfsprogs, rarely installed) or a python3 with ctypes (not ours to require);
 * - this: discards that arrive while a child runs wait, and the next child punches the oldest one
 *   merged with every waiting range that touches it (overlapping or adjacent). A burst (mkfs or
 *   fstrim sending a run of neighbouring ranges, a guest deleting a big file) then costs a child
 *   per merged range, at most one running per image, and the thread that serves the disks never
 *   waits for any of them. Ranges that do not touch are never merged: the bytes between them are
 *   the guest's.
 * A discard is answered only once its range is punched, so merging in-flight discards changes
 * nothing a guest may rely on (blkif.h orders nothing between requests in flight).
 */
import { execFile } from 'node:child_process';

interface WaitingPunch {
  readonly offset: number;
  readonly length: number;
  readonly done: (punched: boolean) => void;
}

export class HolePuncher {
  private waiting: WaitingPunch[] = [];
  private running = false;
  /** A punch failed: fallocate is missing or the file system has no holes; no more children. */
  private failed = false;
  private closed = false;
  private idleWaiters: (() => void)[] = [];
  /** Children started, for tests and counters: fewer than the punches asked for when they merge. */
  children = 0;

  /** `target`: the path fallocate opens (our descriptor through /proc where there is one). */
  constructor(private readonly target: string) {}

  /**
   * Resolves to whether the range was punched (false: no fallocate binary, or a file system
   * without holes; the caller writes zeroes instead). After one failure every punch is false at
   * once: no doomed child per discard.
   */
  punch(offset: number, length: number): Promise<boolean> {
    return new Promise((done) => {
      this.waiting.push({ offset, length, done });
      if (!this.running) this.next();
    });
  }

  /**
   * No more children: what waits answers false at once, and this resolves when the running child
   * has ended (the descriptor its path names through /proc must stay open until then).
   */
  close(): Promise<void> {
    this.closed = true;
    for (const w of this.waiting.splice(0)) w.done(false);
    if (!this.running) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private next(): void {
    if (this.failed || this.closed) for (const w of this.waiting.splice(0)) w.done(false);
    if (this.waiting.length === 0) {
      this.running = false;
      for (const f of this.idleWaiters.splice(0)) f();
      return;
    }
    this.running = true;
    // The oldest waiting range, grown by every waiting range that overlaps or adjoins it, until
    // none does (one that touches only a range merged in a later pass still counts).
    const first = this.waiting[0]!;
    let start = first.offset;
    let end = first.offset + first.length;
    const run: WaitingPunch[] = [first];
    let rest = this.waiting.slice(1);
    for (let grew = true; grew;) {
      grew = false;
      const left: WaitingPunch[] = [];
      for (const w of rest) {
        if (w.offset <= end && w.offset + w.length >= start) {
          start = Math.min(start, w.offset);
          end = Math.max(end, w.offset + w.length);
          run.push(w);
          grew = true;
        } else {
          left.push(w);
        }
      }
      rest = left;
    }
    this.waiting = rest;
    this.children++;
    execFile('fallocate', ['--punch-hole', '--keep-size', '--offset', String(start), '--length', String(end - start), this.target], (e) => {
      if (e !== null) this.failed = true;
      for (const w of run) w.done(e === null);
      this.next();
    });
  }
}
