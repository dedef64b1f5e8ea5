/**
 * A VBD whose storage stalls never holds up another, at `blkif serve`'s defaults (one driver
 * domain thread serving every VBD). vbd0's bytes are on nbdkit's memory plugin behind the pause
 * filter, reached as a file through nbdfuse (a FUSE file whose reads, writes and flushes hang while
 * paused, as on a hung network disk) or straight as an NBD export; vbd1's on a plain file. With
 * vbd0's disk paused and more of its requests stuck than libuv has threads by default, vbd1 is
 * written and read back many times by real clients (nbdcopy, qemu-io); then vbd0's disk resumes,
 * its stuck requests complete, and every byte is where it belongs, read through blkif and
 * straight from nbdkit.
 */
import { after, afterEach, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { createConnection } from 'node:net';
import { join } from 'node:path';
import { eventually, tempDir } from '../support/common.js';
import { spawnTracked } from '../support/children.js';
import { MissingTool, have, requireTools } from '../support/tools.js';
import { execFileP, serve, type Served } from '../cli/serve-support.js';

const MiB = 1024 * 1024;
const DISK = 16 * MiB;
/** vbd0's stuck reads come from here, filled with READ_BYTE before anything stalls. */
const READ_AT = 8 * MiB;
const READ_BYTE = 0xa5;
/** Stuck reads (qemu-io aio_read) of READ_LEN each, one after another from READ_AT. */
const READS = 8;
const READ_LEN = 256 * 1024;
/** vbd0's stuck writes: nbdcopy of WRITE_LEN random bytes at 0, 16 requests in flight. */
const WRITE_LEN = 4 * MiB;
/**
 * Requests of vbd0 in blkback while stuck: more than libuv's default pool (4 threads), so that an
 * uncapped asynchronous design would take every thread and stall vbd1 too.
 */
const STUCK_AT_LEAST = 16;
/** A bound on each of vbd1's client runs: they take well under a second; reaching it means vbd1 hung. */
const CLIENT_LIMIT_MS = 60_000;

const tmp = tempDir('blkif-isolation-');
after(() => tmp.cleanup());

/** The tools, and for the FUSE case /dev/fuse and (without root) fusermount3. */
function requireFuse(): void {
  requireTools('nbdkit', 'nbdfuse', 'nbdcopy', 'qemu-io');
  if (!existsSync('/dev/fuse')) throw new MissingTool('no /dev/fuse: load the kernel module (modprobe fuse), or give the container the device');
  // Root mounts and unmounts FUSE itself; anyone else goes through fusermount3 (a need the
  // package list cannot say is conditional, hence this line of its own).
  if (process.getuid?.() !== 0 && !have('fusermount3')) throw new MissingTool('fusermount3 not installed: install Debian package fuse3');
}

/** nbdkit's memory plugin behind the pause filter (and the log filter, in front, to see requests arrive). */
class PausableDisk {
  readonly sock: string;
  readonly uri: string;
  private readonly control: string;
  private readonly log: string;
  private readonly proc: ChildProcess;

  constructor(dir: string) {
    this.sock = join(dir, 'nbdkit.sock');
    this.control = join(dir, 'pause.sock');
    this.log = join(dir, 'nbdkit.log');
    this.uri = `nbd+unix:///?socket=${this.sock}`;
    this.proc = spawnTracked('nbdkit', ['-f', '--exit-with-parent', '-U', this.sock, '--filter=log', '--filter=pause',
      'memory', String(DISK), `pause-control=${this.control}`, `logfile=${this.log}`], { stdio: 'ignore' });
  }

  async ready(): Promise<void> {
    await eventually(() => existsSync(this.sock) && existsSync(this.control), 'nbdkit listening', 30_000, 50);
  }

  /** 'p' pauses (answered 'P' once what was in flight is done), 'r' resumes ('R'). */
  command(c: 'p' | 'r'): Promise<void> {
    return new Promise((resolve, reject) => {
      const s = createConnection(this.control, () => s.write(c));
      const timer = setTimeout(() => { s.destroy(); reject(new Error(`nbdkit's pause filter did not answer '${c}'`)); }, 30_000);
      s.once('data', (b) => {
        clearTimeout(timer);
        s.end();
        if (b.toString() === c.toUpperCase()) resolve();
        else reject(new Error(`pause filter answered ${JSON.stringify(b.toString())} to '${c}'`));
      });
      s.once('error', (e) => { clearTimeout(timer); reject(e); });
    });
  }

  /** Requests nbdkit received and has not answered, by command (Read, Write, Flush...), from its log. */
  unanswered(): Map<string, number> {
    const open = new Map<string, string>();
    for (const line of readFileSync(this.log, 'utf8').split('\n')) {
      const m = /connection=(\d+) (\.\.\.)?(\w+) id=(\d+)/.exec(line);
      if (m === null) continue;
      const key = `${m[1]}/${m[4]}`;
      if (m[2] === undefined) open.set(key, m[3]!);
      else open.delete(key);
    }
    const by = new Map<string, number>();
    for (const cmd of open.values()) by.set(cmd, (by.get(cmd) ?? 0) + 1);
    return by;
  }

  stop(): void {
    this.proc.kill('SIGKILL');
  }
}

/** A file over an NBD export, by nbdfuse; unmounted by `unmount` (fusermount3, or umount as root). */
class FuseFile {
  readonly path: string;
  private readonly proc: ChildProcess;

  constructor(private readonly mountpoint: string, uri: string) {
    mkdirSync(mountpoint);
    this.path = join(mountpoint, 'disk');
    this.proc = spawnTracked('nbdfuse', [this.path, uri], { stdio: 'ignore' });
  }

  async ready(): Promise<void> {
    await eventually(() => {
      try {
        return statSync(this.path).size === DISK;
      } catch {
        return false;
      }
    }, `nbdfuse's ${this.path}`, 30_000, 50);
  }

  unmount(): void {
    if (!this.mounted()) return;
    const tries: [string, string[]][] = have('fusermount3')
      ? [['fusermount3', ['-u', this.mountpoint]], ['fusermount3', ['-uz', this.mountpoint]]]
      : [['umount', [this.mountpoint]], ['umount', ['-l', this.mountpoint]]];
    for (const [cmd, args] of tries) {
      if (spawnSync(cmd, args, { stdio: 'ignore', timeout: 10_000 }).status === 0) break;
    }
    this.proc.kill('SIGKILL');
  }

  private mounted(): boolean {
    return readFileSync('/proc/self/mounts', 'utf8').split('\n').some((l) => l.split(' ')[1] === this.mountpoint);
  }
}

interface Finished { code: number | null; stdout: string; stderr: string }

/** A client left running in the background: its end, whenever it comes. */
function background(cmd: string, args: string[]): { proc: ChildProcess; done: Promise<Finished> } {
  const proc = spawnTracked(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  proc.stdout!.on('data', (b: Buffer) => { stdout += b.toString(); });
  proc.stderr!.on('data', (b: Buffer) => { stderr += b.toString(); });
  const done = new Promise<Finished>((resolve) => proc.once('exit', (code) => resolve({ code, stdout, stderr })));
  return { proc, done };
}

/** A vbd1 client run, which must end: a hung one is killed at CLIENT_LIMIT_MS and fails the test. */
async function client(what: string, cmd: string, args: string[]): Promise<string> {
  try {
    return (await execFileP(cmd, args, { timeout: CLIENT_LIMIT_MS, maxBuffer: 16 * MiB })).stdout;
  } catch (e) {
    const killed = (e as { killed?: boolean }).killed === true;
    throw new Error(`${what}: ${killed ? `not done after ${CLIENT_LIMIT_MS / 1000} s while vbd0's disk was stalled: vbd1 is held up by it` : (e as Error).message}`);
  }
}

/** vbd0's requests in flight in blkback, from `serve --metrics`. */
async function inflight(s: Served, vbd: string): Promise<number> {
  const port = /metrics at http:\/\/127\.0\.0\.1:(\d+)\/metrics/.exec(s.stderr())?.[1];
  assert.ok(port !== undefined, `serve did not say where its metrics are:\n${s.stderr()}`);
  const res = await fetch(`http://127.0.0.1:${port}/metrics`, { signal: AbortSignal.timeout(10_000) });
  const m = new RegExp(`^blkif_vbd_inflight_req\\{vbd="${vbd}"\\} (\\d+)$`, 'm').exec(await res.text());
  assert.ok(m !== null, `no blkif_vbd_inflight_req for ${vbd}`);
  return Number(m[1]);
}

/** Writes and reads vbd1 back, many requests each, with nbdcopy and qemu-io; checks every byte. */
async function exerciseVbd1(uri: string, dir: string, size: number): Promise<void> {
  for (let round = 0; round < 4; round++) {
    const data = randomBytes(size);
    const src = join(dir, `vbd1-${round}.raw`);
    const back = join(dir, `vbd1-${round}.back`);
    writeFileSync(src, data);
    await client(`nbdcopy to vbd1, round ${round}`, 'nbdcopy', ['--request-size=65536', src, `${uri}vbd1`]);
    await client(`nbdcopy from vbd1, round ${round}`, 'nbdcopy', [`${uri}vbd1`, back]);
    assert.ok(readFileSync(back).equals(data), `round ${round}: vbd1 reads back what was written`);
  }
  // 4 KiB writes and reads at scattered offsets, each checked by qemu-io against its pattern.
  const cmds: string[] = [];
  const offsets = Array.from({ length: 32 }, (_, i) => ((i * 37) % (size / 4096)) * 4096);
  offsets.forEach((o, i) => cmds.push('-c', `write -P ${i + 1} ${o} 4k`));
  offsets.forEach((o, i) => cmds.push('-c', `read -P ${i + 1} ${o} 4k`));
  const out = await client('qemu-io on vbd1', 'qemu-io', ['-f', 'raw', ...cmds, `${uri}vbd1`]);
  assert.doesNotMatch(out, /Pattern verification failed|error/i);
  assert.equal((out.match(/^read 4096\/4096/gm) ?? []).length, offsets.length);
}

for (const variant of ['fuse', 'nbd'] as const) {
  describe(`vbd0's storage stalls (${variant === 'fuse' ? 'an image file on FUSE' : 'an NBD export'}); vbd1 on a plain file`, () => {
    const dir = join(tmp.dir, variant);
    let disk: PausableDisk | undefined;
    let fuse: FuseFile | undefined;
    let s: Served | undefined;
    afterEach(async () => {
      // Resume first, so that nothing is left hanging in the kernel or in nbdkit, then stop
      // everything even when the test failed half way (children.ts SIGKILLs what is left).
      await disk?.command('r').catch(() => undefined); // static-check: allow cleanup after a test that may have failed half way
      await s?.stop('SIGTERM', 30_000).catch(() => s?.proc.kill('SIGKILL'));
      fuse?.unmount();
      disk?.stop();
    });

    test('vbd1 is written and read back many times while vbd0 is stuck; then vbd0 completes with every byte', { timeout: 180_000 }, async () => {
      if (variant === 'fuse') requireFuse();
      else requireTools('nbdkit', 'nbdcopy', 'qemu-io');
      mkdirSync(dir);
      disk = new PausableDisk(dir);
      await disk.ready();
      // What vbd0's stuck reads will read, put there straight through nbdkit.
      await execFileP('qemu-io', ['-f', 'raw', '-c', `write -P ${READ_BYTE} ${READ_AT} ${READS * READ_LEN}`, disk.uri]);
      let image = disk.uri;
      if (variant === 'fuse') {
        fuse = new FuseFile(join(dir, 'mnt'), disk.uri);
        await fuse.ready();
        image = fuse.path;
      }
      const vbd1 = join(dir, 'vbd1.img');
      writeFileSync(vbd1, new Uint8Array(4 * MiB));
      // Defaults but for the port, and metrics to count vbd0's requests in flight.
      s = await serve([image, vbd1, '--port', '0', '--metrics', '0']);

      await disk.command('p');
      const written = randomBytes(WRITE_LEN);
      const src = join(dir, 'vbd0.raw');
      writeFileSync(src, written);
      const writer = background('nbdcopy', ['--requests=16', '--request-size=65536', src, `${s.uri}vbd0`]);
      const reads: string[] = [];
      for (let i = 0; i < READS; i++) reads.push('-c', `aio_read -P ${READ_BYTE} ${READ_AT + i * READ_LEN} ${READ_LEN}`);
      const reader = background('qemu-io', ['-f', 'raw', ...reads, '-c', 'aio_flush', `${s.uri}vbd0`]);
      // vbd0's requests reach its disk and hang there (which of them get there first is up to the
      // clients: on a file, its share of libuv's pool may go to reads only, the rest waiting).
      await eventually(() => [...disk!.unanswered().values()].some((n) => n > 0), 'vbd0 requests waiting at the paused nbdkit', 30_000, 20);
      // And more of them in blkback than libuv has threads, before vbd1 is exercised (the clients
      // submit them at their own pace: on a loaded machine, later than the first arrive).
      await eventually(async () => (await inflight(s!, 'vbd0')) >= STUCK_AT_LEAST, `${STUCK_AT_LEAST} vbd0 requests in flight in blkback`, 60_000, 50);

      await exerciseVbd1(s.uri, dir, 4 * MiB);

      // All that while, vbd0 stayed stuck, with more requests than libuv has threads by default.
      assert.equal(writer.proc.exitCode, null, 'vbd0 writer still waiting');
      assert.equal(reader.proc.exitCode, null, 'vbd0 reader still waiting');
      const stuck = await inflight(s, 'vbd0');
      assert.ok(stuck >= STUCK_AT_LEAST, `vbd0 has ${stuck} requests in flight in blkback (want >= ${STUCK_AT_LEAST})`);
      assert.equal(await inflight(s, 'vbd1'), 0);

      await disk.command('r');
      const w = await writer.done;
      assert.equal(w.code, 0, `vbd0 writer: ${w.stderr}`);
      const r = await reader.done;
      assert.equal(r.code, 0, `vbd0 reader: ${r.stderr}`);
      assert.doesNotMatch(r.stdout, /Pattern verification failed|error/i);
      assert.equal((r.stdout.match(new RegExp(`^read ${READ_LEN}/${READ_LEN}`, 'gm')) ?? []).length, READS);

      // Nothing lost: every byte, through blkif and straight from nbdkit.
      const expect = new Uint8Array(DISK);
      expect.set(written, 0);
      expect.fill(READ_BYTE, READ_AT, READ_AT + READS * READ_LEN);
      for (const [what, uri] of [['through blkif', `${s.uri}vbd0`], ['at nbdkit', disk.uri]] as const) {
        const out = join(dir, `vbd0-${what.replace(/\W/g, '')}.raw`);
        await execFileP('nbdcopy', [uri, out]);
        assert.ok(readFileSync(out).equals(expect), `vbd0 ${what} holds what was written and prefilled`);
      }
      assert.equal(await s.stop(), 0);
    });
  });
}
