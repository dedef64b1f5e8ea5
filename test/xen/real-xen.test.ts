/**
 * The real-Xen access where there is no Xen (this machine, any CI): opening it fails with one
 * line naming the device that is missing, and nothing else in blkif needs it (the rig in
 * test/realxen proves it where Xen runs).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { RealXen } from '../../src/xen/real/real-xen.js';

test('RealXen.open outside a Xen domain fails with one line naming /dev/xen/gntdev', { skip: existsSync('/dev/xen/gntdev') ? 'this is a Xen domain' : false }, () => {
  assert.throws(() => RealXen.open({ domid: 0 }), (e: Error) => {
    assert.match(e.message, /\/dev\/xen\/gntdev/);
    assert.doesNotMatch(e.message, /\n/);
    return true;
  });
});
