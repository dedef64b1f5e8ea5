/** The storage registry: which `serve IMAGE` strings each kind takes, names, and which kinds queue threads may share. */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { join, resolve } from 'node:path';
import { FileStorage, describeStorage, openStorage, storageFromArgument, storageKinds, storageShareable, type StorageSpec } from '../../src/storage/index.js';
import { drivers, tempDir } from './helpers.js';

const tmp = tempDir('blkif-storage-registry-');
after(() => tmp.cleanup());

const o = { sectorSize: 4096, readOnly: true, connections: 3 } as const;

describe('storage registry', { timeout: 60_000 }, () => {
  test('kinds are named once, and every one has contract drivers', () => {
    const names = storageKinds.map((k) => k.kind);
    assert.deepEqual([...names].sort(), ['file', 'memory', 'nbd']);
    const tested = drivers(tmp.dir).map((d) => d.name);
    for (const n of names) assert.ok(tested.some((t) => t === n || t.startsWith(`${n} (`)), `${n} among ${tested.join(', ')}`);
  });

  test('serve IMAGE: NBD URIs are nbd, paths are files (made absolute), other URIs nothing', () => {
    for (const uri of ['nbd://h/e', 'nbds://h:10810/e?tls-psk-file=/k', 'nbd+unix:///e?socket=/s', 'nbds+unix:///?socket=/s']) {
      assert.deepEqual(storageFromArgument(uri, o), { kind: 'nbd', uri, sectorSize: 4096, readOnly: true, connections: 3 });
    }
    for (const path of ['disk.img', '/abs/disk.img', './a:b', 'nbd.img']) {
      assert.deepEqual(storageFromArgument(path, o), { kind: 'file', path: resolve(path), sectorSize: 4096, readOnly: true });
    }
    assert.equal(storageFromArgument('http://h/disk.img', o), undefined);
  });

  test('describe names the store; shareable: files yes, memory no, nbd as the handle says', async () => {
    const specs: StorageSpec[] = [{ kind: 'file', path: join(tmp.dir, 'a.img') }, { kind: 'memory', size: 4096 }, { kind: 'nbd', uri: 'nbd://h/e' }];
    assert.deepEqual(specs.map(describeStorage), [join(tmp.dir, 'a.img'), 'memory:4096', 'nbd://h/e']);
    await FileStorage.create(join(tmp.dir, 'a.img'), 4096);
    const file = await openStorage(specs[0]!);
    const mem = await openStorage(specs[1]!);
    try {
      assert.equal(storageShareable(specs[0]!, file), true);
      assert.equal(storageShareable(specs[1]!, mem), false);
    } finally {
      await file.close();
      await mem.close();
    }
  });
});
