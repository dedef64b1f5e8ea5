// A guest domain through its shared xenstore page.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  XENSTORE_ERROR_OFFSET,
  XENSTORE_ERROR_PROTO,
  XENSTORE_PAYLOAD_MAX,
  XENSTORE_SERVER_FEATURES_OFFSET,
  XS_READ,
  XenstoreDaemon,
  XenstoreError,
  encodeHeader,
} from '../../src/xenstore/index.js';
import { connectGuest, startSocketDaemon } from './helpers.js';
import { unlessGone } from '../support/common.js';

async function code(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'OK';
  } catch (e) {
    assert.ok(e instanceof XenstoreError, String(e));
    return e.code;
  }
}

/** dom0 sets up /local/domain/5 owned by the guest, as a toolstack does. */
async function setupDomain(daemon: XenstoreDaemon, domid: number) {
  const dom0 = connectGuest(daemon, 0).client;
  await dom0.mkdir(`/local/domain/${domid}`);
  await dom0.setPerms(`/local/domain/${domid}`, [{ domid, perm: 'n' }]);
  await dom0.write('/secret', 'dom0 only');
  await dom0.write('/public', 'hello');
  await dom0.setPerms('/public', [{ domid: 0, perm: 'r' }]);
  return dom0;
}

test('guest: permissions deny, own subtree allowed, relative paths resolved', async () => {
  const daemon = new XenstoreDaemon();
  const dom0 = await setupDomain(daemon, 5);
  const g = connectGuest(daemon, 5);
  assert.equal(new DataView(g.page.buffer).getUint32(XENSTORE_SERVER_FEATURES_OFFSET, true), 3);
  const c = g.client;
  assert.equal(await code(c.read('/secret')), 'EACCES');
  assert.equal(await code(c.write('/secret', 'x')), 'EACCES');
  assert.equal(await code(c.write('/newtop', 'x')), 'EACCES'); // root is n0
  assert.equal(await code(c.read('/no/such')), 'EACCES'); // absence is not revealed
  assert.equal(await c.read('/public'), 'hello');
  assert.equal(await code(c.write('/public', 'x')), 'EACCES');
  // Relative paths live below /local/domain/5.
  await c.write('device/vbd/768/state', '1');
  assert.equal(await dom0.read('/local/domain/5/device/vbd/768/state'), '1');
  assert.equal(await c.read('/local/domain/5/device/vbd/768/state'), '1');
  assert.equal(await code(c.read('device/missing')), 'ENOENT');
  // Created nodes are owned by the guest, inheriting the parent's other entries.
  assert.deepEqual(await dom0.getPerms('/local/domain/5/device/vbd/768/state'), [{ domid: 5, perm: 'n' }]);
  // The guest may not give its node away, nor read other guests' areas.
  assert.equal(await code(c.setPerms('device', [{ domid: 0, perm: 'n' }])), 'EPERM');
  await c.setPerms('device', [{ domid: 5, perm: 'r' }]);
  assert.equal(await code(c.read('/local/domain/0')), 'EACCES');
  assert.equal(await c.getDomainPath(5), '/local/domain/5');
  // Privileged-only operations.
  assert.equal(await code(c.introduce(9, 1, 1)), 'EACCES');
  assert.equal(await code(c.release(5)), 'EACCES');
  // Watches fire only where the guest may read.
  const events: string[] = [];
  await c.watch('device', 'tok', (p) => events.push(p));
  await c.watch('/secret', 'tok2', (p) => events.push(p));
  await dom0.write('/local/domain/5/device/new', 'v');
  await dom0.write('/secret', 'changed');
  await c.read('device/new'); // round trip: events were sent before this reply
  assert.deepEqual(events, ['device', '/secret', 'device/new']);
  await daemon.close();
});

test('guest quotas: nodes, entry size, watches, transactions (cxenstored errors)', async () => {
  const daemon = new XenstoreDaemon({ quotas: { nodesPerDomain: 5, watchesPerDomain: 2, transactionsPerDomain: 1, maxEntrySize: 200 } });
  await setupDomain(daemon, 3);
  const c = connectGuest(daemon, 3).client;
  // The guest already owns its home /local/domain/3: four more nodes fit.
  for (let i = 0; i < 4; i++) await c.write(`n${i}`, 'x');
  assert.equal(await code(c.write('n4', 'x')), 'ENOSPC');
  assert.equal(await code(c.write('n0', 'y'.repeat(300))), 'ENOSPC');
  await c.watch('n0', 'a', () => undefined);
  await c.watch('n1', 'a', () => undefined);
  assert.equal(await code(c.watch('n2', 'a', () => undefined)), 'E2BIG');
  const tx = await c.transactionStart();
  assert.equal(await code(c.transactionStart()), 'ENOSPC');
  await c.transactionEnd(tx, false);
  await daemon.close();
});

test('guest quotas in oxenstored style answer EQUOTA', async () => {
  const daemon = new XenstoreDaemon({ quotaErrorStyle: 'oxenstored', quotas: { nodesPerDomain: 2, watchesPerDomain: 0 } });
  await setupDomain(daemon, 3);
  const c = connectGuest(daemon, 3).client;
  await c.write('a', 'x');
  assert.equal(await code(c.write('b', 'x')), 'EQUOTA');
  assert.equal(await code(c.watch('a', 't', () => undefined)), 'EQUOTA');
  await daemon.close();
});

test('oversized payload on the page sets error=XENSTORE_ERROR_PROTO; others unaffected', async () => {
  const daemon = new XenstoreDaemon();
  const dom0 = await setupDomain(daemon, 4);
  const g = connectGuest(daemon, 4);
  await g.client.write('ok', '1');
  g.transport.send(encodeHeader({ type: XS_READ, reqId: 99, txId: 0, len: XENSTORE_PAYLOAD_MAX + 1 }));
  await new Promise((r) => setImmediate(r));
  assert.equal(new DataView(g.page.buffer).getUint32(XENSTORE_ERROR_OFFSET, true), XENSTORE_ERROR_PROTO);
  assert.ok(g.server.isIgnored);
  await assert.rejects(g.client.read('ok'), /xenstore page error 3/); // XENSTORE_ERROR_PROTO
  assert.equal(await dom0.read('/local/domain/4/ok'), '1');
  await daemon.close();
});

test('a large exchange streams through the 1 KiB rings', async () => {
  const daemon = new XenstoreDaemon();
  const c = connectGuest(daemon, 0).client;
  const big = 'z'.repeat(XENSTORE_PAYLOAD_MAX - 20);
  await Promise.all(Array.from({ length: 8 }, (_, i) => c.write(`/big/${i}`, big)));
  const back = await Promise.all(Array.from({ length: 8 }, (_, i) => c.read(`/big/${i}`)));
  for (const b of back) assert.equal(b, big);
  await daemon.close();
});

test('introduce/release: special watches fire, released guest loses watches and nodes', async () => {
  const d = await startSocketDaemon();
  try {
    const { XenstoreClient } = await import('../../src/xenstore/index.js');
    const tool = await XenstoreClient.connectSocket(d.socketPath);
    const events: string[] = [];
    await tool.watch('@introduceDomain', 'i', (p) => events.push(p));
    await tool.watch('@releaseDomain', 'r', (p) => events.push(p));
    await tool.introduce(7, 1234, 5);
    assert.equal(await tool.isDomainIntroduced(7), true);
    assert.equal(await tool.isDomainIntroduced(8), false);
    await tool.mkdir('/local/domain/8');
    await tool.setPerms('/local/domain/8', [{ domid: 8, perm: 'n' }]);
    const g = connectGuest(d.daemon, 8);
    await g.client.write('data', '1');
    await g.client.watch('data', 'gw', () => undefined);
    assert.equal(d.daemon.watchCount(8), 1);
    await tool.release(7);
    assert.equal(await code(tool.release(7)), 'ENOENT');
    assert.equal(d.daemon.releaseDomain(8), true);
    assert.equal(await tool.exists('/local/domain/8'), false); // owned by dom8: removed as cxenstored does
    await unlessGone(tool.read('/tool/xenstored')); // a round trip: the events before its reply have arrived
    assert.deepEqual(events, ['@introduceDomain', '@releaseDomain', '@introduceDomain', '@introduceDomain', '@releaseDomain', '@releaseDomain']);
    assert.equal(d.daemon.watchCount(8), 0);
    tool.close();
  } finally {
    await d.close();
  }
});
