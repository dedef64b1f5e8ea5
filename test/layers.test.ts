/**
 * The layers of src/ (docs/architecture.md, GUIDE): a file imports only its own layer and the
 * layers below it, never a peer (xen and xenstore, blkfront and blkback know nothing of each
 * other), and no files import each other in a cycle. Edges are static imports and re-exports
 * (type-only ones too: a type cycle is a design cycle), dynamic imports, and for the layer rule
 * also the worker scripts a file starts (`new URL('./x.js', import.meta.url)`).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, normalize, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const SRC = fileURLToPath(new URL('../../src/', import.meta.url));

/** Lowest first; a layer may import those of a lower rank. Peers share a rank. */
const RANK: Readonly<Record<string, number>> = {
  abi: 0, ring: 1, xen: 2, xenstore: 2, xenbus: 3, nbd: 4, storage: 5, blkfront: 6, blkback: 6,
  toolstack: 7, 'driver-domain': 7, product: 8, '(entry)': 9, cli: 10,
};

interface Edge { readonly from: string; readonly to: string; readonly kind: 'import' | 'worker' }

const IMPORT = /^\s*(?:import|export)\b[^;'"]*?(?:\bfrom\s+)?'(\.[^']+)'/gm;
const DYNAMIC = /\bimport\(\s*'(\.[^']+)'\s*\)/g;
const WORKER = /\bnew URL\(\s*'(\.[^']+)'\s*,\s*import\.meta\.url/g;

/** Every relative import of every file (paths relative to src/, .js read as .ts). */
function edges(files: ReadonlyMap<string, string>): Edge[] {
  const out: Edge[] = [];
  for (const [from, text] of files) {
    const add = (spec: string, kind: Edge['kind']) => {
      const to = normalize(join(dirname(from), spec)).replace(/\.js$/, '.ts').replace(/\.cjs$/, '.cts');
      out.push({ from, to, kind });
    };
    for (const m of text.matchAll(IMPORT)) add(m[1]!, 'import');
    for (const m of text.matchAll(DYNAMIC)) add(m[1]!, 'import');
    for (const m of text.matchAll(WORKER)) add(m[1]!, 'worker');
  }
  return out;
}

const layerOf = (file: string): string => (file.includes('/') ? file.slice(0, file.indexOf('/')) : '(entry)');

/** Imports that go up or sideways, as "from -> to" lines. */
function upward(es: readonly Edge[]): string[] {
  return es.flatMap((e) => {
    const a = layerOf(e.from);
    const b = layerOf(e.to);
    if (a === b) return [];
    const ra = RANK[a];
    const rb = RANK[b];
    if (ra === undefined || rb === undefined) return [`${e.from} -> ${e.to}: layer ${ra === undefined ? a : b} has no rank`];
    return rb < ra ? [] : [`${e.from} -> ${e.to} (${a} may not use ${b})`];
  });
}

/** Import cycles among files (Tarjan's strongly connected components of more than one file, or a self-import). */
function cycles(es: readonly Edge[]): string[][] {
  const next = new Map<string, string[]>();
  for (const e of es) if (e.kind === 'import') next.set(e.from, [...(next.get(e.from) ?? []), e.to]);
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const found: string[][] = [];
  const visit = (v: string): void => {
    index.set(v, index.size);
    low.set(v, index.get(v)!);
    stack.push(v);
    onStack.add(v);
    for (const w of next.get(v) ?? []) {
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (onStack.has(w)) {
        low.set(v, Math.min(low.get(v)!, index.get(w)!));
      }
    }
    if (low.get(v) !== index.get(v)) return;
    const comp: string[] = [];
    for (let w = stack.pop()!; ; w = stack.pop()!) {
      onStack.delete(w);
      comp.push(w);
      if (w === v) break;
    }
    if (comp.length > 1 || (next.get(v) ?? []).includes(v)) found.push(comp.sort());
  };
  for (const v of next.keys()) if (!index.has(v)) visit(v);
  return found;
}

function sources(): Map<string, string> {
  const files = new Map<string, string>();
  const walk = (dir: string): void => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (/\.c?ts$/.test(e.name) && !e.name.endsWith('.d.ts')) files.set(relative(SRC, p), readFileSync(p, 'utf8'));
    }
  };
  walk(SRC);
  return files;
}

test('the checks catch an upward import, a peer import and a cycle', () => {
  const bad = new Map([
    ['abi/a.ts', "import { x } from '../blkfront/b.js';\n"],
    ['blkfront/b.ts', "import type {\n  Y,\n} from '../blkback/c.js';\nexport * from './d.js';\n"],
    ['blkfront/d.ts', "const m = await import('./b.js');\n"],
    ['blkback/c.ts', "new Worker(new URL('../cli/e.js', import.meta.url));\n"],
  ]);
  const es = edges(bad);
  assert.deepEqual(upward(es), [
    'abi/a.ts -> blkfront/b.ts (abi may not use blkfront)',
    'blkfront/b.ts -> blkback/c.ts (blkfront may not use blkback)',
    'blkback/c.ts -> cli/e.ts (blkback may not use cli)',
  ]);
  assert.deepEqual(cycles(es), [['blkfront/b.ts', 'blkfront/d.ts']]);
});

test('src/ imports only downward, and no files import each other in a cycle', () => {
  const files = sources();
  assert.ok(files.size > 100, `${files.size} files read`);
  for (const layer of new Set([...files.keys()].map(layerOf))) assert.ok(layer in RANK, `layer ${layer} has a rank here and a row in docs/architecture.md`);
  const es = edges(files);
  assert.ok(es.length > 300, `${es.length} imports found`);
  for (const e of es) assert.ok(files.has(e.to), `${e.from} imports ${e.to}, which is not a file of src/`);
  assert.deepEqual(upward(es), []);
  assert.deepEqual(cycles(es), []);
});
