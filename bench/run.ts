/**
 * `npm run bench` (`--quick` for a short run, `--json` for one JSON document, `--out DIR`,
 * `--only SECTION,...` for some sections, e.g. `--only nbd,scaling`; `--render RESULTS.json` writes
 * bench/REPORT.md again from a run's saved results, measuring nothing): the
 * protocol harness (bench/harness/: development code, not shipped in the package) plus the
 * micro-benchmarks (wire format and ring, the emulated Xen, xenstore). Reports go to bench/results/<timestamp>/ and the latest
 * is copied to bench/REPORT.md (charts in bench/report/). Benchmarks assert nothing about speed.
 */
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { writeReport } from './harness/report.js';
import { runBench } from './harness/run.js';
import { SECTIONS, type BenchDocument, type Section } from './harness/types.js';
import { benchRing } from './ring.js';
import { benchXen } from './xen.js';
import { benchXenstore } from './xenstore.js';

// dist/bench/run.js -> the repository's bench/ folder.
const benchDir = resolve(fileURLToPath(new URL('.', import.meta.url)), '../../bench');

const argv = process.argv.slice(2);
let out = resolve(benchDir, 'results');
const flags = new Set<string>();
let only: Section[] | undefined;
let render: string | undefined;
for (let i = 0; i < argv.length; i++) {
  const a = argv[i]!;
  if (a === '--out' && argv[i + 1] !== undefined) out = resolve(argv[++i]!);
  else if (a === '--only' && argv[i + 1] !== undefined) {
    only = argv[++i]!.split(',').map((x) => x.trim()) as Section[];
    const bad = only.filter((x) => !(SECTIONS as readonly string[]).includes(x));
    if (bad.length > 0) {
      process.stderr.write(`bench: unknown section ${bad.join(', ')} (sections: ${SECTIONS.join(', ')})\n`);
      process.exit(2);
    }
  }
  else if (a === '--render' && argv[i + 1] !== undefined) render = resolve(argv[++i]!);
  else if (a === '--quick' || a === '--json') flags.add(a);
  else {
    process.stderr.write(`bench: unknown argument ${a} (use --quick, --json, --out DIR, --only SECTION[,SECTION...], --render RESULTS.json)\n`);
    process.exit(2);
  }
}

if (render !== undefined) {
  // A full run's document only: a run of some sections never replaces bench/REPORT.md.
  const doc = JSON.parse(readFileSync(render, 'utf8')) as BenchDocument;
  process.stdout.write(`report: ${await writeReport(doc, out, doc.quick || doc.command.includes('--only') ? undefined : benchDir)}\n`);
  process.exit(0);
}

await runBench({
  quick: flags.has('--quick'),
  json: flags.has('--json'),
  outDir: out,
  // A run of some sections only does not replace bench/REPORT.md.
  ...(only === undefined ? { latestDir: benchDir } : { only }),
  command: `npm run bench${argv.length > 0 ? ` -- ${argv.join(' ')}` : ''}`,
  extraSuites: [
    { name: 'wire format and ring', run: (quick) => benchRing(quick) },
    { name: 'emulated Xen: event channels and grants', run: (quick) => benchXen(quick) },
    { name: 'xenstore', run: (quick) => benchXenstore(quick) },
  ],
});
