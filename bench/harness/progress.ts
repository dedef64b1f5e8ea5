/**
 * Progress on stderr while the benchmarks run: a cli-progress bar when that package is installed
 * and stderr is a terminal, else one plain line per step, "[k/N] name ... result (time)".
 */

export interface Progress {
  /** Step `k` of `n` starts. */
  start(k: number, n: number, name: string): void;
  /** The current step ended, with an optional one-line result. */
  end(summary: string | undefined, seconds: number): void;
  /** A message that must not be lost in the bar (a skipped step, a failure). */
  note(msg: string): void;
  stop(): void;
}

interface CliProgressBar {
  start(total: number, start: number, payload?: Record<string, unknown>): void;
  update(value: number, payload?: Record<string, unknown>): void;
  stop(): void;
}
interface CliProgressModule {
  SingleBar: new (opts: Record<string, unknown>, preset?: unknown) => CliProgressBar;
  Presets: Record<string, unknown>;
}

/** import() of an optional package: undefined when it is not installed (or fails to load). */
export async function optionalImport<T>(name: string): Promise<T | undefined> {
  try {
    const spec: string = name; // a variable: TypeScript must not resolve (or require) the package
    const m = (await import(spec)) as { default?: unknown };
    return (m.default !== undefined && typeof m.default === 'object' ? { ...(m as object), ...(m.default as object) } : m) as T;
  } catch {
    return undefined;
  }
}

export async function makeProgress(out: NodeJS.WriteStream = process.stderr): Promise<Progress> {
  const cp = out.isTTY === true ? await optionalImport<CliProgressModule>('cli-progress') : undefined;
  if (cp?.SingleBar !== undefined) return barProgress(cp, out);
  return lineProgress(out);
}

function lineProgress(out: NodeJS.WritableStream): Progress {
  let open = false;
  return {
    start(k, n, name) {
      if (open) out.write('\n');
      out.write(`[${k}/${n}] ${name} ...`);
      open = true;
    },
    end(summary, seconds) {
      if (!open) return;
      out.write(`${summary !== undefined ? ` ${summary}` : ''} (${seconds.toFixed(1)} s)\n`);
      open = false;
    },
    note(msg) {
      out.write(`${open ? '\n' : ''}${msg}\n`);
      open = false;
    },
    stop() {
      if (open) out.write('\n');
      open = false;
    },
  };
}

function barProgress(cp: CliProgressModule, out: NodeJS.WriteStream): Progress {
  const bar = new cp.SingleBar({
    format: '[{bar}] {value}/{total} {step}',
    stream: out,
    hideCursor: true,
    clearOnComplete: false,
    barsize: 24,
  }, cp.Presets['shades_classic']);
  let started = false;
  let current = 0;
  let total = 0;
  return {
    start(k, n, name) {
      if (!started) { bar.start(n, 0, { step: name }); started = true; }
      current = k - 1;
      total = n;
      bar.update(current, { step: `${name} ...` });
    },
    end(summary, seconds) {
      bar.update(current + 1, { step: `${summary ?? ''} (${seconds.toFixed(1)} s)` });
    },
    note(msg) {
      // Above the bar: clear its line, print, let the next update redraw it.
      out.write(`\r\x1b[K${msg}\n`);
      if (started) bar.update(current, {});
    },
    stop() {
      if (started) {
        bar.update(total, { step: 'done' });
        bar.stop();
      }
    },
  };
}
