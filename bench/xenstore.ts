// Reads per second against the xenstore daemon over the Unix socket and
// over the shared-page transport (in-thread kicks), 32 requests in flight.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  XenstoreClient,
  XenstoreDaemon,
  XenstorePageClient,
  XenstoreSocketServer,
  attachPage,
  type XenstorePageServer,
} from '../src/xenstore/index.js';

async function readsPerSecond(c: XenstoreClient, ms: number): Promise<number> {
  await c.write('/bench/key', 'value');
  let n = 0;
  const end = Date.now() + ms;
  const t0 = process.hrtime.bigint();
  await Promise.all(
    Array.from({ length: 32 }, async () => {
      while (Date.now() < end) {
        await c.read('/bench/key');
        n++;
      }
    }),
  );
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  return n / secs;
}

export async function benchXenstore(quick = false): Promise<{ name: string; value: number; unit: string }[]> {
  const daemon = new XenstoreDaemon();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkif-xs-bench-'));
  try {
    const server = await XenstoreSocketServer.listen(daemon, path.join(dir, 'socket'));
    const sockClient = await XenstoreClient.connectSocket(server.path);
    const socketRate = await readsPerSecond(sockClient, quick ? 300 : 1000);
    sockClient.close();

    const page = new Uint8Array(new SharedArrayBuffer(4096));
    let ps: XenstorePageServer | undefined;
    const t = new XenstorePageClient(page, () => queueMicrotask(() => ps?.onEvent()));
    ps = attachPage(daemon, 0, page, () => queueMicrotask(() => t.onEvent()));
    const pageRate = await readsPerSecond(new XenstoreClient(t), quick ? 300 : 1000);
    return [
      { name: 'xenstore read, unix socket', value: Math.round(socketRate), unit: 'reads/s' },
      { name: 'xenstore read, shared page', value: Math.round(pageRate), unit: 'reads/s' },
    ];
  } finally {
    await daemon.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
