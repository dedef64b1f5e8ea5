import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  XenbusStateClosed,
  XenbusStateClosing,
  XenbusStateConnected,
  XenbusStateInitWait,
  XenbusStateInitialised,
  XenbusStateInitialising,
  parseXenbusState,
  xenbusMayMove,
  xenbusStateName,
} from '../../src/xenbus/state.js';
import { backendPath, frontendPath, xvdName, xvdVirtualDevice } from '../../src/xenbus/paths.js';

// The state values are xenbus.h's, compiled: test/conformance/xen-constants.test.ts.
test('xenbus.h state names and parsing', () => {
  assert.deepEqual(
    [XenbusStateInitialising, XenbusStateInitWait, XenbusStateInitialised, XenbusStateConnected, XenbusStateClosing, XenbusStateClosed].map(xenbusStateName),
    ['Initialising', 'InitWait', 'Initialised', 'Connected', 'Closing', 'Closed'],
  );
  assert.equal(xenbusStateName(2), 'InitWait');
  assert.equal(parseXenbusState('4'), 4);
  for (const bad of ['9', '-1', '', 'Connected', '44', undefined]) assert.equal(parseXenbusState(bad), undefined);
});

test('blkif.h startup and shutdown moves', () => {
  // The documented sequence, each side's moves.
  assert.ok(xenbusMayMove('backend', XenbusStateInitialising, XenbusStateInitWait));
  assert.ok(xenbusMayMove('frontend', XenbusStateInitialising, XenbusStateInitialised));
  assert.ok(xenbusMayMove('backend', XenbusStateInitWait, XenbusStateConnected));
  assert.ok(xenbusMayMove('frontend', XenbusStateInitialised, XenbusStateConnected));
  // Only the backend waits in InitWait; a connected frontend cannot go back to Initialised.
  assert.ok(!xenbusMayMove('frontend', XenbusStateInitialising, XenbusStateInitWait));
  assert.ok(!xenbusMayMove('frontend', XenbusStateConnected, XenbusStateInitialised));
  // Either side closes from anywhere it is connected, and may start again after Closed.
  for (const side of ['frontend', 'backend'] as const) {
    assert.ok(xenbusMayMove(side, XenbusStateConnected, XenbusStateClosing));
    assert.ok(xenbusMayMove(side, XenbusStateClosing, XenbusStateClosed));
    assert.ok(xenbusMayMove(side, XenbusStateClosed, XenbusStateInitialising));
    assert.ok(!xenbusMayMove(side, XenbusStateClosing, XenbusStateConnected));
  }
});

test('device paths', () => {
  assert.equal(frontendPath(5, 51712), '/local/domain/5/device/vbd/51712');
  assert.equal(backendPath(0, 5, 51712), '/local/domain/0/backend/vbd/5/51712');
  assert.equal(xvdVirtualDevice(0), 51712);
  assert.equal(xvdVirtualDevice(1), 51728);
  assert.equal(xvdVirtualDevice(15), (202 << 8) | (15 << 4), 'xvdp, the last of the 202 form');
  assert.equal(xvdVirtualDevice(16), (1 << 28) | (16 << 8), 'xvdq: the extended form (vbd-interface.txt)');
  assert.equal(xvdVirtualDevice(63), 268451584);
  assert.throws(() => xvdVirtualDevice(1 << 20), RangeError);
  assert.deepEqual([0, 1, 25, 26, 27, 63, 701, 702].map(xvdName), ['xvda', 'xvdb', 'xvdz', 'xvdaa', 'xvdab', 'xvdbl', 'xvdzz', 'xvdaaa']);
});
