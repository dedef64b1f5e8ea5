/**
 * `npm run bench`: every benchmark of the project, printed as a table (`--json` for machines,
 * `--quick` for a short run). Benchmarks assert nothing about speed; they report.
 */
import { cpus } from 'node:os';
import { benchRing } from './ring.js';
import { benchXen } from './xen.js';
import { benchXenstore } from './xenstore.js';
import type { Figure } from './measure.js';

const args = new Set(process.argv.slice(2));
const quick = args.has('--quick');
const suites: [string, (quick: boolean) => Promise<Figure[]>][] = [
  ['wire format and ring', benchRing],
  ['emulated Xen: event channels and grants', () => benchXen()],
  ['xenstore', () => benchXenstore()],
];

const results: { suite: string; figures: Figure[] }[] = [];
for (const [suite, run] of suites) {
  if (!args.has('--json')) process.stderr.write(`running: ${suite}...\n`);
  results.push({ suite, figures: await run(quick) });
}

if (args.has('--json')) {
  process.stdout.write(JSON.stringify({ machine: { cpus: cpus().length, model: cpus()[0]?.model, node: process.version }, results }, null, 2) + '\n');
} else {
  const fmt = (v: number) => (v >= 100 ? Math.round(v).toLocaleString('en-US') : v.toPrecision(3));
  for (const { suite, figures } of results) {
    process.stdout.write(`\n${suite}\n`);
    const w = Math.max(...figures.map((f) => f.name.length));
    for (const f of figures) process.stdout.write(`  ${f.name.padEnd(w)}  ${fmt(f.value).padStart(14)} ${f.unit}\n`);
  }
}
