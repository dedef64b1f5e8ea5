/** A benchmark figure, and a helper that times a loop long enough to trust. */
export interface Figure {
  name: string;
  value: number;
  unit: string;
}

/** Runs `body(n)` with growing n until it takes >= `minMs`; returns operations per second. */
export function opsPerSecond(body: (n: number) => void, minMs = 300): number {
  let n = 1000;
  body(n); // warm-up: let the JIT see the loop
  for (;;) {
    const t0 = performance.now();
    body(n);
    const ms = performance.now() - t0;
    if (ms >= minMs) return (n / ms) * 1000;
    n = Math.min(n * Math.max(2, Math.ceil(minMs / Math.max(ms, 1))), 1 << 30);
  }
}
