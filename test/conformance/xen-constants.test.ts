/**
 * The emulated hypervisor's constants against Xen's genuine public headers (xen.h,
 * grant_table.h, event_channel.h from libxen-dev): every GTF_*, GNTTAB*_*, GNTMAP_*, GNTCOPY_*,
 * GNTST_*, EVTCHNOP_*, EVTCHNSTAT_* and DOMID_* we export is printed by a C program built with
 * gcc against those headers and must be equal.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as xen from '../../src/xen/constants.js';
import { needTools } from '../support/tools.js';

needTools('/usr/include/xen/grant_table.h', 'gcc');

const FROM_HEADERS = /^(GTF_|GNTTAB_|GNTTABOP_|GNTMAP_|GNTCOPY_|GNTST_|EVTCHNOP_|EVTCHNSTAT_|DOMID_)/;

test("the hypervisor constants are Xen's, value for value", () => {
  const names = Object.keys(xen).filter((n) => FROM_HEADERS.test(n)).sort();
  assert.ok(names.length >= 50, `found ${names.length} constants`);
  assert.ok(names.includes('EVTCHNOP_bind_vcpu') && names.includes('GNTST_eagain') && names.includes('DOMID_SELF'));
  const dir = mkdtempSync(join(tmpdir(), 'blkif-xen-constants-'));
  try {
    const src = join(dir, 'constants.c');
    writeFileSync(src, [
      '#include <stdio.h>', '#include <stdint.h>',
      '#include <xen/xen.h>', '#include <xen/grant_table.h>', '#include <xen/event_channel.h>',
      'int main(void) {',
      ...names.map((n) => `  printf("%s %lld\\n", "${n}", (long long)(${n}));`),
      '  return 0;', '}', '',
    ].join('\n'));
    const bin = join(dir, 'constants');
    execFileSync('gcc', ['-std=gnu11', '-Wall', '-Werror', '-o', bin, src], { stdio: 'pipe' });
    const fromC = new Map(execFileSync(bin, { encoding: 'utf8' }).trim().split('\n').map((l) => {
      const [n, v] = l.split(' ');
      return [n!, Number(v)] as const;
    }));
    for (const n of names) assert.equal((xen as Record<string, unknown>)[n], fromC.get(n), n);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
