/**
 * A cheap static check of the test suite's own sources for checks that cannot fail or that fail
 * because the machine is busy (issue 26): `>= 0` on a count inside an assertion (a count is never
 * negative), `assert.rejects`/`assert.throws` given a string as their second argument (that
 * string is the failure message, not an expectation: any error passes) or no expectation at
 * all, a `.catch` or `catch` that swallows
 * what it caught, and wall-clock readings (Date.now(), performance.now(), process.hrtime,
 * cpuUsage, eventLoopUtilization, and values derived from them) compared in an assertion — speed
 * is measured in bench/, not asserted in tests.
 *
 * A line that really means it says so: `// static-check: allow <reason>` on the line itself or
 * alone on the line above. The reason is required.
 */
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';

export type Rule = 'count-ge-0' | 'string-expectation' | 'no-expectation' | 'swallowed-error' | 'wall-clock';

export interface Finding {
  file: string;
  line: number;
  rule: Rule;
  text: string;
}

const ALLOW = /\/\/\s*static-check:\s*allow\s+\S/;
const ALLOW_BARE = /\/\/\s*static-check:\s*allow\s*$/;

const CLOCK = /\b(?:Date\.now|performance\.now|process\.hrtime(?:\.bigint)?|process\.cpuUsage|performance\.eventLoopUtilization)\s*\(/;
/** Fields a fixture fills from the clock (test/xen/fixtures/guest.ts's idle reply, ...). */
const CLOCK_FIELDS = /\.(?:elapsed\w*|cpuMicros|elu|settledAt)\b/;
const ASSERTION = /(?<![.\w])assert(?:\.(?:ok|equal|strictEqual|notEqual|deepEqual|deepStrictEqual|match|doesNotMatch))?\s*\(/g;
const SWALLOW_CATCH = /\.catch\(\s*(?:\(\s*\w*\s*\)|\w+)\s*=>\s*(?:undefined|null|void 0|\{\s*\}|''|""|``|\[\]|false|true|0)\s*\)/;
const EMPTY_CATCH_BLOCK = /\bcatch\s*(?:\(\s*\w*\s*\))?\s*\{\s*\}/;
const STRING_EXPECTATION = /\bassert\.(?:rejects|throws)\s*\(/g;

/** Blanks out comments and the contents of string literals so that the rules see code only. */
function codeOnly(src: string): string {
  let out = '';
  let i = 0;
  while (i < src.length) {
    const c = src[i]!;
    const n = src[i + 1];
    if (c === '/' && n === '/') {
      while (i < src.length && src[i] !== '\n') { out += ' '; i++; }
    } else if (c === '/' && n === '*') {
      while (i < src.length && !(src[i] === '*' && src[i + 1] === '/')) { out += src[i] === '\n' ? '\n' : ' '; i++; }
      out += '  ';
      i += 2;
    } else if (c === '/' && /(?:^|[(,=:[!&|?{};+\-*%<>~^]|\breturn|\btypeof)\s*$/.test(out.slice(-20))) {
      // A regular-expression literal: its quotes are not strings. Blank it (class brackets may hold '/').
      out += '/';
      i++;
      let inClass = false;
      while (i < src.length && src[i] !== '\n' && (inClass || src[i] !== '/')) {
        if (src[i] === '\\') { out += '  '; i += 2; continue; }
        if (src[i] === '[') inClass = true;
        else if (src[i] === ']') inClass = false;
        out += '_';
        i++;
      }
      out += '/';
      i++;
    } else if (c === "'" || c === '"' || c === '`') {
      out += c;
      i++;
      while (i < src.length && src[i] !== c) {
        if (src[i] === '\\') { out += '  '; i += 2; continue; }
        if (c !== '`' && src[i] === '\n') break;
        out += src[i] === '\n' ? '\n' : '_';
        i++;
      }
      out += c;
      i++;
    } else {
      out += c;
      i++;
    }
  }
  return out;
}

/** The index just past the parenthesis matching the one at `open`, in code-only text. */
function closing(code: string, open: number): number {
  let depth = 0;
  for (let i = open; i < code.length; i++) {
    if (code[i] === '(' || code[i] === '[' || code[i] === '{') depth++;
    else if (code[i] === ')' || code[i] === ']' || code[i] === '}') {
      depth--;
      if (depth === 0) return i + 1;
    }
  }
  return code.length;
}

/** The top-level arguments of the call whose `(` is at `open`, as [start, end) offsets. */
function args(code: string, open: number): Array<[number, number]> {
  const end = closing(code, open) - 1;
  const out: Array<[number, number]> = [];
  let depth = 0;
  let start = open + 1;
  for (let i = open + 1; i < end; i++) {
    const c = code[i];
    if (c === '(' || c === '[' || c === '{') depth++;
    else if (c === ')' || c === ']' || c === '}') depth--;
    else if (c === ',' && depth === 0) { out.push([start, i]); start = i + 1; }
  }
  if (code.slice(start, end).trim() !== '') out.push([start, end]);
  return out;
}

/** The operand left of the operator at `at`: back to the enclosing bracket, `,`, `&&`, `||`, `!` or `?`. */
function leftOperand(body: string, at: number): string {
  let depth = 0;
  let i = at - 1;
  for (; i >= 0; i--) {
    const c = body[i]!;
    if (c === ')' || c === ']' || c === '}') depth++;
    else if (c === '(' || c === '[' || c === '{') { if (depth === 0) break; depth--; }
    else if (depth === 0 && (c === ',' || c === '&' || c === '|' || c === '!' || c === '?' || c === ':')) break;
  }
  return body.slice(i + 1, at).trim();
}

/**
 * Whether an operand is a count, which is never negative: a sum, or a name saying it counts
 * (length, size, count, total, inFlight, bytes, percent...). A grant reference, a port or an
 * index from indexOf is negative on failure, so `>= 0` on those can fail and is not flagged.
 */
function isCount(operand: string): boolean {
  if (/[^+]\+[^+=]/.test(operand)) return true;
  const last = /(\w+)\s*(?:\(\s*\))?$/.exec(operand)?.[1] ?? '';
  return /^(?:length|size|count|total|inFlight|queued|pending|bytes|ios|sent|received|checked|resolved|verified)$|(?:Count|Total|Bytes|Percent|Size|Length|Checked|Resolved|Verified|Sent)$|^(?:count|total|num)[A-Z]/.test(last);
}

/** Every finding in one file's source; `file` is how findings name it. */
export function checkSource(file: string, src: string, opts: { wallClock?: boolean } = {}): Finding[] {
  const code = codeOnly(src);
  const lines = src.split('\n');
  const lineStarts: number[] = [0];
  for (let i = 0; i < src.length; i++) if (src[i] === '\n') lineStarts.push(i + 1);
  const lineOf = (offset: number): number => {
    let lo = 0;
    let hi = lineStarts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (lineStarts[mid]! <= offset) lo = mid; else hi = mid - 1;
    }
    return lo + 1;
  };
  const allowed = (line: number): boolean => {
    const here = lines[line - 1] ?? '';
    const above = (lines[line - 2] ?? '').trim();
    return ALLOW.test(here) || (above.startsWith('//') && ALLOW.test(above));
  };
  const found = new Map<string, Finding>();
  const report = (offset: number, rule: Rule) => {
    const line = lineOf(offset);
    if (allowed(line)) return;
    found.set(`${line}:${rule}`, { file, line, rule, text: (lines[line - 1] ?? '').trim() });
  };

  // An allow comment without a reason is itself a finding of every rule it might have hidden.
  lines.forEach((l, i) => {
    if (ALLOW_BARE.test(l)) found.set(`${i + 1}:reason`, { file, line: i + 1, rule: 'swallowed-error', text: `${l.trim()}  <- allow needs a reason` });
  });

  // Values read from the clock, directly or through arithmetic on other such values.
  const timed = new Set<string>();
  if (opts.wallClock !== false) {
    const decl = /\b(?:const|let|var)\s+(\w+)\s*(?::[^=]+)?=\s*([^;\n]+)/g;
    for (let again = true; again;) {
      again = false;
      for (const m of code.matchAll(decl)) {
        const [, name, init] = m;
        if (timed.has(name!)) continue;
        if (CLOCK.test(init!) || [...timed].some((t) => new RegExp(`\\b${t}\\b`).test(init!))) {
          timed.add(name!);
          again = true;
        }
      }
    }
  }

  for (const m of code.matchAll(ASSERTION)) {
    const open = m.index + m[0].length - 1;
    const end = closing(code, open);
    const body = code.slice(open, end);
    for (const ge of body.matchAll(/>=\s*0(?![\w.])/g)) if (isCount(leftOperand(body, ge.index))) report(open + ge.index, 'count-ge-0');
    if (opts.wallClock !== false) {
      const usesClock = CLOCK.test(body) || CLOCK_FIELDS.test(body) || [...timed].some((t) => new RegExp(`(?<![.\\w])${t}\\b`).test(body));
      if (usesClock && /[<>]=?|\bequal\b|\bok\b/.test(code.slice(m.index, end))) report(m.index, 'wall-clock');
    }
  }

  for (const m of code.matchAll(STRING_EXPECTATION)) {
    const open = m.index + m[0].length - 1;
    const a = args(code, open);
    if (a.length >= 2) {
      const second = code.slice(a[1]![0], a[1]![1]).trim();
      if (/^['"`]/.test(second)) report(a[1]![0] + code.slice(a[1]![0]).search(/\S/), 'string-expectation');
    } else report(m.index, 'no-expectation');
  }

  for (const re of [SWALLOW_CATCH, EMPTY_CATCH_BLOCK]) {
    for (const m of code.matchAll(new RegExp(re.source, 'g'))) report(m.index, 'swallowed-error');
  }

  return [...found.values()].sort((x, y) => x.line - y.line);
}

/** Every .ts file under `dir`, recursively. */
function sources(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...sources(p));
    else if (name.endsWith('.ts')) out.push(p);
  }
  return out;
}

/** Checks every TypeScript source under `root`/test; the wall-clock rule spares bench code. */
export function checkTree(root: string): Finding[] {
  const test = join(root, 'test');
  return sources(test).flatMap((p) => {
    const rel = relative(root, p);
    return checkSource(rel, readFileSync(p, 'utf8'), { wallClock: !rel.startsWith(join('test', 'bench')) });
  });
}

export function formatFinding(f: Finding): string {
  const why: Record<Rule, string> = {
    'count-ge-0': '`>= 0` in an assertion cannot fail on a count',
    'string-expectation': 'a string second argument is a message, not an expectation: any error passes',
    'no-expectation': 'no expectation of the error: any error passes',
    'swallowed-error': 'an error swallowed: a failure here is never seen',
    'wall-clock': 'a wall-clock reading asserted: speed belongs in bench/',
  };
  return `${f.file}:${f.line}: ${why[f.rule]}: ${f.text}`;
}
