/**
 * A driver that gives up says why where Xen's tools look (Linux `xenbus_dev_fatal` /
 * `xenbus_dev_error`, drivers/xen/xenbus/xenbus_client.c): the node `error/<nodename>/error`
 * under its domain's home holds "<errno> <message>", and a backend moves to Closing. Here a
 * frontend writes rings blkback must refuse, and a backend publishes a disk blkfront must refuse.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { EINVAL, ENOSYS, XS_EVENT_CHANNEL, XS_PROTOCOL, XS_RING_PAGE_ORDER, XS_RING_REF, XS_SECTORS, XS_SECTOR_SIZE } from '../../src/abi/index.js';
import { Blkfront } from '../../src/blkfront/index.js';
import { Toolstack, createVbdNodes, removeVbdNodes, type DomainProxy } from '../../src/toolstack/index.js';
import {
  XS_STATE, XenbusStateClosing, XenbusStateInitWait, XenbusStateInitialised, errorNodePath, waitForState, xvdVirtualDevice,
} from '../../src/xenbus/index.js';
import { eventually, unlessGone } from '../support/common.js';

let ts: Toolstack;
let back: DomainProxy;
before(async () => {
  ts = await Toolstack.start();
  back = await ts.createBackendDomain();
});
after(async () => {
  await ts.shutdown();
});

test('the error node lives under the domain\'s home, at error/<nodename>/error', () => {
  assert.equal(errorNodePath('/local/domain/1/backend/vbd/2/51712'), '/local/domain/1/error/backend/vbd/2/51712/error');
  assert.equal(errorNodePath('/local/domain/2/device/vbd/51712'), '/local/domain/2/error/device/vbd/51712/error');
});

for (const bad of [
  { what: 'an unknown protocol', key: XS_PROTOCOL, value: 'arm-abi', errno: ENOSYS, says: /frontend protocol "arm-abi"/ },
  { what: 'a ring order beyond the offer', key: XS_RING_PAGE_ORDER, value: '9', errno: EINVAL, says: /ring-page-order "9"/ },
]) {
  test(`blkback refusing ${bad.what} writes "<errno> <message>" to its error node and goes Closing`, async () => {
    const L = ts.hv.createLocalDomain({ memoryPages: 64 });
    const storage = { kind: 'memory' as const, size: 1 << 20 };
    const paths = await createVbdNodes(ts.xs, { frontDomid: L.domid, backDomid: back.domid, devid: xvdVirtualDevice(0) }, storage, false);
    try {
      await back.rpc.call('addVbd', paths.backDir, storage, { maxRingPageOrder: 2 });
      await waitForState(ts.xs, paths.backDir, (s) => s === XenbusStateInitWait, 30_000);
      const node = errorNodePath(paths.backDir);
      assert.equal(await unlessGone(ts.xs.read(node)), undefined, 'no error before one happens');
      // Rings that would do, but for the one bad node.
      await ts.xs.write(`${paths.frontDir}/${XS_RING_REF}`, '8');
      await ts.xs.write(`${paths.frontDir}/${XS_EVENT_CHANNEL}`, '3');
      await ts.xs.write(`${paths.frontDir}/${XS_PROTOCOL}`, 'x86_64-abi');
      await ts.xs.write(`${paths.frontDir}/${bad.key}`, bad.value);
      await ts.xs.write(`${paths.frontDir}/${XS_STATE}`, String(XenbusStateInitialised));
      await waitForState(ts.xs, paths.backDir, (s) => s === XenbusStateClosing, 30_000);
      const text = await ts.xs.read(node);
      const m = /^(\d+) (.+)$/.exec(text);
      assert.ok(m !== null, `"<errno> <message>": ${text}`);
      assert.equal(Number(m[1]), bad.errno);
      assert.match(m[2]!, bad.says);
      const st = await back.rpc.call<{ error: string | undefined }>('status', paths.backDir);
      assert.equal(st.error, m[2], 'the status says the same');
      await back.rpc.call('removeVbd', paths.backDir);
    } finally {
      await removeVbdNodes(ts.xs, paths);
      await ts.hv.destroyDomain(L.domid);
    }
  });
}

test('blkfront refusing a backend\'s disk writes its error node', async () => {
  const G = ts.hv.createLocalDomain({ memoryPages: 512 });
  const paths = await createVbdNodes(ts.xs, { frontDomid: G.domid, backDomid: back.domid, devid: xvdVirtualDevice(0) }, { kind: 'memory', size: 1 << 20 }, false);
  const attaching = Blkfront.attach({ xen: G, xs: ts.xs, frontDir: paths.frontDir, options: { bufferPages: 64, connectTimeoutMs: 3000 } });
  attaching.catch(() => undefined); // static-check: allow the attach ends in the cleanup below, whichever way
  try {
    // A raw backend: offers nothing, then publishes a sector size that is no power of two.
    await ts.xs.write(`${paths.backDir}/${XS_STATE}`, String(XenbusStateInitWait));
    await waitForState(ts.xs, paths.frontDir, (s) => s === XenbusStateInitialised, 30_000);
    await ts.xs.write(`${paths.backDir}/${XS_SECTORS}`, '2048');
    await ts.xs.write(`${paths.backDir}/${XS_SECTOR_SIZE}`, '1000');
    await ts.xs.write(`${paths.backDir}/${XS_STATE}`, '4');
    const node = errorNodePath(paths.frontDir);
    let text: string | undefined;
    await eventually(async () => (text = await unlessGone(ts.xs.read(node))) !== undefined, 'blkfront writes its error node', 30_000);
    assert.match(text!, new RegExp(`^${EINVAL} backend ${paths.backDir}: sector-size 1000: must be a power of two`));
  } finally {
    await ts.xs.write(`${paths.backDir}/${XS_STATE}`, '6');
    // static-check: allow cleanup: the error node is what this test checks, not the attach's end
    const f = await attaching.catch(() => undefined);
    await f?.close().catch(() => undefined); // static-check: allow cleanup of an attach that should not have succeeded
    await removeVbdNodes(ts.xs, paths);
    await ts.hv.destroyDomain(G.domid);
  }
});
