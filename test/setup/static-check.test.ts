/**
 * The suite's static check (test/support/static-check.ts): it flags each pattern it exists for,
 * honours an allow comment only with a reason, and finds nothing in the test tree as it stands.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { checkSource, checkTree, formatFinding, type Rule } from '../support/static-check.js';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));

/** The rules `src` breaks, with their lines. */
const flags = (src: string): Array<[number, Rule]> => checkSource('t.ts', src).map((f) => [f.line, f.rule]);

test('a >= 0 on a count, in an assertion, is flagged', () => {
  assert.deepEqual(flags('assert.ok(s.inFlight + s.queued >= 0);'), [[1, 'count-ge-0']]);
  assert.deepEqual(flags('assert.ok(\n  xs.length >= 0,\n  "n");'), [[2, 'count-ge-0']]);
  assert.deepEqual(flags('assert(count >= 0)'), [[1, 'count-ge-0']]);
  // A range check on a value (a u32 here) can fail: not a count.
  assert.deepEqual(flags('assert.ok(Number.isInteger(n) && n >= 0 && n <= 0xffffffff);'), []);
  // Not in an assertion, or not against zero, or inside the message: nothing.
  assert.deepEqual(flags('for (let i = n; i >= 0; i--) f(i);'), []);
  assert.deepEqual(flags('assert.ok(n >= 1, "count >= 0");'), []);
  assert.deepEqual(flags('assert.ok(x >= 0.5);'), []);
  assert.deepEqual(flags('assert.ok(Number.isFinite(idle.cpuPercent) && idle.cpuPercent >= 0);'), [[1, 'count-ge-0']]);
  assert.deepEqual(flags('assert.ok(s.stats.inFlight >= 0);\nassert.ok(rows.size >= 0);'), [[1, 'count-ge-0'], [2, 'count-ge-0']]);
  // A grant reference or an index is negative on failure: `>= 0` on it can fail.
  assert.deepEqual(flags('assert.ok(ref >= 0);\nassert.ok(log.indexOf(e) >= 0);\nassert.ok(refs.every((r) => r >= 0));'), []);
});

test('assert.rejects and assert.throws with a string second argument, or none, are flagged', () => {
  assert.deepEqual(flags("await assert.rejects(p, 'no such node');"), [[1, 'string-expectation']]);
  assert.deepEqual(flags('assert.throws(() => f(), `bad ${x}`);'), [[1, 'string-expectation']]);
  assert.deepEqual(flags('await assert.rejects(\n  run(a, b),\n  "refused",\n);'), [[3, 'string-expectation']]);
  assert.deepEqual(flags("await assert.rejects(p, /refused/, 'why');"), []);
  assert.deepEqual(flags('await assert.rejects(run(a, b));\nassert.throws(() => f());'), [[1, 'no-expectation'], [2, 'no-expectation']]);
  assert.deepEqual(flags("assert.throws(() => f('a, b'), (e) => e instanceof E);"), []);
});

test('a catch that swallows what it caught is flagged', () => {
  assert.deepEqual(flags('p.catch(() => undefined);'), [[1, 'swallowed-error']]);
  assert.deepEqual(flags('await x.read(k).catch(() => {});'), [[1, 'swallowed-error']]);
  assert.deepEqual(flags("q.catch((_e) => '');\nr.catch(() => []);"), [[1, 'swallowed-error'], [2, 'swallowed-error']]);
  assert.deepEqual(flags('try { f(); } catch {}'), [[1, 'swallowed-error']]);
  assert.deepEqual(flags('try { f(); } catch (e) { }'), [[1, 'swallowed-error']]);
  assert.deepEqual(flags('p.catch((e) => { errors.push(e); });'), []);
});

test('a wall-clock reading compared in an assertion is flagged, however it is carried', () => {
  assert.deepEqual(flags('const t0 = Date.now();\nawait f();\nassert.ok(Date.now() - t0 < 5000);'), [[3, 'wall-clock']]);
  assert.deepEqual(flags('const t0 = performance.now();\nconst took = performance.now() - t0;\nassert.ok(took >= 100, `${took}`);'), [[3, 'wall-clock']]);
  assert.deepEqual(flags('assert.ok(r.elapsedMs >= 190);\nassert.ok(r.cpuMicros < 120_000);'), [[1, 'wall-clock'], [2, 'wall-clock']]);
  assert.deepEqual(flags('const s = process.hrtime.bigint();\nassert.ok(process.hrtime.bigint() - s < 10n);'), [[2, 'wall-clock']]);
  // A clock used for a deadline, not asserted on: nothing.
  assert.deepEqual(flags('const end = Date.now() + 50;\nwhile (Date.now() < end) await poll();\nassert.equal(n, 3);'), []);
  assert.deepEqual(checkSource('bench/x.ts', 'assert.ok(Date.now() - t0 < 5);', { wallClock: false }), []);
});

test('an allow comment with a reason spares its line (or the line below it); without one it is a finding', () => {
  assert.deepEqual(flags('p.catch(() => undefined); // static-check: allow cleanup after a failed test'), []);
  assert.deepEqual(flags('// static-check: allow a reason\nassert.ok(count >= 0);'), []);
  assert.deepEqual(flags('// static-check: allow one line only\nf();\nassert.ok(count >= 0);'), [[3, 'count-ge-0']]);
  assert.deepEqual(flags('assert.ok(count >= 0); // static-check: allow').map(([l]) => l), [1, 1]);
});

test('quotes inside regular expressions and comments do not confuse it', () => {
  assert.deepEqual(flags('assert.match(s, /"a" appears twice/);\np.catch(() => undefined);'), [[2, 'swallowed-error']]);
  assert.deepEqual(flags("// p.catch(() => undefined)\n/* assert.ok(count >= 0) */\nconst r = /it's/;"), []);
});

test('findings name the file and the line', () => {
  const [f] = checkSource('test/x/y.test.ts', '\n\nassert.ok(count >= 0);');
  assert.equal(formatFinding(f!), 'test/x/y.test.ts:3: `>= 0` in an assertion cannot fail on a count: assert.ok(count >= 0);');
});

test('the test tree has no check that cannot fail, swallowed error or timed assertion', () => {
  const found = checkTree(ROOT);
  assert.equal(found.length, 0, `\n${found.map(formatFinding).join('\n')}`);
});
