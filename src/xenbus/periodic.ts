/**
 * Drivers' periodic housekeeping on one timer per period and thread, whatever the number of
 * devices: an idle domain with many VBDs wakes once a period, not once per device (Linux
 * blkfront runs one delayed work over every device, `blkfront_delay_work`).
 */
type Job = (now: number) => void;

const periods = new Map<number, { readonly jobs: Set<Job>; readonly timer: NodeJS.Timeout }>();

/**
 * Runs `job(performance.now())` every `ms` milliseconds with every other job of that period in
 * this thread, until the returned function is called. The timer never keeps the thread alive.
 * A job that throws does not stop the others; its error is thrown again on its own.
 */
export function everyPeriod(ms: number, job: Job): () => void {
  let p = periods.get(ms);
  if (p === undefined) {
    const jobs = new Set<Job>();
    const timer = setInterval(() => {
      const now = performance.now();
      for (const j of jobs) {
        try {
          j(now);
        } catch (e) {
          queueMicrotask(() => { throw e; });
        }
      }
    }, ms);
    timer.unref();
    p = { jobs, timer };
    periods.set(ms, p);
  }
  const mine = p;
  // Each registration is its own, so that its end removes only it.
  const entry: Job = (now) => job(now);
  mine.jobs.add(entry);
  return () => {
    if (!mine.jobs.delete(entry) || mine.jobs.size > 0) return;
    clearInterval(mine.timer);
    if (periods.get(ms) === mine) periods.delete(ms);
  };
}

/** Jobs registered now, over every period (for tests). */
export function periodicJobs(): number {
  let n = 0;
  for (const p of periods.values()) n += p.jobs.size;
  return n;
}
