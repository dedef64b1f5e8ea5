/**
 * `blkif bench [--quick] [--json] [--out DIR]`: what indirect descriptors buy, measured. The
 * harness lives in ./bench/ (shared with `npm run bench`, which adds the repository's
 * micro-benchmarks); this file only parses the command line.
 */
import { join, resolve } from 'node:path';
import { Command } from 'commander';
import { runBench } from './bench/run.js';
import { defaultDataDir } from './serve.js';

export { runBench, parameters, type BenchOptions } from './bench/run.js';
export type { BenchDocument } from './bench/types.js';

interface BenchCliOptions {
  quick?: boolean;
  json?: boolean;
  out?: string;
}

export function defaultBenchDir(): string {
  return join(defaultDataDir(), 'bench');
}

export function benchCommand(): Command {
  return new Command('bench')
    .description('measure the PV block protocol: blkfront vs direct I/O, classic vs indirect requests, ring sizes, protocol cost per request, bytes in flight, the NBD export vs qemu-nbd, scaling by VBD count')
    .option('--quick', 'short runs (under a minute in all)')
    .option('--json', 'print one JSON document on stdout instead of tables (progress stays on stderr)')
    .option('--out <dir>', `where reports go: DIR/<timestamp>/report.md with its SVG charts and results.json, and the latest as DIR/REPORT.md (default ${defaultBenchDir()})`)
    .addHelpText('after', `
Needs qemu-nbd (qemu-utils), fio and nbdcopy (libnbd-bin) for the NBD comparison; what is missing is skipped and listed.
Servers listen on 127.0.0.1 only; the temporary image goes to /dev/shm (else the system's temporary directory) and is removed.`)
    .action(async (o: BenchCliOptions) => {
      const dir = resolve(o.out ?? defaultBenchDir());
      await runBench({ quick: o.quick === true, json: o.json === true, outDir: dir, latestDir: dir });
    });
}
