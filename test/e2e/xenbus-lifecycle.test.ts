/**
 * The xenbus state dance beyond the happy path (blkif.h startup, xenbus.h Closing/Closed): a
 * backend still Connected to a frontend that vanished, a backend that goes away and comes back
 * while I/O is queued, a frontend that closes and attaches again. Nothing is lost or duplicated.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { XS_EVENT_CHANNEL, XS_PROTOCOL, XS_RING_REF, abiByName } from '../../src/abi/index.js';
import { Blkfront } from '../../src/blkfront/index.js';
import { FrontRing, SharedRing } from '../../src/ring/index.js';
import { Toolstack, createVbdNodes, removeVbdNodes, type DomainProxy } from '../../src/toolstack/index.js';
import {
  XS_STATE, XenbusStateClosed, XenbusStateConnected, XenbusStateInitWait, XenbusStateInitialising, waitForState, xvdVirtualDevice,
} from '../../src/xenbus/index.js';
import { Rng, firstDifference, sparseImage, tempDir } from './helpers.js';

let ts: Toolstack;
let back: DomainProxy;

before(async () => {
  ts = await Toolstack.start();
  back = await ts.createBackendDomain();
});
after(async () => {
  await ts.shutdown();
});

const is = (s: number) => (x: number | undefined) => x === s;

test('a backend still Connected to a vanished frontend is reset, then serves the new one', async () => {
  const L = ts.hv.createLocalDomain({ memoryPages: 512 });
  const devid = xvdVirtualDevice(0);
  const storage = { kind: 'memory' as const, size: 8 * 1024 * 1024 };
  const paths = await createVbdNodes(ts.xs, { frontDomid: L.domid, backDomid: back.domid, devid }, storage, false);
  try {
    await back.rpc.call('addVbd', paths.backDir, storage, {});
    await waitForState(ts.xs, paths.backDir, is(XenbusStateInitWait), 30_000);
    // An earlier frontend: publishes a ring, connects, then is gone without closing (a crashed guest).
    const abi = abiByName('x86_64-abi')!;
    const frames = L.memory.alloc(1);
    FrontRing.init(new SharedRing([L.memory.page(frames[0]!)], abi.entrySize));
    const ref = L.grants.grantAccess(back.domid, frames[0]!, false, { lasting: true }); // a ring
    const port = L.events.allocUnbound(back.domid);
    await ts.xs.write(`${paths.frontDir}/${XS_RING_REF}`, String(ref));
    await ts.xs.write(`${paths.frontDir}/${XS_EVENT_CHANNEL}`, String(port));
    await ts.xs.write(`${paths.frontDir}/${XS_PROTOCOL}`, abi.protocol);
    await ts.xs.write(`${paths.frontDir}/${XS_STATE}`, '3');
    await waitForState(ts.xs, paths.backDir, is(XenbusStateConnected), 30_000);
    assert.equal(L.grants.endAccess(ref), false, 'the backend maps the old ring');

    // A new frontend in the same domain finds the backend Connected and resets it first.
    const f = await Blkfront.attach({ xen: L, xs: ts.xs, frontDir: paths.frontDir, options: { bufferPages: 128, connectTimeoutMs: 5000 } });
    try {
      assert.equal(L.grants.endAccess(ref), true, 'the reset released the old ring');
      L.events.close(port);
      const data = new Rng(1).bytes(64 * 1024);
      await f.write(4096, data);
      assert.equal(firstDifference(await f.read(4096, data.length), data), -1);
    } finally {
      await f.close();
    }
    await back.rpc.call('removeVbd', paths.backDir);
  } finally {
    await removeVbdNodes(ts.xs, paths);
    await ts.hv.destroyDomain(L.domid);
  }
});

test('a backend that closes and comes back: queued and in-flight I/O completes once, correctly', async () => {
  const guest = await ts.createGuest('guest-reconnect', 4096);
  const tmp = tempDir('blkif-reconnect-');
  try {
    const size = 16 * 1024 * 1024;
    const path = join(tmp.dir, 'image');
    sparseImage(path, size);
    const storage = { kind: 'file' as const, path };
    const disk = await ts.plug({ guest, backend: back, storage, frontendOptions: { bufferPages: 2048 } });
    const rng = new Rng(7);
    const model = new Uint8Array(size);
    const chunk = 128 * 1024;
    const write = (i: number) => {
      const data = rng.bytes(chunk);
      model.set(data, i * chunk);
      return disk.write(i * chunk, data);
    };
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 64; i++) writes.push(write(i));
    // The driver domain unplugs its end (Closing, drain, Closed) while writes are in flight...
    await back.rpc.call('removeVbd', disk.paths.backDir);
    await waitForState(ts.xs, disk.paths.frontDir, (s) => s === XenbusStateInitialising, 30_000);
    // ...more I/O arrives while there is no backend: it waits...
    for (let i = 64; i < 128; i++) writes.push(write(i));
    const early = disk.read(0, chunk);
    // ...and the toolstack plugs the backend in again: everything completes, once.
    await back.rpc.call('addVbd', disk.paths.backDir, storage, {});
    await Promise.all(writes);
    assert.equal(firstDifference(await early, model.subarray(0, chunk)), -1);
    assert.equal((await disk.status()).state, 'Connected');
    assert.equal(firstDifference(await disk.read(0, size), model), -1, 'every write is on the disk');
    await disk.unplug();
    assert.equal(firstDifference(readFileSync(path), model), -1, 'and in the image file');
  } finally {
    await ts.destroy(guest);
    tmp.cleanup();
  }
});

test('a frontend that closes can attach again to the same device', async () => {
  const guest = await ts.createGuest('guest-reattach', 4096);
  try {
    const storage = { kind: 'memory' as const, size: 4 * 1024 * 1024 };
    const disk = await ts.plug({ guest, backend: back, storage, frontendOptions: { bufferPages: 512 } });
    const data = new Rng(3).bytes(256 * 1024);
    await disk.write(0, data);
    await guest.rpc.call('detach', disk.paths.frontDir);
    await waitForState(ts.xs, disk.paths.backDir, is(XenbusStateClosed), 30_000);
    const info = await guest.rpc.call<{ size: number }>('attach', disk.paths.frontDir, { bufferPages: 512 });
    assert.equal(info.size, 4 * 1024 * 1024);
    assert.equal(firstDifference(await disk.read(0, data.length), data), -1, 'data written before the reconnect is still there');
    await disk.unplug();
  } finally {
    await ts.destroy(guest);
  }
});
