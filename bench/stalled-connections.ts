/**
 * Issue 24's scenario against `blkif serve` at its defaults: IDLE TCP connections that send
 * nothing, plus HALF that stop halfway through the handshake (client flags and half an option
 * header), then a real client (nbdinfo); after WAIT seconds, how many of the stalled connections
 * the server has closed. Prints one JSON line.
 *
 *   node dist/bench/stalled-connections.js [--idle 3000] [--half 200] [--wait 60] [-- SERVE ARGS...]
 */
import { spawn, execFile } from 'node:child_process';
import { connect, type Socket } from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);
const MAIN = fileURLToPath(new URL('../src/cli/blkif.cjs', import.meta.url));

function arg(name: string, dflt: number): number {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : dflt;
}

async function main(): Promise<void> {
  const idle = arg('--idle', 3000);
  const half = arg('--half', 200);
  const wait = arg('--wait', 60);
  const dd = process.argv.indexOf('--');
  const extra = dd >= 0 ? process.argv.slice(dd + 1) : [];
  const dir = mkdtempSync(join(tmpdir(), 'blkif-stalled-'));
  const proc = spawn(process.execPath, [MAIN, 'serve', join(dir, 'disk.img'), '--size', '64M', '--port', '0', ...extra], { stdio: ['ignore', 'pipe', 'pipe'] });
  proc.stderr!.resume();
  try {
    const uri = await new Promise<string>((resolve, reject) => {
      let out = '';
      proc.stdout!.on('data', (b: Buffer) => {
        out += b.toString();
        const m = /^ready (\S+)$/m.exec(out);
        if (m !== null) resolve(m[1]!);
      });
      proc.once('exit', (c) => reject(new Error(`serve exited ${c}`)));
    });
    const { hostname, port } = new URL(uri);
    let closed = 0;
    const sockets: Socket[] = [];
    const open = (halfway: boolean) => new Promise<void>((resolve) => {
      const s = connect({ host: hostname, port: Number(port) });
      sockets.push(s);
      s.on('error', () => undefined);
      s.resume(); // read, so the server's close is seen
      s.once('close', () => { closed++; resolve(); });
      s.once('connect', () => {
        if (halfway) {
          // Client flags (fixed newstyle, no zeroes), then 8 of an option header's 16 bytes.
          s.once('data', () => s.write(Buffer.from([0, 0, 0, 3, 0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54])));
        }
        resolve();
      });
    });
    const t0 = Date.now();
    for (let i = 0; i < idle; i++) await open(false);
    for (let i = 0; i < half; i++) await open(true);
    const opened = Date.now() - t0;
    let client: string;
    try {
      const { stdout } = await execFileP('nbdinfo', ['--size', uri], { timeout: 30_000 });
      client = `served (size ${stdout.trim()})`;
    } catch (e) {
      client = `refused: ${String((e as { stderr?: string }).stderr ?? e).trim().split('\n').pop()}`;
    }
    const deadline = t0 + wait * 1000;
    while (Date.now() < deadline && closed < idle + half) await new Promise((r) => setTimeout(r, 250));
    const closedAt = Date.now() - t0;
    let after: string;
    try {
      await execFileP('nbdinfo', ['--size', uri], { timeout: 30_000 });
      after = 'served';
    } catch (e) {
      after = `refused: ${String((e as { stderr?: string }).stderr ?? e).trim().split('\n').pop()}`;
    }
    console.log(JSON.stringify({ idle, half, waitSeconds: wait, openedMs: opened, closedByServer: closed, lastCheckMs: closedAt, clientDuringFlood: client, clientAfter: after, serveArgs: extra }));
    for (const s of sockets) s.destroy();
  } finally {
    proc.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
