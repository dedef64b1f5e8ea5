/**
 * The NBD protocol's constants against C headers that carry them (as xen-constants.test.ts does
 * for Xen): Linux's <linux/nbd.h> (the kernel's NBD client: commands, transmission flags, magics),
 * libnbd's <libnbd.h> (command and handshake flags, by their LIBNBD_ names) and <errno.h>, whose
 * values the NBD spec's error codes are ("the Linux errno values"). Each pair is printed by a C
 * program built with gcc and must be equal. Constants no installed header carries (option and
 * reply numbers, the newstyle magics) are exercised by real clients in test/e2e and test/cli.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as errno from '../../src/abi/errno.js';
import * as nbd from '../../src/nbd/constants.js';
import { needTools } from '../support/tools.js';

needTools('/usr/include/linux/nbd.h', '/usr/include/libnbd.h', 'gcc');

/** Ours -> the C expression that must have its value. */
const PAIRS: readonly (readonly [string, number, string])[] = [
  ...(['NBD_CMD_READ', 'NBD_CMD_WRITE', 'NBD_CMD_DISC', 'NBD_CMD_FLUSH', 'NBD_CMD_TRIM',
    'NBD_FLAG_HAS_FLAGS', 'NBD_FLAG_READ_ONLY', 'NBD_FLAG_SEND_FLUSH', 'NBD_FLAG_SEND_FUA', 'NBD_FLAG_SEND_TRIM', 'NBD_FLAG_CAN_MULTI_CONN',
    'NBD_REQUEST_MAGIC', 'NBD_REPLY_MAGIC'] as const).map((n) => [n, nbd[n], n] as const),
  // The kernel keeps command flags in the request type's upper half: ours are the wire's 16 bits.
  ['NBD_CMD_FLAG_FUA', nbd.NBD_CMD_FLAG_FUA, 'NBD_CMD_FLAG_FUA >> 16'],
  ['NBD_CMD_FLAG_FUA', nbd.NBD_CMD_FLAG_FUA, 'LIBNBD_CMD_FLAG_FUA'],
  ['NBD_CMD_FLAG_NO_HOLE', nbd.NBD_CMD_FLAG_NO_HOLE, 'LIBNBD_CMD_FLAG_NO_HOLE'],
  ['NBD_CMD_FLAG_DF', nbd.NBD_CMD_FLAG_DF, 'LIBNBD_CMD_FLAG_DF'],
  ['NBD_CMD_FLAG_REQ_ONE', nbd.NBD_CMD_FLAG_REQ_ONE, 'LIBNBD_CMD_FLAG_REQ_ONE'],
  ['NBD_CMD_FLAG_FAST_ZERO', nbd.NBD_CMD_FLAG_FAST_ZERO, 'LIBNBD_CMD_FLAG_FAST_ZERO'],
  ['NBD_FLAG_FIXED_NEWSTYLE', nbd.NBD_FLAG_FIXED_NEWSTYLE, 'LIBNBD_HANDSHAKE_FLAG_FIXED_NEWSTYLE'],
  ['NBD_FLAG_NO_ZEROES', nbd.NBD_FLAG_NO_ZEROES, 'LIBNBD_HANDSHAKE_FLAG_NO_ZEROES'],
  ['NBD_FLAG_C_FIXED_NEWSTYLE', nbd.NBD_FLAG_C_FIXED_NEWSTYLE, 'LIBNBD_HANDSHAKE_FLAG_FIXED_NEWSTYLE'],
  ['NBD_FLAG_C_NO_ZEROES', nbd.NBD_FLAG_C_NO_ZEROES, 'LIBNBD_HANDSHAKE_FLAG_NO_ZEROES'],
  ['NBD_EPERM', nbd.NBD_EPERM, 'EPERM'],
  ['NBD_EIO', nbd.NBD_EIO, 'EIO'],
  ['NBD_ENOMEM', nbd.NBD_ENOMEM, 'ENOMEM'],
  ['NBD_EINVAL', nbd.NBD_EINVAL, 'EINVAL'],
  ['NBD_ENOSPC', nbd.NBD_ENOSPC, 'ENOSPC'],
  ['NBD_EOVERFLOW', nbd.NBD_EOVERFLOW, 'EOVERFLOW'],
  ['NBD_ENOTSUP', nbd.NBD_ENOTSUP, 'ENOTSUP'],
  ['NBD_ESHUTDOWN', nbd.NBD_ESHUTDOWN, 'ESHUTDOWN'],
  // The errno values the xenbus error nodes and Xen's hypercalls speak (src/abi/errno.ts).
  ...Object.entries(errno).map(([n, v]) => [`abi ${n}`, v as number, n] as const),
];

test('the NBD constants are the headers\', value for value', () => {
  assert.ok(PAIRS.length >= 30, `${PAIRS.length} pairs`);
  const dir = mkdtempSync(join(tmpdir(), 'blkif-nbd-constants-'));
  try {
    const src = join(dir, 'constants.c');
    writeFileSync(src, [
      '#include <stdio.h>', '#include <errno.h>', '#include <linux/nbd.h>', '#include <libnbd.h>',
      'int main(void) {',
      ...PAIRS.map(([, , c], i) => `  printf("%d %lld\\n", ${i}, (long long)(${c}));`),
      '  return 0;', '}', '',
    ].join('\n'));
    const bin = join(dir, 'constants');
    execFileSync('gcc', ['-std=gnu11', '-Wall', '-Werror', '-o', bin, src], { stdio: 'pipe' });
    const fromC = execFileSync(bin, { encoding: 'utf8' }).trim().split('\n').map((l) => Number(l.split(' ')[1]));
    assert.equal(fromC.length, PAIRS.length);
    for (const [i, [ours, value, c]] of PAIRS.entries()) assert.equal(value, fromC[i], `${ours} = ${c}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
