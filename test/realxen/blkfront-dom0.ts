/**
 * Run inside the rig's dom0 (not a test file): blkif's blkfront, in this dom0's userspace, on
 * a VBD that `xl block-attach 0` handed to Linux's xen-blkback (also in dom0) over a loop device
 * on `image`, a file on dom0's tmpfs. Prints `RESULT key value...` lines for
 * blkfront-on-linux.test.ts, which checks them: every check it can do from here, with the
 * image file read as the loop device's backing store (what the backend really wrote).
 *
 *   node blkfront-dom0.js FRONT_DIR IMAGE VDEV
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, openSync, readFileSync, readSync, writeSync, fsyncSync } from 'node:fs';
import { Blkfront, BlkfrontError } from '../../src/blkfront/index.js';
import { RealXen } from '../../src/xen/real/real-xen.js';
import { XenstoreClient } from '../../src/xenstore/index.js';

const [frontDir, image, vdev] = process.argv.slice(2) as [string, string, string];
const out = (key: string, ...v: (string | number | boolean)[]) => process.stdout.write(`RESULT ${key} ${v.join(' ')}\n`);
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');
const MiB = 1 << 20;

/** `ms` at most for `p`; undefined if it did not settle by then (a hang, reported as such). */
function within<T>(ms: number, p: Promise<T>): Promise<{ ok: true; v: T } | { ok: false; e: unknown } | undefined> {
  return new Promise((resolve) => {
    const t = setTimeout(() => resolve(undefined), ms);
    p.then((v) => { clearTimeout(t); resolve({ ok: true, v }); }, (e: unknown) => { clearTimeout(t); resolve({ ok: false, e }); });
  });
}

function fileRange(offset: number, length: number): Buffer {
  const fd = openSync(image, 'r');
  try {
    const b = Buffer.alloc(length);
    readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    closeSync(fd);
  }
}

async function readAll(f: Blkfront, size: number): Promise<string> {
  const h = createHash('sha256');
  for (let o = 0; o < size; o += MiB) h.update(await f.read(o, Math.min(MiB, size - o)));
  return h.digest('hex');
}

async function main(): Promise<void> {
  const xs = await XenstoreClient.connectSocket('/run/xenstored/socket');
  const backDomid = Number(await xs.read(`${frontDir}/backend-id`));
  const backDir = await xs.read(`${frontDir}/backend`);
  const domid = Number(await xs.read('domid'));
  const BUFFER_PAGES = 1024;
  const xen = RealXen.open({ domid, shareWith: backDomid, memoryPages: BUFFER_PAGES + 64 });
  out('domids', domid, backDomid);
  const attach = await within(60_000, Blkfront.attach({
    xen, xs, frontDir,
    options: { maxIndirectSegments: 256, queues: 2, ringPageOrder: 2, bufferPages: BUFFER_PAGES, connectTimeoutMs: 5000, purgeIntervalMs: 0 },
    log: (m) => process.stderr.write(`blkfront: ${m}\n`),
  }));
  if (attach === undefined || !attach.ok) {
    out('error', 'attach', attach === undefined ? 'hung-60s' : String((attach.e as Error).message).replace(/\s+/g, '_'));
    process.exit(3);
  }
  const f = attach.v;
  const info = f.info;
  out('info', JSON.stringify(info));
  // What Linux's blkback offered and what we wrote back (docs/real-xen.md records them).
  for (const k of await xs.directory(backDir)) out('back', k, (await xs.read(`${backDir}/${k}`).catch(() => '?')).replace(/\s+/g, '_') || '""');
  for (const k of await xs.directory(frontDir)) if (!k.startsWith('queue-')) out('front', k, (await xs.read(`${frontDir}/${k}`).catch(() => '?')) || '""');
  for (const q of (await xs.directory(frontDir)).filter((k) => k.startsWith('queue-'))) {
    for (const k of await xs.directory(`${frontDir}/${q}`)) out('front', `${q}/${k}`, await xs.read(`${frontDir}/${q}/${k}`));
  }

  // What the test wrote into the image before the boot, read through our blkfront.
  out('read-all', await readAll(f, info.size));

  // Ours -> the device: 4 MiB sequential in 1 MiB writes (one indirect request each at 256
  // segments), then 32 random 4 KiB writes, flushed; then read from the loop device's file.
  const seq = randomBytes(4 * MiB);
  for (let o = 0; o < seq.length; o += MiB) await f.write(2 * MiB + o, seq.subarray(o, o + MiB));
  const small = Array.from({ length: 32 }, (_, i) => ({ off: 6 * MiB + ((i * 37) % 256) * 4096, data: randomBytes(4096) }));
  const expect = Buffer.from(fileRange(6 * MiB, MiB));
  for (const s of small) {
    await f.write(s.off, s.data);
    s.data.copy(expect, s.off - 6 * MiB);
  }
  await f.flush();
  out('seq-write', sha(seq), sha(fileRange(2 * MiB, 4 * MiB)));
  out('rand-write', sha(expect), sha(fileRange(6 * MiB, MiB)));
  out('seq-readback', sha(await f.read(2 * MiB, 4 * MiB)));

  // The device -> ours: bytes written into the loop's backing file (no cache between: loop
  // reads the file's page cache) read through blkfront.
  const rev = randomBytes(MiB);
  const fd = openSync(image, 'r+');
  writeSync(fd, rev, 0, rev.length, 8 * MiB);
  fsyncSync(fd);
  closeSync(fd);
  out('reverse', sha(rev), sha(await f.read(8 * MiB, MiB)));

  // Discard: the range reads back as zeroes, through us and in the file.
  if (info.discard) {
    await f.discard(12 * MiB, MiB);
    const z = sha(Buffer.alloc(MiB));
    out('discard', z, sha(await f.read(12 * MiB, MiB)), sha(fileRange(12 * MiB, MiB)));
  } else {
    out('discard', 'not-offered');
  }
  out('counters', JSON.stringify(f.counters));
  const stats = `/sys/bus/xen-backend/devices/vbd-${domid}-${frontDir.slice(frontDir.lastIndexOf('/') + 1)}/statistics`;
  for (const s of ['rd_req', 'wr_req', 'f_req', 'ds_req', 'oo_req', 'rd_sect', 'wr_sect']) {
    try { out('blkback', s, readFileSync(`${stats}/${s}`, 'utf8').trim()); } catch { out('blkback', s, '?'); }
  }
  out('final', await readAll(f, info.size));

  // The backend goes away under I/O: xl block-detach while reads run.
  let reads = 0;
  let stop = false;
  let states = '';
  const track = setInterval(() => { if (!states.endsWith(String(f.xenbusState))) states += `${states === '' ? '' : '>'}${f.xenbusState}`; }, 100);
  const load = within(90_000, (async () => {
    while (!stop) {
      await f.read((reads % 16) * MiB, MiB);
      reads++;
    }
  })());
  while (reads < 2) await new Promise((r) => setTimeout(r, 50));
  const t0 = Date.now();
  const detach = spawn('xl', ['block-detach', String(domid), vdev], { stdio: ['ignore', 'pipe', 'pipe'] });
  let detachOut = '';
  detach.stdout.on('data', (c: Buffer) => { detachOut += c.toString(); });
  detach.stderr.on('data', (c: Buffer) => { detachOut += c.toString(); });
  const detached = await within(60_000, new Promise<number>((resolve) => detach.once('exit', (code) => resolve(code ?? -1))));
  if (detached === undefined) detach.kill('SIGKILL');
  out('detach', detached === undefined ? 'hung-60s' : `exit=${(detached as { v: number }).v}`, `${(Date.now() - t0) / 1000}s`, detachOut.trim().replace(/\s+/g, '_') || '-');
  const loadEnd = await load;
  stop = true;
  clearInterval(track);
  const why = loadEnd === undefined ? 'hung-90s' : loadEnd.ok ? 'completed' : loadEnd.e instanceof BlkfrontError ? `BlkfrontError:${loadEnd.e.code}` : `error:${String(loadEnd.e)}`;
  out('io-after-detach', why, `${(Date.now() - t0) / 1000}s`, `reads=${reads}`, `states=${states}`);
  const late = await within(15_000, f.read(0, 4096));
  out('read-after-detach', late === undefined ? 'hung-15s' : late.ok ? 'completed' : late.e instanceof BlkfrontError ? `BlkfrontError:${late.e.code}` : 'error');
  const closed = await within(15_000, f.close());
  out('close', closed === undefined ? 'hung-15s' : closed.ok ? 'ok' : `error:${String(closed.e)}`);
  const held = xen.held();
  out('held', `mapped=${held.mapped}`, `bound=${held.bound}`);
  await xen.close();
  xs.close();
  out('done');
}

main().then(() => process.exit(0), (e: unknown) => {
  out('error', 'crash', String((e as Error)?.stack ?? e).replace(/\s+/g, '_'));
  process.exit(2);
});
